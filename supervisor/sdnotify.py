"""systemd's service notification protocol (``sd_notify``), without libsystemd or threads.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the
abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). Each
notification is one datagram of newline-separated ``KEY=VALUE`` assignments on an ``AF_UNIX``
``SOCK_DGRAM`` socket. The supervisor calls this from its select loop:

- :meth:`Notifier.ready` once every owned shard is connected (``READY=1``),
- :meth:`Notifier.watchdog` every :meth:`Notifier.watchdog_interval` seconds (``WATCHDOG=1``),
- :meth:`Notifier.status` for ``systemctl status`` (``STATUS=...``),
- :meth:`Notifier.reloading` when a rolling restart starts (then :meth:`Notifier.ready` again),
- :meth:`Notifier.extend_timeout` while a long start-up or stop is still making progress,
- :meth:`Notifier.stopping` when a graceful stop begins (``STOPPING=1``).

Sending never raises and never blocks for long: a notification that cannot be delivered is
logged at DEBUG and dropped (systemd may be gone, or the service runs outside systemd with a
stale variable). A notifier only speaks for the process that created it: a forked worker
inherits the object but sends nothing, since ``NotifyAccess=main`` would drop it anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

#: How long one send may wait for room in systemd's socket buffer.
SEND_TIMEOUT = 1.0


class Notifier:
    """Sends notifications to the service manager's socket ``address``.

    Build it with :meth:`from_env`; the constructor reads nothing from the environment.
    ``watchdog_usec`` and ``watchdog_pid`` are ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as given,
    ``pid`` the process that may notify (default: the current one).
    """

    def __init__(
        self,
        address: str,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.address = address
        self._sockaddr = _sockaddr(address)
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self.pid = os.getpid() if pid is None else pid

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """The notifier that ``environ`` (default ``os.environ``) asks for, or ``None``.

        ``None`` when ``NOTIFY_SOCKET`` is unset or empty (not started by systemd with
        ``Type=notify``), or names an address this module cannot use (only ``/path`` and
        ``@abstract`` are supported), so callers guard with ``if notifier is not None``."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        if not address.startswith(("/", "@")):
            log.debug("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", address)
            return None
        return cls(
            address,
            watchdog_usec=env.get("WATCHDOG_USEC"),
            watchdog_pid=env.get("WATCHDOG_PID"),
        )

    # ------------------------------------------------------------------ watchdog

    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` calls (half of ``WATCHDOG_USEC``), or ``None``.

        ``None`` when no watchdog is configured (``WATCHDOG_USEC`` unset, zero or malformed) or
        when ``WATCHDOG_PID`` names another process, as ``sd_watchdog_enabled()`` decides."""
        if not self._owner():
            return None
        if self._watchdog_pid:
            try:
                watchdog_pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if watchdog_pid != os.getpid():
                return None
        try:
            usec = int(self._watchdog_usec or "0")
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the main loop is alive. Nothing is sent without a watchdog for us."""
        if self.watchdog_interval() is not None:
            self.notify("WATCHDOG=1")

    # ------------------------------------------------------------------ state

    def ready(self, status: str = "") -> None:
        """``READY=1`` (start-up, or a reload, is complete), with an optional status line."""
        self.notify("READY=1", *_status(status))

    def status(self, text: str) -> None:
        """``STATUS=<text>``, shown by ``systemctl status`` (one line; newlines become spaces)."""
        self.notify(*_status(text))

    def reloading(self, status: str = "") -> None:
        """``RELOADING=1``: a rolling restart began; call :meth:`ready` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str = "") -> None:
        """``STOPPING=1``: a graceful stop began."""
        self.notify("STOPPING=1", *_status(status))

    def extend_timeout(self, seconds: float) -> None:
        """``EXTEND_TIMEOUT_USEC``: the current start-up or stop needs ``seconds`` more from now.

        Send it again before that time has passed to keep extending (e.g. as shards identify
        during a long start-up of a large bot)."""
        self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    # ------------------------------------------------------------------ sending

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` (``KEY=VALUE`` strings) as one datagram. True if it was sent.

        Never raises: a failure is logged at DEBUG and ``False`` is returned."""
        if not assignments:
            return False
        if not self._owner():
            log.debug("not notifying from pid %d (the notifier is %d's)", os.getpid(), self.pid)
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message, self._sockaddr)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def _owner(self) -> bool:
        return os.getpid() == self.pid


def _sockaddr(address: str) -> str | bytes:
    """``@name`` is the abstract socket ``\\0name``; anything else a filesystem path."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _status(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)
