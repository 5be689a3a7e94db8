"""Fleet mode through real process trees (issue 11): several ``spectacles-supervise --fleet``
members share one bot's shards through the real Redis, against the simulator.

Each member writes its events to its own stdout (the stdio broker); a member's output is read as
it comes, with the time it arrived, so "nothing lost" is the union of every member's output
against what the simulator sent, and "publishes nothing after it woke" is checked by time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from spectacles_gateway.simulator import Simulator

from .gwproc import BIN, free_port, gateway_env
from .gwproc import status as http_status
from .gwtest import ready_count, simulator, t, wait_until

REDIS_URL = os.environ.get("TEST_REDIS_URL", "127.0.0.1:6379")
LEASE = 4.0


@dataclass
class Member:
    name: str
    port: int
    process: asyncio.subprocess.Process
    records: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def log(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")

    def owned(self) -> set[int]:
        try:
            info = http_status(self.port)
        except OSError:
            return set()
        owners = info.get("fleet", {}).get("owners", {})
        return {int(s) for s, o in owners.items() if o["member"] == self.name}

    def signal_tree(self, sig: int) -> None:
        os.killpg(self.process.pid, sig)  # the member runs in a session of its own


async def _read(member: Member) -> None:
    assert member.process.stdout is not None
    while line := await member.process.stdout.readline():
        member.records.append((time.monotonic(), json.loads(line)))


async def _drain(stream: asyncio.StreamReader, sink: list[bytes]) -> None:
    while chunk := await stream.read(65536):
        sink.append(chunk)


class Fleet:
    def __init__(self, sim: Simulator, prefix: str, redis_url: str = REDIS_URL) -> None:
        self.sim = sim
        self.prefix = prefix
        self.redis_url = redis_url  # a redis+sentinel:// URL in test_sentinel_fleet.py
        self.members: dict[str, Member] = {}

    async def start(self, name: str, **extra: str) -> Member:
        port = free_port()
        env = gateway_env(
            self.sim,
            SHARD_STORE_TYPE="redis",
            SHARD_STORE_PREFIX=self.prefix,
            REDIS_URL=self.redis_url,
            FLEET_NAME="test",
            FLEET_MEMBER=name,
            FLEET_LEASE=f"{LEASE}s",
            SUPERVISOR_WORKERS="2",
            PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
            **extra,
        )
        process = await asyncio.create_subprocess_exec(
            str(BIN / "spectacles-supervise"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            limit=1 << 24,
            start_new_session=True,
        )
        member = Member(name, port, process)
        assert process.stderr is not None
        member.tasks = [
            asyncio.create_task(_read(member)),
            asyncio.create_task(_drain(process.stderr, member.stderr)),
        ]
        self.members[name] = member
        return member

    def ids(self) -> list[str]:
        return [
            r["data"]["id"]
            for m in self.members.values()
            for _, r in m.records
            if r["event"] == "MESSAGE_CREATE"
        ]

    def ownership(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for member in self.members.values():
            if member.process.returncode is None:
                for shard in member.owned():
                    out.setdefault(shard, []).append(member.name)
        return out

    def logs(self) -> str:
        return "\n".join(f"--- {m.name}\n{m.log()[-3000:]}" for m in self.members.values())

    async def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for member in self.members.values():
            if member.process.returncode is None:
                member.process.send_signal(signal.SIGTERM)
        for name, member in self.members.items():
            try:
                codes[name] = await asyncio.wait_for(member.process.wait(), t(30))
            except TimeoutError:
                member.signal_tree(signal.SIGKILL)
                codes[name] = await member.process.wait()
            await asyncio.gather(*member.tasks, return_exceptions=True)
        return codes


@contextlib.asynccontextmanager
async def fleet(shards: int = 12, rate: float = 30, **config: Any) -> AsyncIterator[Fleet]:
    prefix = f"fleet-{uuid.uuid4().hex[:10]}:"
    r = redis.Redis.from_url(f"redis://{REDIS_URL}")
    config.setdefault("max_concurrency", shards)
    try:
        async with simulator(shard_count=shards, rate=rate, **config) as sim:
            group = Fleet(sim, prefix)
            try:
                yield group
            finally:
                for member in group.members.values():
                    if member.process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            member.signal_tree(signal.SIGKILL)
                        await member.process.wait()
    finally:
        for key in r.scan_iter(f"{prefix}*"):
            r.delete(key)
        r.close()


def owned_once(group: Fleet, shards: int, members: int) -> bool:
    owners = group.ownership()
    return (
        len(owners) == shards
        and all(len(v) == 1 for v in owners.values())
        and len({v[0] for v in owners.values()}) == members
    )


def sessions_stored(group: Fleet, shards: set[int]) -> bool:
    """Every one of ``shards`` has a session in Redis: stopping its member now must resume it."""
    with redis.Redis.from_url(f"redis://{REDIS_URL}") as r:
        return all(r.get(f"{group.prefix}{s}session") for s in shards)


def resumed_after(sim: Simulator, shard: int, since: float) -> float | None:
    times = [
        r.time for r in sim.ledger.resumes if r.shard_id == shard and r.success and r.time > since
    ]
    return min(times) if times else None


async def all_events_out(group: Fleet) -> Counter[str]:
    group.sim.pause_dispatch()
    sent = set(group.sim.ledger.events_sent())
    await wait_until(lambda: set(group.ids()) >= sent, 30, "every event on some member's stdout")
    return Counter(group.ids())


@pytest.mark.slow
async def test_kill9_of_a_member_its_shards_resume_elsewhere_within_the_lease() -> None:
    async with fleet() as group:
        for name in ("a", "b", "c"):
            await group.start(name)
        sim = group.sim
        await wait_until(lambda: ready_count(sim.ledger) == 12, 30, "12 shards ready", group.logs)
        await wait_until(
            lambda: (
                owned_once(group, 12, 3)
                and all(len(m.owned()) == 4 for m in group.members.values())
            ),
            30,
            "each shard owned once, 4 each",
            group.logs,
        )
        victim = group.members["c"]
        lost = victim.owned()
        assert len(lost) == 4
        await wait_until(lambda: len(group.ids()) > 500, 20, "events flowing")
        await wait_until(lambda: sessions_stored(group, lost), 10, "sessions saved")
        killed = time.monotonic()
        victim.signal_tree(signal.SIGKILL)  # the supervisor, its workers and its agent
        await wait_until(
            lambda: all(resumed_after(sim, s, killed) for s in lost),
            LEASE + 10,
            "the victim's shards resumed elsewhere",
            group.logs,
        )
        delays = [resumed_after(sim, s, killed) - killed for s in lost]  # type: ignore[operator]
        assert max(delays) <= t(LEASE + 5), delays
        await wait_until(lambda: owned_once(group, 12, 2), 10, "owned once by the living")
        counts = await all_events_out(group)
        codes = await group.stop()
        assert codes["a"] == codes["b"] == 0, group.logs()
        assert sim.ledger.identify_count() == 12  # no shard identified again
        duplicates = sum(n - 1 for n in counts.values())
        print(f"kill -9: resumed after {sorted(round(d, 2) for d in delays)} s, {duplicates} dups")


@pytest.mark.slow
async def test_a_paused_member_is_taken_over_and_publishes_nothing_after_it_wakes() -> None:
    async with fleet() as group:
        for name in ("a", "b", "c"):
            await group.start(name)
        sim = group.sim
        await wait_until(lambda: owned_once(group, 12, 3), 40, "each shard owned once", group.logs)
        sleeper = group.members["c"]
        taken = sleeper.owned()
        await wait_until(lambda: len(group.ids()) > 300, 20, "events flowing")
        await wait_until(lambda: sessions_stored(group, taken), 10, "sessions saved")
        r = redis.Redis.from_url(f"redis://{REDIS_URL}")
        sleeper.signal_tree(signal.SIGSTOP)
        stopped = time.monotonic()
        last_seq = {s: sim.ledger.sessions_for(s)[-1].last_seq for s in taken}
        await wait_until(
            lambda: all(resumed_after(sim, s, stopped) for s in taken),
            LEASE + 10,
            "takeover",
            lambda: f"{taken}\n{group.logs()}",
        )
        await asyncio.sleep(max(0.0, stopped + 2 * LEASE - time.monotonic()))
        sleeper.signal_tree(signal.SIGCONT)
        woke = time.monotonic()
        keys = {s: (f"{group.prefix}{s}session", f"{group.prefix}{s}seq") for s in taken}
        stored = {s: r.mget(k) for s, k in keys.items()}
        # Once awake, the sleeper is a live member again and rebalancing may hand it shards
        # back under new leases: what it must never do is use the leases it lost.
        regained: dict[int, float] = {}
        watched_until = woke + t(3 * LEASE)
        looked = woke  # the lease was not the sleeper's when we last looked, at this time
        while time.monotonic() < watched_until:
            now = time.monotonic()
            for s in taken:  # a new lease of its own, straight from Redis
                value = r.get(f"{group.prefix}fleet:test:lease:{s}")
                if value is not None and value.startswith(b"c "):
                    # Taken since we last looked (not when we noticed: its events may have
                    # been read meanwhile).
                    regained.setdefault(s, looked)
            looked = now
            for s, k in keys.items():
                session, seq = r.mget(k)
                if s not in regained:
                    assert session == stored[s][0], "the sleeper overwrote a session"
                    assert int(seq or 0) >= int(stored[s][1] or 0), "a stored seq went backwards"
                stored[s] = (session, seq)
            await asyncio.sleep(0.02)
        late = [
            (rec["shard_id"], rec["seq"])
            for at, rec in sleeper.records
            if at > woke
            and rec["shard_id"] in taken
            and rec["seq"] > last_seq[rec["shard_id"]]
            and at < regained.get(rec["shard_id"], float("inf"))
        ]
        assert late == [], sleeper.log()[-6000:]
        await all_events_out(group)
        await group.stop()
        r.close()
        assert sim.ledger.identify_count() == 12


@pytest.mark.slow
async def test_a_member_joins_then_one_leaves_by_handoff_without_identifying() -> None:
    async with fleet() as group:
        for name in ("a", "b", "c"):
            await group.start(name)
        sim = group.sim
        await wait_until(lambda: owned_once(group, 12, 3), 40, "each shard owned once", group.logs)
        await group.start("d")  # a fourth member: shards move to it one at a time
        await wait_until(
            lambda: (
                owned_once(group, 12, 4) and all(len(group.members[m].owned()) == 3 for m in "abcd")
            ),
            60,
            "3 shards each",
            group.logs,
        )
        assert sim.ledger.identify_count() == 12
        leaving = group.members["b"]
        moving = leaving.owned()
        termed = time.monotonic()
        leaving.process.send_signal(signal.SIGTERM)
        await wait_until(
            lambda: all(resumed_after(sim, s, termed) for s in moving), 10, "handed off"
        )
        delays = [resumed_after(sim, s, termed) - termed for s in moving]  # type: ignore[operator]
        assert max(delays) <= t(2.0), (delays, group.logs())
        assert await asyncio.wait_for(leaving.process.wait(), t(20)) == 0
        await all_events_out(group)
        codes = await group.stop()
        assert set(codes.values()) == {0}, group.logs()
        assert sim.ledger.identify_count() == 12  # joins and leaves cost no identify
        print(f"TERM: handed off and resumed after {sorted(round(d, 2) for d in delays)} s")


@pytest.mark.slow
async def test_the_members_share_one_session_start_budget() -> None:
    # Discord says 6 session starts are left today; each member reads that at start. Together
    # they must not start more than 6: the budget is kept in Redis for the whole fleet.
    async with fleet() as group:
        group.sim.set_session_start_limit(remaining=6, total=1000, reset_after_ms=3_600_000)
        for name in ("a", "b"):
            await group.start(name)
        sim = group.sim
        await wait_until(lambda: owned_once(group, 12, 2), 40, "each shard owned", group.logs)
        await wait_until(lambda: ready_count(sim.ledger) == 6, 40, "6 shards ready", group.logs)
        await wait_until(
            lambda: "session start budget is spent" in group.logs(), 20, "said", group.logs
        )
        await asyncio.sleep(3)  # nobody identifies beyond the budget meanwhile
        outcomes = [r.outcome for r in sim.ledger.identifies]
        await group.stop()
    assert outcomes == ["ready"] * 6, outcomes  # none refused by Discord for want of budget


@pytest.mark.slow
async def test_commands_for_a_shard_reach_whichever_member_runs_it() -> None:
    from .support.brokers import AMQP_URL, delete_group, publish, unique_group

    queue_group = unique_group()
    amqp = {"BROKER_TYPE": "amqp", "BROKER_GROUP": queue_group, "AMQP_URL": AMQP_URL}
    try:
        async with fleet(shards=4, rate=5) as group:
            for name in ("a", "b"):
                await group.start(name, **amqp)
            sim = group.sim
            await wait_until(lambda: owned_once(group, 4, 2), 40, "owned", group.logs)
            await wait_until(lambda: ready_count(sim.ledger) == 4, 40, "ready", group.logs)

            def presence(mark: str) -> bytes:
                return json.dumps(
                    {"op": 3, "d": {"since": None, "activities": [], "status": mark, "afk": False}}
                ).encode()

            def got(mark: str) -> set[int]:
                return {
                    c.shard_id
                    for c in sim.ledger.commands
                    if c.op == 3 and isinstance(c.d, dict) and c.d.get("status") == mark
                }

            # A bare packet on <group>:<shard> reaches that shard, whichever member runs it.
            for shard in range(4):
                publish("", f"{queue_group}:{shard}", presence("idle"))
            await wait_until(lambda: got("idle") == {0, 1, 2, 3}, 20, "4 shards got it")
            # A leaves: its shards move to b by handoff, and so do their command queues.
            a = group.members["a"]
            a.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(a.process.wait(), 30) == 0
            await wait_until(lambda: len(group.members["b"].owned()) == 4, 20, "b owns 4")
            for shard in range(4):
                publish("", f"{queue_group}:{shard}", presence("dnd"))
            await wait_until(lambda: got("dnd") == {0, 1, 2, 3}, 20, "4 shards got it again")
            await group.stop()
    finally:
        delete_group(queue_group, shards=4)
