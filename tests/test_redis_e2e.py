"""``spectacles-supervise`` with the Redis shard store, identify gate and streams broker, as real
process trees against the simulator and a real Redis.

Every test uses its own key prefix (store keys, identify keys and streams) and deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.asyncio import Redis

from spectacles_gateway.simulator import Simulator

from .gwproc import BIN, duration, gateway_env
from .gwtest import TOKEN, ready_count, simulator, t, wait_until
from .support.redis import (
    REDIS_URL,
    PrivateRedis,
    cleanup,
    keys_expire,
    keys_outlive_their_ttl,
    raw_client,
    unique_prefix,
)

STREAM = "MESSAGE_CREATE"


def redis_env(sim: Simulator, prefix: str, url: str = REDIS_URL, **extra: str) -> dict[str, str]:
    return gateway_env(
        sim,
        SHARD_STORE_TYPE="redis",
        SHARD_STORE_PREFIX=prefix,
        BROKER_TYPE="redis",
        REDIS_STREAM_PREFIX=prefix,
        REDIS_URL=url,
        **extra,
    )


@dataclass
class Tree:
    """A supervisor and its workers, in a session (process group) of their own."""

    process: asyncio.subprocess.Process
    stderr: list[bytes] = field(default_factory=list)
    pump: asyncio.Task[None] | None = None

    def log(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")

    def kill_tree(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def wait(self, timeout: float = 15) -> int:
        code = await asyncio.wait_for(self.process.wait(), t(timeout))
        if self.pump is not None:
            await asyncio.wait_for(self.pump, t(5))
        return code

    async def stop(self, timeout: float = 15) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.wait(timeout)


async def _pump(stream: asyncio.StreamReader, sink: list[bytes]) -> None:
    while chunk := await stream.read(65536):
        sink.append(chunk)


@contextlib.asynccontextmanager
async def supervise(env: dict[str, str], *args: str) -> AsyncIterator[Tree]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "spectacles-supervise"),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert process.stderr is not None
    tree = Tree(process)
    tree.pump = asyncio.create_task(_pump(process.stderr, tree.stderr))
    try:
        yield tree
    finally:
        tree.kill_tree()  # whatever is left of the tree, workers included
        await process.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tree.pump, t(5))


async def stream_entries(r: Redis, stream: str) -> list[dict[bytes, bytes]]:
    entries: Any = await r.xrange(stream)
    return [fields for _, fields in entries]


def message_id(fields: dict[bytes, bytes]) -> str:
    d = json.loads(msgspec.msgpack.decode(fields[b"data"]))
    return str(d["id"])


async def stream_ids(r: Redis, prefix: str) -> list[str]:
    return [message_id(f) for f in await stream_entries(r, prefix + STREAM)]


async def eventually(check: Any, timeout: float, what: str, tree: Tree | None = None) -> None:
    """Poll an async predicate that reads Redis (every 50 ms: some reads are not small)."""
    await wait_until(check, timeout, what, tree.log if tree is not None else None, interval=0.05)


async def stored_seqs(r: Redis, prefix: str, shards: range) -> dict[int, int | None]:
    values = await r.mget([f"{prefix}{i}seq" for i in shards])
    return {i: None if v is None else int(v) for i, v in zip(shards, values, strict=True)}


def written_seq(sim: Simulator, shard_id: int) -> int:
    return sim.ledger.sessions_for(shard_id)[-1].written


# ---------------------------------------------------------------------------------- tests


async def test_sigkill_of_the_whole_tree_resumes_every_shard_and_loses_nothing() -> None:
    shards = range(4)
    async with simulator(shard_count=4, max_concurrency=4, rate=100) as sim:
        with cleanup(unique_prefix()) as prefix:
            env = redis_env(sim, prefix)
            async with raw_client() as r:
                async with supervise(env) as tree:
                    await wait_until(lambda: ready_count(sim.ledger) == 4, 20, "4 READY")

                    async def seqs_stored() -> bool:
                        seqs = await stored_seqs(r, prefix, shards)
                        return all(s is not None and s > 20 for s in seqs.values())

                    await eventually(seqs_stored, 10, "confirmed seqs in Redis", tree)
                    # Kill while events are being confirmed past the seqs stored so far.
                    published = len(await stream_ids(r, prefix))

                    async def more_published() -> bool:
                        return len(await stream_ids(r, prefix)) >= published + 30

                    await eventually(more_published, 10, "more events in the stream", tree)
                    tree.kill_tree()
                    await tree.wait()
                first_log = tree.log()
                assert sim.ledger.identify_count() == 4
                resumes_before = sim.ledger.resume_count()

                async with supervise(env) as tree:
                    await wait_until(
                        lambda: sim.ledger.resume_count(success=True) - resumes_before >= 4,
                        20,
                        "a resume of every shard",
                        tree.log,
                    )
                    n = len(await stream_ids(r, prefix))

                    async def flowing() -> bool:
                        return len(await stream_ids(r, prefix)) > n + 100

                    await eventually(flowing, 10, "events after the restart", tree)
                    sim.pause_dispatch()
                    expected = set(sim.ledger.events_sent())

                    async def all_there() -> bool:
                        return set(await stream_ids(r, prefix)) >= expected

                    await eventually(all_there, 10, "every event in the stream", tree)
                    assert await tree.stop() == 0
                entries = await stream_entries(r, prefix + STREAM)
        log = first_log + tree.log()
        assert sim.ledger.identify_count() == 4, log[-3000:]  # no new identify
        for shard_id in shards:
            resumed = [x for x in sim.ledger.resumes if x.shard_id == shard_id and x.success]
            assert resumed, f"shard {shard_id} did not resume"
        assert not sim.ledger.violations
        # At least once: replays carry the same id field as the first copy.
        by_message: dict[str, set[bytes]] = defaultdict(set)
        for fields in entries:
            by_message[message_id(fields)].add(fields[b"id"])
        assert set(by_message) >= expected
        assert all(len(ids) == 1 for ids in by_message.values())
        assert "Traceback" not in log and TOKEN not in log


async def test_two_supervisors_share_one_identify_gate() -> None:
    async with simulator(shard_count=8, max_concurrency=2, rate=10) as sim:
        with cleanup(unique_prefix()) as prefix:
            env = redis_env(sim, prefix)
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with (
                supervise(env, "--shards", "0-3", "--shard-count", "8") as a,
                supervise(env, "--shards", "4-7", "--shard-count", "8") as b,
            ):
                await wait_until(
                    lambda: ready_count(sim.ledger) == 8,
                    40,
                    "8 READY",
                    lambda: a.log() + b.log(),
                )
                elapsed = loop.time() - started
                # Commands from the SEND stream reach their shard, whichever host reads them.
                async with raw_client() as r:
                    for shard_id in (1, 6):
                        body = {"shard_id": shard_id, "packet": {"op": 3, "d": {"n": shard_id}}}
                        await r.xadd(f"{prefix}SEND", {"data": json.dumps(body)})
                    await wait_until(
                        lambda: len(sim.ledger.commands) == 2, 10, "both commands", a.log
                    )

                    async def acknowledged() -> bool:
                        pending = await r.xpending(f"{prefix}SEND", "gateway")
                        return pending["pending"] == 0  # type: ignore[no-any-return]

                    await eventually(acknowledged, 5, "the commands to be acknowledged")
                assert await a.stop() == 0 and await b.stop() == 0
        assert not sim.ledger.violations, sim.ledger.violations
        assert sim.ledger.identify_count() == 8
        assert sorted((c.shard_id, c.d["n"]) for c in sim.ledger.commands) == [(1, 1), (6, 6)]
        # Two buckets of four shards: three identify windows each, and not much more.
        by_bucket: dict[int, list[float]] = defaultdict(list)
        for record in sim.ledger.identifies:
            assert record.shard_id is not None
            by_bucket[record.shard_id % 2].append(record.time)
        for times in by_bucket.values():
            times.sort()
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(5.0 <= gap < 5.25 + 0.5 * t(1) for gap in gaps), gaps
        identified = [r.time for r in sim.ledger.identifies]
        assert max(identified) - min(identified) < 3 * 5.25 + t(1), identified
        assert elapsed < 3 * 5.25 + t(5), elapsed  # process start-up included


async def test_a_new_shard_count_or_an_expired_session_identifies_instead_of_resuming() -> None:
    async with simulator(shard_count=2, max_concurrency=4, rate=20) as sim:
        with cleanup(unique_prefix()) as prefix:
            async with raw_client() as r:
                env = redis_env(sim, prefix)
                async with supervise(env) as tree:
                    await wait_until(lambda: ready_count(sim.ledger) == 2, 20, "2 READY")

                    async def stored() -> bool:
                        return None not in (await stored_seqs(r, prefix, range(2))).values()

                    await eventually(stored, 10, "stored sessions", tree)
                    tree.kill_tree()
                    await tree.wait()

                # Resharded between the runs: 3 shards now, every one identifies.
                sim.config.shard_count = 3
                async with supervise(env) as tree:
                    await wait_until(lambda: ready_count(sim.ledger) == 5, 20, "3 more READY")

                    async def resharded() -> bool:
                        counts = await r.mget([f"{prefix}{i}shard_count" for i in range(3)])
                        seqs = await stored_seqs(r, prefix, range(3))
                        return counts == [b"3"] * 3 and None not in seqs.values()

                    await eventually(resharded, 10, "new sessions", tree)
                    tree.kill_tree()
                    await tree.wait()
                assert sim.ledger.resume_count() == 0, tree.log()[-3000:]

                # Away for longer than the session TTL: identify again.
                ttl = 1.0
                env = redis_env(sim, prefix, SHARD_STORE_SESSION_TTL=duration(ttl))
                async with supervise(env) as tree:
                    await wait_until(
                        lambda: sim.ledger.resume_count(success=True) == 3,
                        20,
                        "3 resumes",
                        tree.log,
                    )
                    # Keys are kept alive while we run: seen renewed, and alive past two TTLs.
                    kept = [f"{prefix}{i}{key}" for i in range(3) for key in ("session", "seq")]
                    await keys_outlive_their_ttl(r, kept, t(ttl))
                    assert None not in (await stored_seqs(r, prefix, range(3))).values()
                    tree.kill_tree()
                    await tree.wait()
                gone = [f"{prefix}0session", f"{prefix}0seq"]
                await keys_expire(r, gone, ttl + 1.0, "the session to expire with its TTL")
                assert await r.exists(f"{prefix}0session", f"{prefix}0seq") == 0
                async with supervise(env) as tree:
                    await wait_until(lambda: ready_count(sim.ledger) == 8, 20, "3 more READY")
                    assert await tree.stop() == 0
        assert sim.ledger.resume_count() == 3
        assert not sim.ledger.violations


async def test_consumer_groups_see_every_event_once_and_streams_stay_bounded() -> None:
    maxlen = 500
    async with simulator(shard_count=2, rate=200) as sim:
        with cleanup(unique_prefix()) as prefix:
            stream = prefix + STREAM
            env = redis_env(sim, prefix, REDIS_STREAM_MAXLEN=str(maxlen))
            async with raw_client() as r:
                for group in ("bot", "dashboard"):
                    await r.xgroup_create(stream, group, id="0", mkstream=True)
                seen: dict[str, list[str]] = {"bot": [], "dashboard": []}
                lengths: list[int] = []
                stop = asyncio.Event()

                async def consume(group: str, consumer: str) -> None:
                    while not stop.is_set():
                        reply: Any = await r.xreadgroup(
                            group, consumer, {stream: ">"}, count=1000, block=50
                        )
                        for _, entries in reply or ():
                            seen[group] += [message_id(f) for _, f in entries]
                            await r.xack(stream, group, *[i for i, _ in entries])
                        lengths.append(await r.xlen(stream))

                readers = [asyncio.create_task(consume(g, "c1")) for g in seen]
                try:
                    async with supervise(env) as tree:
                        await wait_until(lambda: ready_count(sim.ledger) == 2, 20, "2 READY")
                        await wait_until(
                            lambda: len(seen["bot"]) > 4 * maxlen, 20, "a long run", tree.log
                        )
                        sim.pause_dispatch()
                        expected = sorted(sim.ledger.events_sent())
                        await wait_until(
                            lambda: all(len(ids) >= len(expected) for ids in seen.values()),
                            10,
                            "the consumers",
                            tree.log,
                        )
                        assert await tree.stop() == 0

                    async def read_to_the_end() -> bool:
                        last = (await r.xinfo_stream(stream))["last-generated-id"]
                        groups: Any = await r.xinfo_groups(stream)
                        return all(
                            g["last-delivered-id"] == last and g["pending"] == 0 for g in groups
                        )

                    # Both groups read and acknowledged all the gateway wrote: a duplicate
                    # written at the end would be in ``seen`` now.
                    await eventually(read_to_the_end, 10, "the consumers to read to the end")
                finally:
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*readers), t(5))
        for ids in seen.values():
            assert sorted(ids) == expected  # every event, once, per group
        assert max(lengths) <= maxlen + 100  # trimmed by whole nodes of 100 entries
        assert not sim.ledger.violations


async def test_redis_restarted_mid_stream(private_redis: PrivateRedis) -> None:
    shards = range(2)
    async with simulator(shard_count=2, rate=150) as sim:
        prefix = unique_prefix()
        env = redis_env(sim, prefix, url=private_redis.url)
        async with supervise(env) as tree, raw_client(private_redis.url) as r:
            await wait_until(lambda: ready_count(sim.ledger) == 2, 20, "2 READY", tree.log)

            async def seqs_caught_up() -> bool:
                seqs = await stored_seqs(r, prefix, shards)
                return all(seqs[i] == written_seq(sim, i) for i in shards)

            async def published(count: int) -> bool:
                return len(await stream_ids(r, prefix)) >= count

            await eventually(lambda: published(100), 10, "events in the stream", tree)
            # 1. A restart that keeps the data (a persistent Redis): nothing may be missing.
            private_redis.stop(save=True)
            # The gateway buffers meanwhile: it has seen the outage, and events keep coming.
            during = len(sim.ledger.events_sent())
            await wait_until(
                lambda: (
                    "is unreachable" in tree.log() and len(sim.ledger.events_sent()) > during + 100
                ),
                10,
                "the outage to be noticed while events arrive",
                tree.log,
                interval=0.05,
            )
            private_redis.start()
            before = len(sim.ledger.events_sent())
            await wait_until(
                lambda: len(sim.ledger.events_sent()) > before + 100, 10, "more events"
            )
            sim.pause_dispatch()
            expected = set(sim.ledger.events_sent())

            async def all_there() -> bool:
                return set(await stream_ids(r, prefix)) >= expected

            await eventually(all_there, 15, "every event in the stream", tree)
            await eventually(seqs_caught_up, 10, "the stored seqs to catch up", tree)

            # 2. A restart that loses everything (like the machine's Redis): the sessions are
            # written again, new events flow, and SEND has its consumer group again.
            private_redis.stop(save=False)
            private_redis.start()
            after = len(sim.ledger.events_sent())
            sim.resume_dispatch()
            await wait_until(
                lambda: len(sim.ledger.events_sent()) > after + 150,
                10,
                "events after the second restart",
                tree.log,
                interval=0.05,
            )
            sim.pause_dispatch()
            await eventually(seqs_caught_up, 10, "the stored seqs after a lost dataset", tree)
            # Events published after the second restart (the earlier ones went with it).
            assert len(await stream_ids(r, prefix)) > 50
            body = {"shard_id": 1, "packet": {"op": 3, "d": {"after": "restart"}}}
            await r.xadd(f"{prefix}SEND", {"data": json.dumps(body)})
            await wait_until(lambda: len(sim.ledger.commands) == 1, 10, "a command", tree.log)
            assert await tree.stop() == 0
        log = tree.log()
        assert sim.ledger.identify_count() == 2, log[-3000:]  # the shards stayed up
        assert sim.ledger.resume_count() == 0
        assert len(sim.ledger.connections) == 2
        assert not sim.ledger.violations
        assert "Traceback" not in log
        assert log.count("is unreachable") >= 1
