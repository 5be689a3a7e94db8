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
import uuid
from pathlib import Path

import redis

from .gwproc import BIN, gateway_env
from .gwtest import ready_count, simulator, t, wait_until

REDIS_URL = os.environ.get("TEST_REDIS_URL", "127.0.0.1:6379")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


async def _start(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(BIN / "spectacles-supervise"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
        limit=1 << 24,
    )


async def _read_lines(stream: asyncio.StreamReader, into: list[bytes], until_eof: bool) -> None:
    while True:
        try:
            line = await (
                stream.readline() if until_eof else asyncio.wait_for(stream.readline(), 0.05)
            )
        except TimeoutError:
            return
        if not line:
            return
        into.append(line)


def _ids(lines: list[bytes]) -> set[str]:
    out = set()
    for line in lines:
        if line.endswith(b"\n"):
            record = json.loads(line)
            if record["event"] == "MESSAGE_CREATE":
                out.add(record["data"]["id"])
    return out


async def test_a_supervisor_killed_with_events_in_its_relay_loses_none_of_them() -> None:
    prefix = f"relay-{uuid.uuid4().hex[:10]}:"
    r = redis.Redis.from_url(f"redis://{REDIS_URL}")
    try:
        async with simulator(shard_count=2, max_concurrency=2, rate=300) as sim:
            env = gateway_env(
                sim, SHARD_STORE_TYPE="redis", SHARD_STORE_PREFIX=prefix, REDIS_URL=REDIS_URL
            )
            first = await _start(env)
            assert first.stdout is not None
            lines: list[bytes] = []
            await wait_until(lambda: ready_count(sim.ledger) == 2, 30, "2 shards ready")
            reader = asyncio.create_task(_read_lines(first.stdout, lines, until_eof=True))
            await wait_until(lambda: len(lines) > 300, 20, "events on stdout")
            reader.cancel()  # the consumer stops reading: stdout fills, the relay buffers
            workers = _children(first.pid)
            await asyncio.sleep(t(3.0))  # longer than a session save (once a second)
            first.kill()  # SIGKILL: whatever the relay held dies with it
            await first.wait()
            await _read_lines(first.stdout, lines, until_eof=True)  # what reached the pipe
            for pid in workers:  # the orphaned workers save their sessions and leave
                await wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 20, "exit")
            seen_first = _ids(lines)

            second = await _start(env)
            assert second.stdout is not None
            more: list[bytes] = []
            reader = asyncio.create_task(_read_lines(second.stdout, more, until_eof=True))
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
        replayed = len(seen_first & _ids(more))
        assert replayed > 0  # what the relay held was not confirmed: Discord sent it again
        print(f"relay: {len(seen_first)} events before the kill, {replayed} replayed after it")
    finally:
        for key in r.scan_iter(f"{prefix}*"):
            r.delete(key)
        r.close()
