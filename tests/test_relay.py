"""stdio: an event is confirmed only once the supervisor has written it to stdout (issue 10).

Before, a worker confirmed an event as soon as its own pipe took it; with the Redis store the
confirmed seq was saved while the event still sat in the supervisor's relay buffer, and a
supervisor killed then lost it for good. Now the supervisor tells each worker how far its output
reached stdout, and only that is confirmed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import uuid
from pathlib import Path

import pytest
import redis

from .gwproc import BIN, gateway_env
from .gwtest import ready_count, simulator, t, wait_until

REDIS_URL = os.environ.get("TEST_REDIS_URL", "127.0.0.1:6379")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


async def _start(
    env: dict[str, str], stdout: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(BIN / "spectacles-supervise"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
        limit=1 << 24,
    )


async def _read_lines(stream: asyncio.StreamReader, into: list[bytes]) -> None:
    while line := await stream.readline():
        into.append(line)


class RawPipe:
    """A stdout that really stops: asyncio's own pipe reader would keep reading into its buffer
    (up to twice its limit) after the test stopped looking, so the gateway would never block."""

    def __init__(self, kind: str = "pipe") -> None:
        if kind == "socket":  # a stdout the workers cannot share: the supervisor relays
            a, b = socket.socketpair()
            self.read_fd, self.write_fd = a.detach(), b.detach()
        else:
            self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.data = bytearray()

    def read_available(self) -> bool:
        """Take what the pipe holds now; False once the writer is gone and the pipe empty."""
        while True:
            try:
                chunk = os.read(self.read_fd, 1 << 16)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self.data += chunk

    def lines(self) -> list[bytes]:
        return [line + b"\n" for line in bytes(self.data).split(b"\n")[:-1]]


def _ids(lines: list[bytes]) -> set[str]:
    out = set()
    for line in lines:
        if line.endswith(b"\n"):
            record = json.loads(line)
            if record["event"] == "MESSAGE_CREATE":
                out.add(record["data"]["id"])
    return out


@pytest.mark.parametrize("stdout", ["socket", "pipe"])
async def test_a_supervisor_killed_with_events_in_its_relay_loses_none_of_them(
    stdout: str,
) -> None:
    """On a socket the supervisor relays the workers' output; on a pipe they write it
    themselves (what they still hold when the supervisor dies they write as they stop)."""
    prefix = f"relay-{uuid.uuid4().hex[:10]}:"
    r = redis.Redis.from_url(f"redis://{REDIS_URL}")
    try:
        async with simulator(shard_count=2, max_concurrency=2, rate=300) as sim:
            env = gateway_env(
                sim, SHARD_STORE_TYPE="redis", SHARD_STORE_PREFIX=prefix, REDIS_URL=REDIS_URL
            )
            pipe = RawPipe(stdout)
            first = await _start(env, stdout=pipe.write_fd)
            os.close(pipe.write_fd)
            await wait_until(lambda: ready_count(sim.ledger) == 2, 30, "2 shards ready")
            await wait_until(
                lambda: pipe.read_available() and len(pipe.lines()) > 300, 20, "events on stdout"
            )
            # The consumer stops reading: the pipe fills, the relay buffers, the workers pause.
            workers = _children(first.pid)
            await asyncio.sleep(t(3.0))  # longer than a session save (once a second)
            first.kill()  # SIGKILL: whatever the relay held dies with it
            sent_at_kill = set(sim.ledger.events_sent())
            await first.wait()
            while pipe.read_available():  # what reached the pipe
                await asyncio.sleep(0.01)
            os.close(pipe.read_fd)
            lines = pipe.lines()
            for pid in workers:  # the orphaned workers save their sessions and leave
                await wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 20, "exit")
            seen_first = _ids(lines)

            second = await _start(env)
            assert second.stdout is not None
            more: list[bytes] = []
            reader = asyncio.create_task(_read_lines(second.stdout, more))
            try:
                await wait_until(
                    lambda: sim.ledger.resume_count(success=True) >= 2, 30, "both shards resumed"
                )
                await wait_until(lambda: len(more) > 100, 20, "events after the restart")
                sim.pause_dispatch()
                sent = set(sim.ledger.events_sent())
                await wait_until(lambda: seen_first | _ids(more) >= sent, 30, "every event")
            finally:
                second.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(second.wait(), t(15)) == 0
                await reader
        assert sim.ledger.identify_count() == 2  # resumed, not identified again
        # Sent by Discord before the kill but never on stdout: held by the relay or the worker
        # behind it. None of it was confirmed, so the resume had Discord send it again.
        held = sent_at_kill - seen_first
        if stdout == "socket":
            assert held, "the relay held nothing: the test did not fill stdout"
        assert held <= _ids(more)
        replayed = len(seen_first & _ids(more))
        print(f"relay: {len(seen_first)} events before the kill, {len(held)} held, {replayed} dup")
    finally:
        for key in r.scan_iter(f"{prefix}*"):
            r.delete(key)
        r.close()


def _stdout_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/1")


async def test_workers_write_json_lines_to_the_supervisors_stdout_themselves() -> None:
    """JSON lines to a pipe: every worker writes to the supervisor's own stdout (the supervisor
    is not in the events' way); with three workers, records from 300 bytes to 120 KiB (more
    than the pipe's default size) and a consumer that stops reading for a while, every record is
    whole, each shard's seqs only go up, and every event Discord sent is there once."""
    sizes = ((300, 0.7), (6000, 0.25), (120_000, 0.05))
    async with simulator(shard_count=96, max_concurrency=96, rate=4, size_mix=sizes) as sim:
        env = gateway_env(sim, SUPERVISOR_WORKERS="3", LOG_LEVEL="warn")
        pipe = RawPipe()
        proc = await _start(env, stdout=pipe.write_fd)
        os.close(pipe.write_fd)
        try:
            await wait_until(lambda: ready_count(sim.ledger) == 96, 60, "96 shards ready")
            workers = _children(proc.pid)
            assert len(workers) == 3
            assert {_stdout_of(pid) for pid in workers} == {_stdout_of(proc.pid)}
            assert _stdout_of(proc.pid).startswith("pipe:")
            await wait_until(
                lambda: pipe.read_available() and len(pipe.lines()) > 500, 30, "events"
            )
            await asyncio.sleep(t(3.0))  # nobody reads: the pipe fills, the workers hold back
            sim.pause_dispatch()
            sent = set(sim.ledger.events_sent())
            await wait_until(
                lambda: pipe.read_available() is not None and _ids(pipe.lines()) >= sent,
                30,
                "every event sent",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), t(20)) == 0
        while pipe.read_available():
            await asyncio.sleep(0.01)
        os.close(pipe.read_fd)
    assert pipe.data.endswith(b"\n")
    records = [json.loads(line) for line in pipe.lines()]  # a torn record would not parse
    messages = [r for r in records if r["event"] == "MESSAGE_CREATE"]
    assert len(messages) == len({r["data"]["id"] for r in messages})  # none twice
    assert {r["data"]["id"] for r in messages} == sent
    last: dict[int, int] = {}
    for r in messages:
        assert r["seq"] > last.get(r["shard_id"], 0)
        last[r["shard_id"]] = r["seq"]
    assert len(last) == 96
    assert max(len(json.dumps(r)) for r in messages) > 100_000


async def test_msgpack_output_still_goes_through_the_relay() -> None:
    """msgpack cannot end a record cut by a dying worker: the supervisor relays it whole."""
    async with simulator(shard_count=2, max_concurrency=2, rate=50) as sim:
        pipe = RawPipe()
        proc = await _start(gateway_env(sim, STDIO_FORMAT="msgpack"), stdout=pipe.write_fd)
        os.close(pipe.write_fd)
        try:
            await wait_until(lambda: ready_count(sim.ledger) == 2, 30, "2 shards ready")
            await wait_until(lambda: pipe.read_available() and len(pipe.data) > 2000, 20, "out")
            workers = _children(proc.pid)
            assert workers
            assert all(_stdout_of(pid) != _stdout_of(proc.pid) for pid in workers)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), t(20)) == 0
            os.close(pipe.read_fd)
