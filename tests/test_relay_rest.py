"""The stdio relay reads a busy worker pipe in batches (issue 14).

A worker writing one record per millisecond used to wake the supervisor once per record; now
the pipe rests for :data:`~supervisor.relay.REST` after a short read and the next read takes
all it holds. Records still come out whole, in order, and none is lost; a stream too fast to
rest is read without rests.
"""

from __future__ import annotations

import os
import selectors
import threading
import time
from collections.abc import Callable

import pytest

from supervisor import relay as relay_module
from supervisor.relay import REST, StdioRelay
from supervisor.slots import WorkerSlot

from .gwtest import t


def record(i: int, size: int = 0) -> bytes:
    return b'{"event":"X","shard_id":0,"seq":%d,"generation":0,"data":"%b"}\n' % (i, b"x" * size)


def run_relay(
    monkeypatch: pytest.MonkeyPatch, write: Callable[[int], None]
) -> tuple[bytes, int, float, int]:
    """Relay what ``write(fd)`` writes to a worker pipe; (what reached our stdout, reads of the
    worker pipe, seconds it took, times the pipe was left to rest)."""
    selector = selectors.DefaultSelector()
    out_r, out_w = os.pipe()
    os.set_blocking(out_r, False)
    relay = StdioRelay(selector, "json", out_w, lambda exc: None)
    worker_r, worker_w = os.pipe()
    relay.attach(WorkerSlot(index=0, shards=(0,)), os.fdopen(worker_r, "rb", buffering=0))
    reads = [0]
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        if fd == worker_r:
            reads[0] += 1
        return real_read(fd, n)

    monkeypatch.setattr(relay_module.os, "read", counting_read)

    def writer() -> None:
        write(worker_w)
        os.close(worker_w)

    thread = threading.Thread(target=writer)
    started = time.monotonic()
    thread.start()
    out = bytearray()
    deadline = started + t(30)
    source = relay._sources[0]
    rests = 0
    while (source.open or relay.out) and time.monotonic() < deadline:
        now = time.monotonic()
        before = relay.next_wake()
        relay.wake(now)
        for key, mask in selector.select(0.05 if before is None else max(0.0, before - now)):
            key.data(mask)
        wake = relay.next_wake()
        rests += wake is not None and wake != before
        while chunk := _read_some(out_r):
            out += chunk
    elapsed = time.monotonic() - started
    thread.join()
    while chunk := _read_some(out_r):
        out += chunk
    relay.detach(WorkerSlot(index=0, shards=(0,)))
    for fd in (out_r, out_w):
        os.close(fd)
    selector.close()
    return bytes(out), reads[0], elapsed, rests


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_records_written_one_by_one_are_read_a_few_times_a_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = [record(i) for i in range(200)]

    def write(fd: int) -> None:
        for r in records:
            os.write(fd, r)
            time.sleep(0.001)

    out, reads, elapsed, _ = run_relay(monkeypatch, write)
    assert out == b"".join(records)  # whole, in order, none lost
    # One read per rest at most (plus the first and the one that sees the end), however slow
    # the machine: before, there was a read per record.
    print(f"\n{len(records)} records in {elapsed:.3f} s: {reads} reads")
    assert reads <= elapsed / REST + 3
    assert reads < len(records) / 2


def test_a_fast_stream_is_read_without_rests(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [record(i, 1000) for i in range(8000)]  # 8 MB at once

    def write(fd: int) -> None:
        data = memoryview(b"".join(records))
        while data:
            data = data[os.write(fd, data) :]

    out, reads, elapsed, rests = run_relay(monkeypatch, write)
    assert out == b"".join(records)
    # Each read took a pipeful or more: no rest, but perhaps for the last few bytes.
    print(f"\n8 MB in {elapsed:.3f} s: {reads} reads, {rests} rests")
    assert reads >= 8 and rests <= 1
