"""Workers writing to one shared stdout themselves (spectacles_gateway.brokers.sharedout): whole
records, never interleaved, in order per writer, with real processes, pipes and SIGKILL."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from spectacles_gateway.brokers.sharedout import fitting

from .gwtest import t

#: One writer in a process of its own: argv = lock fd, writer id, record count, sizes (csv),
#: pipe size, then records are written in batches of 1-5 as fast as the writer takes them.
WRITER = r"""
import asyncio, json, os, sys
import spectacles_gateway.brokers.sharedout as so

lock, wid, count, sizes, pipe_size = sys.argv[1:6]
so.PIPE_SIZE = int(pipe_size)
sizes = [int(s) for s in sizes.split(",")]

async def main():
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    lost = []
    state = {"written": 0}
    writer = so.DirectWriter(
        so.SharedStdout(1, int(lock)), loop, repair=b"\n",
        written=lambda n: state.update(written=n), paused=lambda p: None,
        lost=lambda exc: (lost.append(exc), done.set()),
    )
    n = 0
    while n < int(count):
        batch = []
        for _ in range(1 + n % 5):
            if n == int(count):
                break
            pad = "x" * max(0, sizes[n % len(sizes)] - 40)
            batch.append(json.dumps({"w": int(wid), "n": n, "pad": pad}).encode() + b"\n")
            n += 1
        writer.write(batch)
        while writer.pending > 4 << 20:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)
    while writer.pending and not lost:
        await asyncio.sleep(0.001)
    sys.stderr.write(json.dumps({"offset": writer.offset, "lost": [str(e) for e in lost]}) + "\n")
    writer.close()

asyncio.run(main())
"""


def lock_file(tmp_path: Path) -> int:
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4096)
    return fd


def spawn_writer(
    stdout: int, lock: int, wid: int, count: int, sizes: list[int], pipe_size: int = 1 << 16
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(lock), str(wid), str(count),
         ",".join(map(str, sizes)), str(pipe_size)],
        stdout=stdout, stderr=subprocess.PIPE, pass_fds=(lock,),
    )  # fmt: skip


def drain(fd: int, until: list[subprocess.Popen[bytes]], *, pause: float = 0.0) -> bytes:
    """Read the pipe (slowly with ``pause``) until every writer exited and the pipe is empty."""
    os.set_blocking(fd, False)
    data = bytearray()
    deadline = time.monotonic() + t(60)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1 << 14)
        except BlockingIOError:
            chunk = None
        if chunk:
            data += chunk
            if pause:
                time.sleep(pause)
            continue
        if chunk == b"" or all(p.poll() is not None for p in until):
            # Writers gone: take the rest.
            while True:
                try:
                    rest = os.read(fd, 1 << 16)
                except BlockingIOError:
                    return bytes(data)
                if not rest:
                    return bytes(data)
                data += rest
        time.sleep(0.002)
    raise AssertionError("writers did not finish")


def test_fitting_takes_the_first_records_that_fit() -> None:
    assert fitting([10, 20, 30], 60) == 3
    assert fitting([10, 20, 30], 59) == 2
    assert fitting([10, 20, 30], 9) == 0
    assert fitting([], 100) == 0
    assert fitting([10], -5) == 0


def test_many_writers_share_a_small_pipe_with_a_slow_reader(tmp_path: Path) -> None:
    """Four processes, records from 50 bytes to 150 KiB (over twice the 64 KiB pipe), a reader
    that pauses between reads: every record arrives whole, once, in its writer's order."""
    lock = lock_file(tmp_path)
    r, w = os.pipe()
    sizes = [50, 900, 5000, 40_000, 150_000, 300, 70_000, 2000]
    writers = [spawn_writer(w, lock, wid, 120, sizes) for wid in range(4)]
    os.close(w)
    data = drain(r, writers, pause=0.001)
    os.close(r)
    for p in writers:
        assert p.wait(timeout=t(10)) == 0
        assert p.stderr is not None
        report = json.loads(p.stderr.read())
        p.stderr.close()
        assert report["lost"] == []
    seen: dict[int, list[int]] = {wid: [] for wid in range(4)}
    lines = data.split(b"\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        record = json.loads(line)  # a torn or interleaved record would not parse
        seen[record["w"]].append(record["n"])
    assert seen == {wid: list(range(120)) for wid in range(4)}
    os.close(lock)


def test_a_writer_killed_in_the_middle_of_a_record_leaves_one_ended_line(tmp_path: Path) -> None:
    """A record larger than the pipe is written in pieces; its writer is killed half-way. The next
    writer ends the cut line first, so everything after it is whole again."""
    lock = lock_file(tmp_path)
    r, w = os.pipe()
    big = spawn_writer(w, lock, 0, 1, [400_000])
    # Nobody reads: the pipe fills with the start of the record; the writer holds the lock.
    deadline = time.monotonic() + t(10)
    state = os.open(tmp_path / "lock", os.O_RDONLY)
    while os.pread(state, 1, 0) != b"\x01":
        assert time.monotonic() < deadline, "the writer never started cutting the record"
        time.sleep(0.01)
    big.send_signal(signal.SIGKILL)
    big.wait()
    assert big.stderr is not None
    big.stderr.close()
    after = spawn_writer(w, lock, 1, 30, [100, 3000])
    os.close(w)
    data = drain(r, [after])
    os.close(r)
    assert after.wait(timeout=t(10)) == 0
    assert after.stderr is not None
    after.stderr.close()
    lines = data.split(b"\n")
    assert lines[0].startswith(b'{"w": 0, "n": 0') and len(lines[0]) < 400_000  # the cut one
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])
    assert [json.loads(line)["n"] for line in lines[1:-1]] == list(range(30))
    assert os.pread(state, 1, 0) == b"\x00"
    os.close(state)
    os.close(lock)


def test_writers_append_whole_records_to_a_shared_file(tmp_path: Path) -> None:
    lock = lock_file(tmp_path)
    out = os.open(tmp_path / "out.jsonl", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    writers = [spawn_writer(out, lock, wid, 200, [80, 9000, 70_000]) for wid in range(3)]
    for p in writers:
        assert p.wait(timeout=t(60)) == 0
        assert p.stderr is not None
        p.stderr.close()
    os.close(out)
    seen: dict[int, list[int]] = {wid: [] for wid in range(3)}
    for line in (tmp_path / "out.jsonl").read_bytes().splitlines():
        record = json.loads(line)
        seen[record["w"]].append(record["n"])
    assert seen == {wid: list(range(200)) for wid in range(3)}
    os.close(lock)


def test_the_inherited_stdout_stays_blocking(tmp_path: Path) -> None:
    """The writer opens the pipe again for itself: the descriptor it shares with its parent (and
    whoever else writes there) does not become non-blocking."""
    lock = lock_file(tmp_path)
    r, w = os.pipe()
    writer = spawn_writer(w, lock, 0, 10, [100])
    data = drain(r, [writer])
    assert writer.wait(timeout=t(10)) == 0
    assert writer.stderr is not None
    writer.stderr.close()
    assert len(data.splitlines()) == 10
    assert os.get_blocking(w)
    assert not fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK
    for fd in (r, w, lock):
        os.close(fd)


def test_a_vanished_reader_is_reported_once_as_lost(tmp_path: Path) -> None:
    lock = lock_file(tmp_path)
    r, w = os.pipe()
    os.close(r)
    writer = spawn_writer(w, lock, 0, 50, [2000])
    os.close(w)
    assert writer.wait(timeout=t(10)) == 0
    assert writer.stderr is not None
    report = json.loads(writer.stderr.read())
    writer.stderr.close()
    assert len(report["lost"]) == 1 and "Broken pipe" in report["lost"][0]
    assert report["offset"] == 0
    os.close(lock)


def test_a_writer_killed_while_the_pipe_is_full_leaves_only_whole_records(tmp_path: Path) -> None:
    """Records that fit in the pipe are written only when they fit whole: however full the pipe
    is when the writer is killed, what it holds is whole records."""
    lock = lock_file(tmp_path)
    r, w = os.pipe()
    writer = spawn_writer(w, lock, 0, 5000, [30_000, 20_000, 500])
    os.close(w)
    os.set_blocking(r, False)
    # Nobody reads until the pipe is full and the writer waits with records in its buffer.
    size = fcntl.fcntl(r, 1032)  # F_GETPIPE_SZ
    deadline = time.monotonic() + t(10)
    queued = 0
    while queued < size // 2:
        assert time.monotonic() < deadline, f"the pipe never filled ({queued} of {size})"
        time.sleep(0.01)
        queued = int.from_bytes(fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0"), "little")
    time.sleep(0.2)  # it tries again while the pipe stays full
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert writer.stderr is not None
    writer.stderr.close()
    data = drain(r, [writer])
    assert len(data) > size // 2
    os.close(r)
    assert data.endswith(b"\n")
    numbers = [json.loads(line)["n"] for line in data.splitlines()]
    assert numbers == list(range(len(numbers)))
    assert 0 < len(numbers) < 5000
    os.close(lock)


def test_the_supervisor_shares_only_what_the_workers_can_open_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from supervisor import relay

    r, w = os.pipe()
    a, b = socket.socketpair()
    with open(tmp_path / "out", "wb") as out, open(os.devnull, "wb") as null:
        assert relay.shares_stdout(w, "json")
        assert relay.shares_stdout(out.fileno(), "json")
        assert relay.shares_stdout(null.fileno(), "json")
        assert not relay.shares_stdout(w, "msgpack")  # a cut record could not be ended
        assert not relay.shares_stdout(b.fileno(), "json")  # a socket cannot be opened again
        monkeypatch.setattr(relay, "PROC_FD", str(tmp_path / "no-proc"))
        assert not relay.shares_stdout(w, "json")  # no /proc: relayed
        assert relay.shares_stdout(out.fileno(), "json")  # a file is written as inherited
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()


async def test_a_writer_holds_its_shards_back_while_stdout_is_full(tmp_path: Path) -> None:
    """Records keep coming while the pipe is full (the writer is waiting for room): past the
    high-water mark the writer says pause, and resume once the reader took enough."""
    import asyncio

    from spectacles_gateway.brokers import sharedout

    lock = lock_file(tmp_path)
    r, w = os.pipe()
    os.set_blocking(r, False)
    flow: list[bool] = []
    pending_at_pause: list[int] = []

    def paused(flag: bool) -> None:
        flow.append(flag)
        pending_at_pause.append(writer.pending)

    writer = sharedout.DirectWriter(
        sharedout.SharedStdout(w, lock),
        asyncio.get_running_loop(),
        repair=b"\n",
        written=lambda offset: None,
        paused=paused,
        lost=lambda exc: pytest.fail(f"lost: {exc}"),
    )
    record = b"x" * 999 + b"\n"
    for _ in range(3000):  # 3 MB, more than the pipe and the high-water mark together
        writer.write([record] * 1)
        await asyncio.sleep(0)
    assert flow == [True]
    # Said as soon as the mark was passed, not only when the writer next tried the pipe.
    assert pending_at_pause[0] <= sharedout.HIGH_WATER + len(record)
    taken = 0
    deadline = time.monotonic() + t(20)
    while writer.pending or flow[-1]:
        assert time.monotonic() < deadline, f"{writer.pending} bytes still waiting"
        try:
            taken += len(os.read(r, 1 << 16))
        except BlockingIOError:
            await asyncio.sleep(0.005)
    assert flow == [True, False]
    while True:
        try:
            taken += len(os.read(r, 1 << 16))
        except BlockingIOError:
            break
    assert taken == 3000 * len(record)
    writer.close()
    for fd in (r, w, lock):
        os.close(fd)


def test_writers_share_a_terminal(tmp_path: Path) -> None:
    """A terminal's room cannot be known: records are written in pieces under the lock, and
    still come out whole and in order (the terminal turns each newline into CR LF)."""
    import pty

    lock = lock_file(tmp_path)
    master, slave = pty.openpty()
    writers = [spawn_writer(slave, lock, wid, 60, [80, 9000, 30_000]) for wid in range(2)]
    os.close(slave)
    os.set_blocking(master, False)
    data = bytearray()
    deadline = time.monotonic() + t(60)
    while time.monotonic() < deadline:
        try:
            data += os.read(master, 1 << 16)
            continue
        except BlockingIOError:
            if all(p.poll() is not None for p in writers):
                break
            time.sleep(0.002)
        except OSError:  # EIO: every writer closed the terminal
            break
    os.close(master)
    for p in writers:
        assert p.wait(timeout=t(10)) == 0
        assert p.stderr is not None
        p.stderr.close()
    seen: dict[int, list[int]] = {0: [], 1: []}
    lines = bytes(data).split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        record = json.loads(line)
        seen[record["w"]].append(record["n"])
    assert seen == {0: list(range(60)), 1: list(range(60))}
    os.close(lock)
