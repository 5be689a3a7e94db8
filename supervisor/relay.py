"""The stdio broker's two ends in the supervisor: worker output to stdout, stdin to workers.

Output: each worker writes records to its own pipe; the supervisor forwards whole records only
(so records of different workers never interleave, and a worker killed mid-write leaves no half
record), usually straight from the read to stdout without buffering. It counts, per worker, the
bytes that reached stdout and tells the worker (:class:`~spectacles_gateway.control.Relayed`,
at most every :data:`ACK_INTERVAL`), which only then confirms those events. While stdout is
behind by :data:`HIGH_WATER` bytes the workers' pipes are not read: their writes pause and their
shards stop reading the gateway.

A busy pipe is read at most every :data:`REST` seconds: after a read that took less than half
of what the pipe holds, the pipe rests (is not polled) for that long and its next read takes
everything the worker wrote meanwhile, so a worker delivering one event per wake-up costs the
supervisor one wake-up per ~20 ms, not per event. The pipes are enlarged to :data:`PIPE_SIZE`
(best effort) so that a worker rarely finds its pipe full in between; a read of half the pipe
or more means a stream fast enough to be read without rests (each read is already large).

Input: stdin records (JSON lines or msgpack maps) are parsed here once, routed by Discord's rule
to the worker that runs the target shard (every worker for a broadcast), and kept per worker
until its control channel can take them (bounded; a worker that restarts gets what was waiting).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import stat
import time
from collections import deque
from collections.abc import Callable
from typing import IO

import msgspec

from spectacles_gateway import metrics
from spectacles_gateway.brokers.wire import CommandError
from spectacles_gateway.control import Deliver, Relayed
from spectacles_gateway.pipes import enlarge_pipe
from spectacles_gateway.records import (
    Dropped,
    RecordSplitter,
    parse_stdin_record,
    whole_records_end,
)

from .slots import WorkerSlot

__all__ = [
    "ACK_INTERVAL",
    "HIGH_WATER",
    "StdinRouter",
    "StdioRelay",
    "lock_file",
    "shares_stdout",
]

log = logging.getLogger("spectacles_gateway.supervisor")

HIGH_WATER = 4 << 20  # bytes waiting for our stdout before we stop reading workers
READ_SIZE = 1 << 20
#: Seconds a worker's pipe rests after a read that did not fill READ_SIZE.
REST = 0.02
#: What we ask the kernel to make each worker's pipe hold (Linux caps it for unprivileged
#: processes at /proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_SIZE = 1 << 20
#: Seconds between two Relayed messages to one worker (each one wakes the worker up; its
#: sessions are saved once a second, so a tenth of a second costs nothing in replays).
ACK_INTERVAL = 0.1
#: Commands queued in a worker's control channel before more wait in the supervisor.
CHANNEL_ROOM = 256 << 10


#: Where a process finds its own descriptors (to open one again).
PROC_FD = "/proc/self/fd"


def shares_stdout(fd: int, fmt: str) -> bool:
    """Whether the workers write to our stdout themselves (:mod:`spectacles_gateway.brokers.
    sharedout`) instead of through the relay: JSON lines (a record cut by a dying worker can be
    ended) to a pipe, a terminal, a file or /dev/null. A socket (systemd's journal, say) cannot
    be opened again by each worker, and msgpack has no way to end a cut record: relayed."""
    if fmt != "json":
        return False
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd)):
        return True  # the workers write through the descriptor they inherit
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        return False
    try:  # each worker opens it again for itself: that takes /proc (not in every container)
        os.close(os.open(f"{PROC_FD}/{fd}", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def lock_file() -> int | None:
    """A nameless file of one page for the workers' lock and shared state (sharedout): in
    memory, so a read-only root (the image) does not matter; None: none can be made (relay)."""
    try:
        fd = os.memfd_create("spectacles-stdout")
    except (OSError, AttributeError):  # no memfd: a nameless file (O_TMPFILE) in TMPDIR
        directory = os.environ.get("TMPDIR") or "/tmp"  # noqa: S108 - nameless, mode 600
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError:
            return None
    try:
        os.ftruncate(fd, 4096)
    except OSError:
        os.close(fd)
        return None
    return fd


def pollable(fd: int) -> bool:
    """Pipes, sockets and terminals can be polled; regular files and /dev/null cannot."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))


class _Source:
    __slots__ = (
        "acked",
        "fd",
        "held",
        "open",
        "partial",
        "pipe",
        "registered",
        "relayed",
        "rest_below",
        "rest_until",
        "slot",
        "taken",
    )

    def __init__(self, slot: WorkerSlot, pipe: IO[bytes]) -> None:
        self.slot = slot
        self.pipe = pipe
        self.fd = pipe.fileno()
        self.partial = b""  # the start of a record still being written
        self.taken = 0  # bytes of whole records taken from this worker
        self.relayed = 0  # ... of which reached stdout
        self.acked = 0  # ... of which the worker was told
        self.open = True  # False after EOF
        self.held = False  # not read while stdout is behind
        self.rest_until: float | None = None  # not read until then (a busy pipe)
        self.registered = False  # in the selector
        self.rest_below = 32 << 10  # a read shorter than this makes the pipe rest

    @property
    def reading(self) -> bool:
        return self.open and not self.held and self.rest_until is None


class StdioRelay:
    def __init__(
        self,
        selector: selectors.BaseSelector,
        fmt: str,
        stdout_fd: int,
        on_output_lost: Callable[[OSError], None],
    ) -> None:
        self.selector = selector
        self.format = fmt
        self.fd: int | None = stdout_fd
        self.blocking = not pollable(stdout_fd)  # a file or /dev/null: writes just happen
        if not self.blocking:
            os.set_blocking(stdout_fd, False)
        self.on_output_lost = on_output_lost
        self.out = bytearray()  # whole records waiting for stdout
        self.written = 0  # bytes written to stdout so far
        self._ends: deque[tuple[int, _Source, int]] = deque()  # (stdout position, source, taken)
        self._sources: dict[int, _Source] = {}
        self._registered = False
        self._next_ack = 0.0
        self._resting: list[_Source] = []

    # ------------------------------------------------------------------ workers' pipes

    def attach(self, slot: WorkerSlot, pipe: IO[bytes]) -> None:
        fd = pipe.fileno()
        os.set_blocking(fd, False)
        size = enlarge_pipe(fd, PIPE_SIZE) or 64 << 10  # Linux's default
        source = _Source(slot, pipe)
        source.rest_below = size // 2
        self._sources[slot.index] = source
        source.held = len(self.out) > HIGH_WATER
        self._poll(source)

    def detach(self, slot: WorkerSlot) -> None:
        """The worker died: forward the whole records left in its pipe (they may already be
        counted as written by its broker), drop a trailing half record, close the pipe."""
        source = self._sources.pop(slot.index, None)
        if source is None:
            return
        source.open = False
        self._poll(source)
        while self._take(source):
            pass
        with contextlib.suppress(OSError):
            source.pipe.close()
        self._ends = deque(e for e in self._ends if e[1] is not source)
        with contextlib.suppress(ValueError):
            self._resting.remove(source)

    def _poll(self, source: _Source) -> None:
        """Register the source's pipe with the selector exactly while it is to be read."""
        want = source.reading
        if want and not source.registered:
            self.selector.register(source.pipe, selectors.EVENT_READ, lambda m: self._read(source))
            source.registered = True
        elif not want and source.registered:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(source.pipe)
            source.registered = False

    def _read(self, source: _Source) -> None:
        n = self._take(source)
        if 0 < n < source.rest_below and source.open:
            # A short read: let the pipe fill for a while, then take it all at once.
            source.rest_until = time.monotonic() + REST
            self._resting.append(source)
        self._poll(source)

    def wake(self, now: float) -> None:
        """Read the pipes whose rest is over (the owner's loop calls this): what they hold is
        taken at once, and a pipe that had something rests again without ever going back to
        the selector; an empty one is polled again."""
        resting = self._resting
        due: list[_Source] = []
        while resting and resting[0].rest_until is not None and resting[0].rest_until <= now:
            source = resting.pop(0)
            source.rest_until = None
            due.append(source)
        for source in due:
            if source.reading:
                self._read(source)
            else:
                self._poll(source)

    def next_wake(self) -> float | None:
        """When :meth:`wake` has something to do (None: no pipe rests)."""
        return self._resting[0].rest_until if self._resting else None

    def _take(self, source: _Source) -> int:
        """Read once; the number of bytes read (0: nothing now, or EOF)."""
        try:
            data = os.read(source.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            data = b""
        if not data:
            source.open = False
            self._poll(source)
            return 0
        n = len(data)
        if source.partial:
            data = source.partial + data
        end = whole_records_end(data, self.format)
        source.partial = data[end:] if end < len(data) else b""
        if end:
            source.taken += end
            self._emit(data if end == len(data) else memoryview(data)[:end], source)
        return n

    def _emit(self, chunk: bytes | memoryview, source: _Source) -> None:
        position = self.written + len(self.out) + len(chunk)
        self._ends.append((position, source, source.taken))
        if self.out or self.fd is None:
            self.out += chunk
        else:
            self._write(chunk)

    # ------------------------------------------------------------------ stdout

    def _write(self, chunk: bytes | memoryview | None = None) -> None:
        fd = self.fd
        if fd is None:
            self.out.clear()
            return
        data: bytes | bytearray | memoryview = self.out if chunk is None else chunk
        try:
            if self.blocking:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    self.written += n
                view.release()
                written = len(data)
            else:
                written = os.write(fd, data) if data else 0
                self.written += written
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as exc:  # EPIPE and friends: the reader is gone for good
            self.fd = None
            self.out.clear()
            self.on_output_lost(exc)
            return
        if chunk is None:
            del self.out[:written]
        elif written < len(chunk):
            self.out += chunk[written:]
        self._settle()

    def _settle(self) -> None:
        ends = self._ends
        written = self.written
        while ends and ends[0][0] <= written:
            _, source, taken = ends.popleft()
            source.relayed = taken
        pending = len(self.out)
        if not self.blocking and self.fd is not None:
            if pending and not self._registered:
                self.selector.register(self.fd, selectors.EVENT_WRITE, lambda m: self._write())
                self._registered = True
            elif not pending and self._registered:
                self.selector.unregister(self.fd)
                self._registered = False
        # Back-pressure: stop reading workers while stdout is behind.
        if pending > HIGH_WATER:
            for source in self._sources.values():
                if not source.held:
                    source.held = True
                    self._poll(source)
        elif pending <= HIGH_WATER // 2:
            for source in self._sources.values():
                if source.held:
                    source.held = False
                    self._poll(source)

    def acks(self, now: float) -> list[tuple[WorkerSlot, Relayed]]:
        """What each worker must be told about its relayed output (at most every
        :data:`ACK_INTERVAL`)."""
        if now < self._next_ack:
            return []
        out = []
        for source in self._sources.values():
            if source.relayed > source.acked:
                source.acked = source.relayed
                out.append((source.slot, Relayed(source.relayed)))
        if out:
            self._next_ack = now + ACK_INTERVAL
        return out

    def next_ack(self) -> float | None:
        if any(s.relayed > s.acked for s in self._sources.values()):
            return self._next_ack
        return None

    def close(self) -> None:
        """At exit: write what is left, blocking (the reader had its chance)."""
        if self.out and self.fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(self.fd, True)
                os.write(self.fd, bytes(self.out))
            self.out.clear()


class StdinRouter:
    """Commands from stdin to the workers whose shards they target."""

    def __init__(
        self,
        fmt: str,
        shard_count: int,
        owner: Callable[[int], WorkerSlot | None],
        slots: list[WorkerSlot],
        *,
        limit: int = 4 << 20,
    ) -> None:
        self.format = fmt
        self.shard_count = shard_count
        self.owner = owner
        self.slots = slots
        self.limit = limit
        self.splitter = RecordSplitter(fmt)

    def feed(self, data: bytes) -> None:
        for record in self.splitter.feed(data):
            if isinstance(record, Dropped):
                self._drop(record.reason, record.detail)
                continue
            try:
                self._route(record)
            except Exception as exc:  # a bug of ours: one record must not stop the gateway
                log.exception("internal error while routing a stdin record")
                self._drop("internal_error", f"{type(exc).__name__}: {exc}")

    def _route(self, record: bytes) -> None:
        try:
            command = parse_stdin_record(record, self.format)
        except CommandError as exc:
            self._drop(exc.reason, str(exc))
            return
        target = command.target(self.shard_count)
        if target is None:
            slots = [s for s in self.slots if not s.fatal]
            body = msgspec.json.encode({"packet": msgspec.Raw(command.packet)})
        else:
            slot = self.owner(target)
            if slot is None:
                self._drop("unknown_shard", f"no worker of this gateway runs shard {target}")
                return
            slots = [slot]
            body = msgspec.json.encode({"shard_id": target, "packet": msgspec.Raw(command.packet)})
        for slot in slots:
            if slot.pending_bytes + len(body) > self.limit:
                self._drop("backlog", f"worker {slot.index} has {slot.pending_bytes} bytes waiting")
                continue
            slot.pending_input.append(body)
            slot.pending_bytes += len(body)
            self.pump(slot)

    def pump(self, slot: WorkerSlot) -> None:
        """Hand waiting commands to the worker while its channel has room."""
        channel = slot.channel
        if channel is None or channel.closed:
            return
        pending = slot.pending_input
        while pending and channel.backlog < CHANNEL_ROOM:
            body = pending.popleft()
            slot.pending_bytes -= len(body)
            channel.send(Deliver(body))

    def _drop(self, reason: str, detail: str) -> None:
        log.warning("dropped input from stdin: %s", detail)
        metrics.input_dropped.labels("stdio", reason).inc()


def read_available(fd: int, size: int = 1 << 16) -> bytes | None:
    """What a non-blocking fd holds now; b"" at EOF (or an error); None: nothing yet."""
    try:
        return os.read(fd, size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
