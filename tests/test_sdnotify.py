"""supervisor/sdnotify.py against real AF_UNIX datagram sockets, as systemd listens on them."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sdnotify import Notifier

from .gwtest import t

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="AF_UNIX on Linux")


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket like systemd's, and the NOTIFY_SOCKET value that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = tmp_path / "notify"
        sock.bind(str(path))
        address = str(path)
    else:
        name = f"spectacles-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    sock.settimeout(t(2))
    try:
        yield address, sock
    finally:
        sock.close()


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def nothing_before_a_marker(notifier: Notifier, sock: socket.socket) -> bool:
    """Send a marker and read the first datagram waiting: True when it is the marker, i.e.
    nothing else was sent before it (the marker is the signal that anything would be here)."""
    marker = f"STATUS=marker {uuid.uuid4().hex}"
    assert notifier.notify(marker)
    return recv(sock) == [marker]


def test_ready_watchdog_status_stopping_arrive(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000"})
    assert notifier is not None

    notifier.ready("16 shards ready")
    assert recv(sock) == ["READY=1", "STATUS=16 shards ready"]
    notifier.ready()
    assert recv(sock) == ["READY=1"]
    notifier.watchdog()
    assert recv(sock) == ["WATCHDOG=1"]
    notifier.status("identified 3/16\nshards")
    assert recv(sock) == ["STATUS=identified 3/16 shards"]  # one line
    notifier.reloading("rolling restart")
    reloading = recv(sock)
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1].split("=")[1]) > 0
    assert reloading[2] == "STATUS=rolling restart"
    notifier.extend_timeout(90)
    assert recv(sock) == ["EXTEND_TIMEOUT_USEC=90000000"]
    notifier.stopping()
    assert recv(sock) == ["STOPPING=1"]
    assert nothing_before_a_marker(notifier, sock)


def test_watchdog_interval_is_half_of_watchdog_usec(listener: tuple[str, socket.socket]) -> None:
    address, _ = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000"})
    assert notifier is not None
    assert notifier.watchdog_interval() == 15.0
    ours = {"WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "5000000", **ours})
    assert notifier is not None
    assert notifier.watchdog_interval() == 2.5


@pytest.mark.parametrize(
    "watchdog_env",
    [
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},  # another process's watchdog
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"},
        {},  # no WatchdogSec=
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
    ],
)
def test_no_watchdog_for_us_disables_it(
    listener: tuple[str, socket.socket], watchdog_env: dict[str, str]
) -> None:
    address, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address, **watchdog_env})
    assert notifier is not None
    assert notifier.watchdog_interval() is None
    notifier.watchdog()
    assert nothing_before_a_marker(notifier, sock)
    notifier.ready()  # the rest still works
    assert recv(sock) == ["READY=1"]


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234", "relative/path"])
def test_without_a_usable_notify_socket_there_is_no_notifier(value: str | None) -> None:
    env = {"WATCHDOG_USEC": "30000000"}
    if value is not None:
        env["NOTIFY_SOCKET"] = value
    assert Notifier.from_env(env) is None


def test_from_env_defaults_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, listener: tuple[str, socket.socket]
) -> None:
    address, sock = listener
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier.from_env() is None
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier.from_env()
    assert notifier is not None
    notifier.ready()
    assert recv(sock) == ["READY=1"]


def test_send_errors_never_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="supervisor.sdnotify")
    for address in (str(tmp_path / "gone"), f"@spectacles-test-{uuid.uuid4().hex}"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
        assert notifier is not None
        notifier.ready("x")
        notifier.watchdog()
        notifier.status("x")
        notifier.stopping()
        assert notifier.notify("READY=1") is False
    assert "sd_notify" in caplog.text


def test_a_forked_child_does_not_speak_for_the_main_process(
    listener: tuple[str, socket.socket],
) -> None:
    address, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000"})
    assert notifier is not None
    pid = os.fork()
    if pid == 0:  # the child: a worker that inherited the notifier
        ok = False
        try:
            ok = notifier.watchdog_interval() is None and notifier.notify("STOPPING=1") is False
            notifier.watchdog()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert nothing_before_a_marker(notifier, sock)
    notifier.ready()
    assert recv(sock) == ["READY=1"]
