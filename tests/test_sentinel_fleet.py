"""Redis Sentinel under the gateway (issue 11): a real master, its replica and a Sentinel
(:mod:`tests.support.sentinel`), the gateway given only ``REDIS_URL=redis+sentinel://...``.

The master fails over mid-stream, as an operator does it (``SENTINEL FAILOVER``: the old master
lives on, a replica of the new one, after a few seconds in which it still takes writes) and as a
crash does it (``kill -9`` of the master's ``redis-server``). Through both, a fleet of two
members keeps every shard: each owned by exactly one member after, no session with two live
connections at Discord for longer than the lease, no identify, and every event the simulator
sent on some member's stdout. The client follows the master promptly, and a single supervisor
(no fleet) with its store behind the Sentinel rides through too.

Each test prints its figures (``-s``): time from the failover to the product's first write on
the new master, duplicates, double-ownership seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.asyncio import Redis

from spectacles_gateway import redis_link
from spectacles_gateway.fleet.keys import FleetKeys
from spectacles_gateway.fleet.leases import LeaseBook
from spectacles_gateway.protocol.shard import Session
from spectacles_gateway.redis_link import REDIS_ERRORS, NotReplicated, master_changes, redis_client

from .gwproc import gateway, gateway_env
from .gwtest import ready_count, simulator, wait_until
from .support.redis import open_store
from .support.sentinel import SentinelSet, sentinel_set, sentinel_settings
from .test_fleet import LEASE, Fleet, all_events_out, owned_once

SHARDS = 8


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    with sentinel_set(1) as group:
        yield group


@contextlib.asynccontextmanager
async def fleet_on(group: SentinelSet, rate: float = 30) -> AsyncIterator[Fleet]:
    prefix = f"sfleet-{uuid.uuid4().hex[:10]}:"  # the servers are the test's own: no cleanup
    async with simulator(shard_count=SHARDS, rate=rate, max_concurrency=SHARDS) as sim:
        members = Fleet(sim, prefix, redis_url=group.url)
        try:
            yield members
        finally:
            for member in members.members.values():
                if member.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        member.signal_tree(9)
                    await member.process.wait()


def sessions_stored(group: SentinelSet, prefix: str) -> bool:
    with group.master() as r:
        return all(r.get(f"{prefix}{s}session") for s in range(SHARDS))


def first_write_after(group: SentinelSet, port: int, key: str, since_ms: int) -> bool:
    """A member refreshed itself in the membership hash on the server ``port`` after
    ``since_ms`` (that server's clock): the fleet writes there."""
    try:
        with group.server(port) as r:
            members = r.hgetall(key)
    except redis.RedisError:
        return False
    return any(json.loads(v)["seen"] > since_ms for v in members.values())


def redis_ms(group: SentinelSet, port: int) -> int:
    with group.server(port) as r:
        seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def publishing_overlap(members: Fleet, since: float) -> float:
    """Longest time two members both published one shard's events after ``since`` (monotonic
    arrival times of their stdout lines)."""
    spans: dict[int, dict[str, list[float]]] = {}
    for member in members.members.values():
        for at, record in member.records:
            if at >= since and record.get("event") == "MESSAGE_CREATE":
                span = spans.setdefault(record["shard_id"], {}).setdefault(member.name, [at, at])
                span[0], span[1] = min(span[0], at), max(span[1], at)
    worst = 0.0
    for by_member in spans.values():
        values = list(by_member.values())
        for i, (a0, a1) in enumerate(values):
            for b0, b1 in values[i + 1 :]:
                worst = max(worst, min(a1, b1) - max(a0, b0))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "count"),
    [
        ("sentinel-failover", 1),
        ("kill-9", 1),
        ("sigstop", 1),
        ("sentinel-failover", 3),
        ("kill-9", 3),
    ],
)
async def test_a_fleet_rides_through_a_redis_failover_mid_stream(how: str, count: int) -> None:
    with sentinel_set(count) as sentinels:
        await _ride_through(sentinels, how)


async def _ride_through(sentinels: SentinelSet, how: str) -> None:
    async with fleet_on(sentinels) as members:
        sim = members.sim
        for name in ("a", "b"):
            await members.start(name)
        await wait_until(lambda: ready_count(sim.ledger) == SHARDS, 30, "8 ready", members.logs)
        await wait_until(lambda: owned_once(members, SHARDS, 2), 30, "owned once", members.logs)
        await wait_until(lambda: len(members.ids()) > 300, 20, "events flowing")
        await wait_until(lambda: sessions_stored(sentinels, members.prefix), 10, "sessions")
        before = {s: len(sim.ledger.events_sent(s)) for s in range(SHARDS)}
        started = time.monotonic()
        if how == "sigstop":
            old = sentinels.pause_master()
        else:
            old = sentinels.failover() if how == "sentinel-failover" else sentinels.kill_master()
        new = await asyncio.to_thread(sentinels.wait_new_master, old)
        agreed = time.monotonic() - started
        if how == "sigstop":  # it wakes up a master, with clients still connected to it
            sentinels.resume(old)
        since_ms = redis_ms(sentinels, new) - round((time.monotonic() - started) * 1000)
        key = f"{members.prefix}fleet:test:members"
        await wait_until(
            lambda: first_write_after(sentinels, new, key, since_ms), 10, "writes on the new master"
        )
        wrote = time.monotonic() - started
        # Every shard streams again, each owned by exactly one member.
        await wait_until(
            lambda: all(len(sim.ledger.events_sent(s)) > before[s] + 20 for s in range(SHARDS)),
            3 * LEASE,
            "every shard streaming after the failover",
            members.logs,
        )
        await wait_until(lambda: owned_once(members, SHARDS, 2), 3 * LEASE, "owned once")
        counts: Counter[str] = await all_events_out(members)
        overlaps = sim.ledger.overlaps()
        both = publishing_overlap(members, started)
        codes = await members.stop()
        assert set(codes.values()) == {0}, members.logs()
        assert set(counts) >= set(sim.ledger.events_sent())  # 0 lost
        assert max(overlaps.values(), default=0.0) <= LEASE, overlaps
        assert both <= LEASE, both
        assert sim.ledger.identify_count() == SHARDS, members.logs()  # every shard resumed
        duplicates = sum(n - 1 for n in counts.values())
        print(
            f"{how} ({len(sentinels.sentinels)} Sentinels): they agreed after {agreed:.2f} s, the fleet wrote to the new master "
            f"after {wrote:.2f} s; {duplicates} duplicates of {len(counts)} events; "
            f"two live connections at most {max(overlaps.values(), default=0.0):.2f} s, "
            f"two members publishing one shard at most {both:.2f} s (lease {LEASE:g} s)"
        )


async def test_the_client_follows_a_sentinel_failover_at_once(sentinels: SentinelSet) -> None:
    # After SENTINEL FAILOVER the old master still takes writes until the Sentinels make it a
    # replica (seconds later); they would be lost then. Our client moves to the new master as
    # soon as the Sentinels name it, on a connection it already had.
    await _follows(sentinels)


async def test_the_client_follows_with_the_first_sentinel_dead() -> None:
    with sentinel_set(3) as sentinels:
        sentinels.kill_sentinel(0)  # the first of the URL: the client asks the others
        await _follows(sentinels)


async def _follows(sentinels: SentinelSet) -> None:
    settings = sentinel_settings(sentinels, f"follow-{uuid.uuid4().hex[:8]}:")
    client = redis_client(settings, name="test-follow")
    written = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal written
        while not stop.is_set():
            with contextlib.suppress(*REDIS_ERRORS):
                await client.set("counter", written + 1)
                written += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(writer())
    try:
        await wait_until(lambda: written > 20, 5, "writes")
        old = sentinels.failover()
        new = await asyncio.to_thread(sentinels.wait_new_master, old)

        def on_new_master() -> bool:
            with sentinels.server(new) as r:
                value = r.get("counter")
            return value is not None and int(value) >= written - 1 and written > 0

        # The old master is a replica only after several seconds: writes seen on the new
        # master before then were sent there by the client, not replicated from the old one.
        await wait_until(on_new_master, 2, "our writes on the new master")
        with sentinels.server(old) as r:
            role = r.execute_command("ROLE")[0]
        assert role == b"master", "the old master was already converted: the test proves nothing"
        assert master_changes(client) == 1
    finally:
        stop.set()
        await task
        await client.aclose()


async def test_no_write_goes_to_the_old_master_once_the_move_is_counted(
    sentinels: SentinelSet,
) -> None:
    # The contract the shard store relies on: a write sent after master_changes counted a
    # move lands on the new master. Several writers keep the pool's connections busy and idle
    # around the move; redis-py closed the idle ones in place (a writer could take one while
    # it was being closed) and reconnected a retried command to the old address.
    prefix = f"after-{uuid.uuid4().hex[:8]}:"
    settings = sentinel_settings(sentinels, prefix)
    client = redis_client(settings, max_connections=4, name="test-after")
    before: list[str] = []
    after: list[str] = []  # keys written once the move was counted
    stop = asyncio.Event()

    async def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            key = f"{prefix}w{n}:{i}"
            counted = master_changes(client) == 1
            with contextlib.suppress(*REDIS_ERRORS):
                await client.set(key, 1)
                (after if counted else before).append(key)
            await asyncio.sleep(0.001 * n)

    tasks = [asyncio.create_task(writer(n)) for n in range(6)]
    try:
        await wait_until(lambda: len(before) > 100, 5, "writes")
        old = sentinels.failover()
        new = await asyncio.to_thread(sentinels.wait_new_master, old)
        await wait_until(lambda: len(after) > 200, 5, "writes after the move was counted")
        stop.set()
        await asyncio.gather(*tasks)
        with sentinels.server(old) as r:
            role = r.execute_command("ROLE")[0]
        assert role == b"master", "the old master was already converted: the test proves nothing"
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await client.aclose()
    with sentinels.server(new) as r:
        missing = [key for key, there in zip(after, r.mget(after), strict=True) if there is None]
    assert not missing, f"{len(missing)} of {len(after)} writes went to the old master"


async def test_the_store_writes_its_sessions_again_to_a_new_master(
    sentinels: SentinelSet,
) -> None:
    # What the old master took and never passed on is missing on the new one (emulated by
    # deleting a shard's keys there): once the store finds the master moved, it writes every
    # session it holds again, not only the one it was saving.
    settings = sentinel_settings(sentinels, f"store-{uuid.uuid4().hex[:8]}:")
    async with open_store(settings) as store:
        await store.save(0, 2, Session("zero", 5, "wss://resume.example"))
        await store.save(1, 2, Session("one", 7, None))
        await asyncio.to_thread(sentinels.wait_replica_synced)  # both on the replica too
        old = sentinels.failover()
        new = await asyncio.to_thread(sentinels.wait_new_master, old)
        with sentinels.server(new) as r:
            assert r.get(store.keys(0)[0]) == b"zero"  # replicated before the failover
            r.delete(*store.keys(0))
        await store.save(1, 2, Session("one", 8, None))  # the pool asks the Sentinels
        await wait_until(lambda: master_changes(store.client) == 1, 5, "the master moved")
        await store.save(1, 2, Session("one", 9, None))

        def rewritten() -> bool:
            with sentinels.server(new) as r:
                return r.mget(*store.keys(0)[:3]) == [b"zero", b"5", b"wss://resume.example"]

        await wait_until(rewritten, 5, "shard 0's session on the new master again")

        def latest() -> bool:  # one pipeline writes both; a read may fall between the two
            with sentinels.server(new) as r:
                return bool(r.get(store.keys(1)[1]) == b"9")

        await wait_until(latest, 5, "shard 1's latest session on the new master")


@pytest.mark.slow
async def test_a_single_supervisor_with_its_store_behind_sentinel_survives_a_failover(
    sentinels: SentinelSet,
) -> None:
    prefix = f"ssingle-{uuid.uuid4().hex[:10]}:"
    shards = range(4)
    async with simulator(shard_count=4, rate=30, max_concurrency=4) as sim:

        def env() -> dict[str, str]:
            return gateway_env(
                sim,
                SHARD_STORE_TYPE="redis",
                SHARD_STORE_PREFIX=prefix,
                REDIS_URL=sentinels.url,
                SUPERVISOR_WORKERS="2",
            )

        async with gateway(env()) as gw:
            await wait_until(lambda: ready_count(sim.ledger) == 4, 30, "4 ready", gw.log)
            await wait_until(lambda: len(gw.ids()) > 200, 20, "events flowing")
            old = sentinels.failover()
            new = await asyncio.to_thread(sentinels.wait_new_master, old)
            floor = {s: sim.ledger.sessions_for(s)[-1].last_seq for s in shards}

            def saved_on_new() -> bool:
                with sentinels.server(new) as r:
                    seqs = [r.get(f"{prefix}{s}seq") for s in shards]
                return all(
                    v is not None and int(v) > floor[s] for s, v in zip(shards, seqs, strict=True)
                )

            await wait_until(saved_on_new, 10, "sessions saved on the new master", gw.log)
            sim.pause_dispatch()
            sent = set(sim.ledger.events_sent())
            await wait_until(lambda: set(gw.ids()) >= sent, 20, "every event out", gw.log)
            assert await gw.stop() == 0, gw.log()
            first = Counter(gw.ids())
        # A restart resumes every shard from the sessions on the new master: no identify.
        resumed = sim.ledger.resume_count(success=True)
        async with gateway(env()) as again:
            await wait_until(
                lambda: sim.ledger.resume_count(success=True) >= resumed + 4,
                30,
                "4 shards resumed",
                again.log,
            )
            assert await again.stop() == 0, again.log()
        assert sim.ledger.identify_count() == 4, again.log()
        print(f"single supervisor: {sum(n - 1 for n in first.values())} duplicates")


async def test_a_sentinel_client_waits_for_a_free_connection(sentinels: SentinelSet) -> None:
    # Like the client without Sentinel: more commands at once than the pool has connections
    # wait their turn (redis-py's Sentinel pool refused them: "Too many connections").
    settings = sentinel_settings(sentinels, f"pool-{uuid.uuid4().hex[:8]}:")
    client = redis_client(settings, max_connections=2, name="test-pool")
    try:
        replies = await asyncio.gather(
            *(client.blpop(["nothing-here"], timeout=0.05) for _ in range(12)),
            return_exceptions=True,
        )
    finally:
        await client.aclose()
    assert replies == [None] * 12


async def test_a_claim_on_a_replaced_master_is_given_back(
    sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Right after SENTINEL FAILOVER the old master still answers and takes writes, lost once it
    # is made a replica: a member that has not followed yet claims there. Its claim must not
    # count (given back, NotReplicated), nor its renewal; on the new master, alone until the
    # old one is its replica, claims count at once.
    settings = sentinel_settings(sentinels, f"claim-{uuid.uuid4().hex[:8]}:")
    keys = FleetKeys(settings.shard_store.prefix, "test")
    # Clients ask the Sentinels where the master is only when they connect, from here on.
    monkeypatch.setattr(redis_link, "MASTER_CHECK_INTERVAL", 1e9)
    late = redis_client(settings, name="test-late")
    fresh: Redis | None = None
    try:
        book = LeaseBook(late, keys, "late", 10.0)
        epochs: list[int] = []

        async def claimed() -> bool:  # the replica acknowledges it (on a loaded machine, it
            try:  # may take longer than the wait once)
                epochs.append(await book.claim(0))
            except NotReplicated:
                return False
            return True

        await wait_until(claimed, 10, "a claim the replica acknowledged")
        assert epochs[0] > 0
        old = sentinels.failover()
        new = await asyncio.to_thread(sentinels.wait_new_master, old)
        with pytest.raises(NotReplicated):
            await book.claim(1)
        with sentinels.server(old) as r:
            assert r.get(keys.lease(1)) is None, "the claim was not given back"
        with pytest.raises(NotReplicated):
            await book.renew({0: epochs[0]})
        fresh = redis_client(settings, name="test-fresh")
        other = LeaseBook(fresh, keys, "other", 10.0)
        assert await other.claim(1) == 1
        with sentinels.server(new) as r:
            assert r.get(keys.lease(1)) == b"other 1"
        with sentinels.server(old) as r:
            role = r.execute_command("ROLE")[0]
        assert role == b"master", "the old master was already converted: the test proves less"
    finally:
        await late.aclose()
        if fresh is not None:
            await fresh.aclose()


@pytest.mark.slow
async def test_the_redis_streams_broker_loses_nothing_through_a_sentinel_failover(
    sentinels: SentinelSet,
) -> None:
    prefix = f"sstreams-{uuid.uuid4().hex[:10]}:"
    async with simulator(shard_count=4, rate=60, max_concurrency=4) as sim:
        env = gateway_env(
            sim,
            SHARD_STORE_TYPE="redis",
            SHARD_STORE_PREFIX=prefix,
            BROKER_TYPE="redis",
            BROKER_FORMAT="json",
            REDIS_STREAM_PREFIX=prefix,
            REDIS_URL=sentinels.url,
            SUPERVISOR_WORKERS="2",
        )

        def streamed() -> list[str]:
            with sentinels.master() as r:
                entries = r.xrange(f"{prefix}MESSAGE_CREATE")
            return [json.loads(fields[b"data"])["id"] for _, fields in entries]

        async with gateway(env) as gw:
            await wait_until(lambda: ready_count(sim.ledger) == 4, 30, "4 ready", gw.log)
            await wait_until(lambda: len(streamed()) > 300, 20, "events in the streams", gw.log)
            old = sentinels.failover()
            new = await asyncio.to_thread(sentinels.wait_new_master, old)
            count = len(sim.ledger.events_sent())
            await wait_until(
                lambda: len(sim.ledger.events_sent()) > count + 200, 20, "more events sent"
            )
            sim.pause_dispatch()
            sent = set(sim.ledger.events_sent())
            assert sentinels.master_port() == new
            await wait_until(lambda: set(streamed()) >= sent, 20, "every event streamed", gw.log)
            ids = Counter(streamed())
            assert await gw.stop() == 0, gw.log()
        print(f"redis streams: {sum(n - 1 for n in ids.values())} duplicates of {len(ids)}")
