"""Resharding without downtime (issue 12), through the real ``spectacles-supervise``, the
simulator's growing bot and the real RabbitMQ: the gateway reshards itself when Discord
recommends more shards or closes one with 4011, waits for the session budget, takes an operator's
request, rolls back a reshard that cannot finish, and a restart resumes the new generation.

A consumer reads RabbitMQ while it happens and keeps when each event arrived, so "nothing lost"
is every guild event the simulator emitted against what the consumer received, and "the stream
never stops" is each event's time from emission (the simulator's clock, the same monotonic clock
as ours) to its first arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pika
import pytest
import redis

from spectacles_gateway.simulator import Simulator
from spectacles_gateway.simulator.faults import InvalidSession

from .gwproc import BIN, Gateway, free_port, gateway, gateway_env, metric, scrape, status
from .gwtest import ready_count, simulator, t, wait_until
from .support.brokers import AMQP_URL, declare_event_queue, delete_group, unique_group
from .test_relay import REDIS_URL

pytestmark = pytest.mark.slow

EVENTS = ("MESSAGE_CREATE", "GATEWAY_GAP")


@dataclass
class Received:
    at: float
    event: str
    shard: int
    generation: int
    data: dict[str, Any]


@dataclass
class Consumer:
    """Reads ``<group>:<event>`` queues in a thread, as a Spectacles consumer would."""

    group: str
    received: list[Received] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)

    def run(self) -> None:
        try:
            conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            ch = conn.channel()
            ch.basic_qos(prefetch_count=2000)
            for event in EVENTS:
                ch.basic_consume(f"{self.group}:{event}", self._on_message, auto_ack=True)
            while not self.stop.is_set():
                conn.process_data_events(time_limit=0.05)
            conn.close()
        except BaseException as exc:  # reported by the test
            self.error.append(exc)

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        headers = props.headers or {}
        text = msgspec.msgpack.decode(body)
        self.received.append(
            Received(
                time.monotonic(),
                method.routing_key,
                int(headers.get("shard_id", -1)),
                int(headers.get("generation", 0)),
                json.loads(text),
            )
        )

    def ids(self) -> list[str]:
        return [r.data["id"] for r in self.received if r.event == "MESSAGE_CREATE"]

    def gaps(self) -> list[dict[str, Any]]:
        return [r.data for r in self.received if r.event == "GATEWAY_GAP"]


@contextlib.contextmanager
def consuming(group: str) -> Iterator[Consumer]:
    for event in EVENTS:
        declare_event_queue(group, event)
    consumer = Consumer(group)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        consumer.stop.set()
        thread.join(10)
        delete_group(group, [f"{group}:{e}" for e in EVENTS], shards=8)
    assert not consumer.error, consumer.error


def stalls(sim: Simulator, consumer: Consumer) -> dict[int, float]:
    """Per guild, the longest an event of it took from emission to its first arrival."""
    first: dict[str, float] = {}
    for r in consumer.received:
        if r.event == "MESSAGE_CREATE":
            first.setdefault(r.data["id"], r.at)
    worst: dict[int, float] = {}
    for uid, guild, emitted, _, got in sim.ledger.guild_events.rows():
        if got and uid in first:
            worst[guild] = max(worst.get(guild, 0.0), first[uid] - emitted)
    return worst


def log_of(gw: Gateway) -> str:
    return gw.log()[-6000:]


@contextlib.asynccontextmanager
async def growing_bot(**extra: Any) -> AsyncIterator[Simulator]:
    config: dict[str, Any] = {
        "shard_count": 4,
        "max_concurrency": 2,
        "guilds": 48,
        "guild_rate": 4.0,
        "rate": 0,
    }
    config.update(extra)
    async with simulator(**config) as sim:
        yield sim


def amqp_env(sim: Simulator, group: str, port: int, **extra: str) -> dict[str, str]:
    return gateway_env(
        sim,
        BROKER_TYPE="amqp",
        BROKER_GROUP=group,
        AMQP_URL=AMQP_URL,
        DISCORD_EVENTS="MESSAGE_CREATE",
        SUPERVISOR_WORKERS="2",
        PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
        RESHARD_CHECK_INTERVAL="1s",
        **extra,
    )


def reshard_state(port: int) -> dict[str, Any]:
    section: dict[str, Any] = status(port).get("reshard", {})
    return section


def done(port: int, outcome: str = "done") -> bool:
    try:
        last = reshard_state(port).get("last") or {}
    except OSError:
        return False
    return bool(last.get("outcome") == outcome and reshard_state(port)["state"] == "idle")


def identifies_of(sim: Simulator, count: int) -> list[Any]:
    return [r for r in sim.ledger.identifies if r.num_shards == count]


def assert_paced(records: list[Any], max_concurrency: int) -> None:
    """Discord's rule: one IDENTIFY per bucket (``shard % max_concurrency``) per 5 s."""
    by_bucket: dict[int, list[float]] = {}
    for r in records:
        by_bucket.setdefault(r.shard_id % max_concurrency, []).append(r.time)
    for times in by_bucket.values():
        times.sort()
        assert all(b - a >= 5.0 for a, b in itertools.pairwise(times)), times


# --------------------------------------------------------------------------------------------


async def test_four_shards_reshard_themselves_to_eight_when_discord_recommends_it() -> None:
    group = unique_group()
    port = free_port()
    with consuming(group) as consumer:
        async with growing_bot() as sim, gateway(amqp_env(sim, group, port)) as gw:
            await wait_until(lambda: ready_count(sim.ledger) == 4, 40, "4 shards", gw.log)
            await wait_until(lambda: len(consumer.ids()) > 400, 40, "guild events", gw.log)
            old_sessions = {s: sim.session_ids(s)[-1] for s in range(4)}
            sim.set_recommended_shards(8)
            asked = time.monotonic()
            await wait_until(lambda: done(port), 90, "the reshard", lambda: log_of(gw))
            took = time.monotonic() - asked
            info = status(port)
            # After the switch, a few seconds of the new generation alone.
            mark = len(consumer.received)
            await wait_until(lambda: len(consumer.received) > mark + 400, 20, "events after")
            sim.pause_dispatch()
            emitted = [uid for uid, *_ in sim.ledger.guild_events.rows()]
            await wait_until(
                lambda: not sim.ledger.missing_guild_events(consumer.ids()),
                20,
                "every guild event in RabbitMQ",
                lambda: f"{len(sim.ledger.missing_guild_events(consumer.ids()))} missing",
            )
            text = scrape(port)
            assert await gw.stop() == 0, log_of(gw)
    # Every guild event emitted during the whole run reached RabbitMQ at least once.
    assert emitted and not sim.ledger.missing_guild_events(consumer.ids())
    # No guild's stream stopped for more than a second, the switch included.
    worst = stalls(sim, consumer)
    assert len(worst) == 48 and max(worst.values()) < t(1.0), sorted(worst.values())[-5:]
    # Eight identifies for the new generation, by Discord's pacing; none again for the old.
    new = identifies_of(sim, 8)
    assert sorted(r.shard_id for r in new) == list(range(8))
    assert all(r.outcome == "ready" for r in new)
    assert_paced(new, 2)
    assert len(identifies_of(sim, 4)) == 4
    # The old sessions were closed with 1000 (Discord forgets them), by us.
    for shard, session in old_sessions.items():
        (last,) = [c for c in sim.ledger.connections_for(shard) if c.session_id == session][-1:]
        assert last.client_close_code == 1000, (shard, last)
    # Duplicates at the switch are counted, and told apart by their generation.
    counts = Counter(consumer.ids())
    twice = {uid for uid, n in counts.items() if n > 1}
    gens = {
        r.data["id"]: set()
        for r in consumer.received
        if r.event == "MESSAGE_CREATE" and r.data["id"] in twice
    }
    for r in consumer.received:
        if r.event == "MESSAGE_CREATE" and r.data["id"] in twice:
            gens[r.data["id"]].add(r.generation)
    assert all(g == {0, 1} for g in gens.values())
    generations = Counter(r.generation for r in consumer.received if r.event == "MESSAGE_CREATE")
    assert generations[0] > 0 and generations[1] > 0
    # Consumers were told where each old shard stopped.
    reshard_gaps = [g for g in consumer.gaps() if g["reason"] == "reshard"]
    assert sorted(g["shard_id"] for g in reshard_gaps) == [0, 1, 2, 3]
    assert {g["old_session"] for g in reshard_gaps} == set(old_sessions.values())
    assert all(g["generation"] == 0 and g["shard_count"] == 4 for g in reshard_gaps)
    # /status and /metrics describe only the new count.
    assert info["shard_count"] == 8 and info["progress"]["total"] == 8
    assert {w["generation"] for w in info["workers"]} == {1}
    assert info["reshard"]["last"]["identifies"] == 8
    assert metric(text, "gateway_generation") == 1
    assert metric(text, "gateway_reshards_total", outcome="done") == 1
    print(
        f"reshard 4 -> 8: {took:.1f} s, {len(emitted)} guild events, {len(twice)} duplicates "
        f"at the switch, worst stall {max(worst.values()):.3f} s"
    )


def stdio_env(sim: Simulator, port: int, **extra: str) -> dict[str, str]:
    return gateway_env(
        sim,
        DISCORD_EVENTS="MESSAGE_CREATE",
        SUPERVISOR_WORKERS="2",
        PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
        RESHARD_CHECK_INTERVAL="1s",
        **extra,
    )


def records(gw: Gateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.lines]


def ids(gw: Gateway) -> list[str]:
    return [r["data"]["id"] for r in records(gw) if r["event"] == "MESSAGE_CREATE"]


async def test_a_4011_on_one_shard_reshards_and_consumers_hear_of_its_gap() -> None:
    # At 4 shards every shard holds at most `limit` guilds; then the bot joins more, one shard
    # goes over, and Discord closes it with 4011 when it next identifies.
    from spectacles_gateway.simulator.guilds import guild_ids

    start = guild_ids(40, 7)
    limit = max(sum(1 for g in start if (g >> 22) % 4 == s) for s in range(4))
    port = free_port()
    async with (
        growing_bot(guilds=40, seed=7, max_guilds_per_shard=limit) as sim,
        gateway(stdio_env(sim, port)) as gw,
    ):
        await wait_until(lambda: ready_count(sim.ledger) == 4, 40, "4 shards", gw.log)
        while max(len(sim.guilds_of(s, 4)) for s in range(4)) <= limit:
            sim.add_guilds(1)
        assert max(len(sim.guilds_of(s, 8)) for s in range(8)) <= limit  # 8 shards will do
        full = max(range(4), key=lambda s: len(sim.guilds_of(s, 4)))
        first = sim.session_ids(full)[-1]
        sim.inject(full, InvalidSession(resumable=False))  # it must identify: 4011
        await wait_until(lambda: done(port), 90, "the reshard", lambda: log_of(gw))
        (dropped,) = [log for log in sim.ledger.sessions_for(full) if log.session_id == first]

        def unexplained() -> set[str]:
            """Guild events that never reached stdout, less those consumers were told of:
            emitted while no session owned the guild, or sent on the session given up after
            the last seq its GATEWAY_GAP names."""
            told = [
                r["data"]
                for r in records(gw)
                if r["event"] == "GATEWAY_GAP" and r["data"]["shard_id"] == full
            ]
            after = told[0]["last_seq"] if told else dropped.last_seq
            lost = {uid for seq, _, uid in dropped if seq > after and uid is not None}
            orphaned = set(sim.ledger.guild_events.orphaned_ids())
            return set(sim.ledger.missing_guild_events(ids(gw))) - orphaned - lost

        sim.pause_dispatch()
        await wait_until(
            lambda: not unexplained(),
            20,
            "every guild event on stdout or told of",
            lambda: f"{len(unexplained())} unexplained",
        )
        info = status(port)
        assert await gw.stop() == 0, log_of(gw)
    refused = [r for r in sim.ledger.identifies if r.outcome == "close 4011"]
    assert [r.shard_id for r in refused] == [full]
    assert info["shard_count"] == 8 and info["reshard"]["last"]["reason"] == "sharding_required"
    assert sorted(r.shard_id for r in identifies_of(sim, 8)) == list(range(8))
    # The refused shard's session ended with op 9 and was never replaced: consumers are told.
    gaps = [r["data"] for r in records(gw) if r["event"] == "GATEWAY_GAP"]
    told = [g for g in gaps if g["shard_id"] == full]
    assert len(told) == 1 and told[0]["reason"] == "invalid_session", gaps
    assert told[0]["old_session"] == first and told[0]["new_session"] == ""
    assert sorted(g["shard_id"] for g in gaps if g["reason"] == "reshard") == sorted(
        {0, 1, 2, 3} - {full}
    )
    assert "4011" in gw.log() and "resharding" in gw.log()


async def test_a_budget_too_small_waits_and_says_so_then_goes_on() -> None:
    port = free_port()
    async with (
        growing_bot() as sim,
        gateway(stdio_env(sim, port, RESHARD_BUDGET_RESERVE="50")) as gw,
    ):
        await wait_until(lambda: ready_count(sim.ledger) == 4, 40, "4 shards", gw.log)
        sim.set_session_start_limit(remaining=55, total=1000, reset_after_ms=3_600_000)
        sim.set_recommended_shards(8)  # 8 starts would leave 47: under the reserve of 50
        await wait_until(
            lambda: reshard_state(port)["state"] == "waiting_for_budget", 20, "a wait", gw.log
        )
        section = reshard_state(port)
        assert "55 starts left" in section["waiting"] and "reserve of 50" in section["waiting"]
        await wait_until(lambda: "waiting for Discord's session budget" in gw.log(), 5, "a log")
        # Nothing breaks meanwhile: the running shards go on publishing, nobody identifies.
        before = len(ids(gw))
        await asyncio.sleep(3)
        assert len(ids(gw)) > before + 100
        assert sim.ledger.identify_count() == 4
        assert status(port)["ready"] is True
        sim.set_session_start_limit(remaining=900, total=1000, reset_after_ms=3_600_000)
        await wait_until(lambda: done(port), 90, "the reshard", lambda: log_of(gw))
        assert await gw.stop() == 0, log_of(gw)
    assert len(identifies_of(sim, 8)) == 8


async def test_an_operator_reshard_that_discord_refuses_rolls_back_then_one_that_works() -> None:
    port = free_port()
    # Not a growing bot: Discord refuses (4010) any count but the recommended one.
    async with (
        simulator(shard_count=4, max_concurrency=2, rate=40) as sim,
        gateway(stdio_env(sim, port, RESHARD_POLICY="manual")) as gw,
    ):
        await wait_until(lambda: ready_count(sim.ledger) == 4, 40, "4 shards", gw.log)
        url = f"http://127.0.0.1:{port}"
        code, out, err = await reshard_cmd("--to", "5", "--url", url)
        assert (code, err) == (0, ""), out + err
        assert "accepted" in out
        await wait_until(lambda: done(port, "rolled_back"), 60, "the rollback", gw.log)
        last = reshard_state(port)["last"]
        assert last["to"] == 6  # rounded up to a multiple of max_concurrency 2
        assert "4010" in last["detail"]
        # The running generation never stopped: no identify for it, events all along.
        assert len(identifies_of(sim, 4)) == 4
        before = len(ids(gw))
        await wait_until(lambda: len(ids(gw)) > before + 100, 20, "events after the rollback")
        info = status(port)
        assert info["shard_count"] == 4 and {w["generation"] for w in info["workers"]} == {0}
        assert info["ready"] is True
        # The refused generation left nothing behind and published nothing.
        assert {r.get("generation", 0) for r in records(gw)} == {0}
        # Now a count Discord accepts: the recommendation, asked for without --to.
        sim.set_recommended_shards(8)
        code, out, err = await reshard_cmd("--url", url)
        assert code == 0, out + err
        await wait_until(lambda: done(port), 90, "the reshard", lambda: log_of(gw))
        text = scrape(port)
        assert await gw.stop() == 0, log_of(gw)
    assert metric(text, "gateway_reshards_total", outcome="rolled_back") == 1
    assert metric(text, "gateway_reshards_total", outcome="done") == 1
    assert len(identifies_of(sim, 8)) == 8


async def test_the_reshard_endpoint_answers_what_it_did() -> None:
    port = free_port()
    async with (
        simulator(shard_count=2, rate=5) as sim,
        gateway(stdio_env(sim, port, RESHARD_POLICY="manual", DISCORD_SHARD_IDS="0")) as gw,
    ):
        await wait_until(lambda: ready_count(sim.ledger) == 1, 40, "1 shard", gw.log)
        url = f"http://127.0.0.1:{port}"
        code, out, err = await reshard_cmd("--to", "4", "--url", url)
        assert code == 1 and "409" in err and "chosen by hand" in err, out + err
        code, _, err = await reshard_cmd("--to", "0", "--url", url)
        assert code == 78 and "--to" in err and ">= 1" in err
        code, _, err = await reshard_cmd("--url", "http://127.0.0.1:1")
        assert code == 1 and "no supervisor answers" in err
        assert await gw.stop() == 0


async def reshard_cmd(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "spectacles-supervise"),
        "reshard",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_restart_after_a_reshard_resumes_the_new_generation() -> None:
    prefix = f"reshard-{uuid.uuid4().hex[:10]}:"
    r = redis.Redis.from_url(f"redis://{REDIS_URL}")
    port = free_port()
    try:
        async with growing_bot() as sim:
            env = stdio_env(
                sim, port, SHARD_STORE_TYPE="redis", SHARD_STORE_PREFIX=prefix, REDIS_URL=REDIS_URL
            )
            async with gateway(env) as gw:
                await wait_until(lambda: ready_count(sim.ledger) == 4, 40, "4 shards", gw.log)
                sim.set_recommended_shards(8)
                await wait_until(lambda: done(port), 90, "the reshard", lambda: log_of(gw))
                assert await gw.stop() == 0, log_of(gw)
            assert r.get(f"{prefix}generation") == b"1 8"
            # Generation 0's sessions are gone; generation 1's are under its own keys.
            assert not list(r.scan_iter(f"{prefix}[0-9]*session"))
            assert len(list(r.scan_iter(f"{prefix}g1:*session"))) == 8
            sim.set_recommended_shards(4)  # Discord's number says 4 again: the store wins
            identified = sim.ledger.identify_count()
            async with gateway(env) as gw:
                await wait_until(
                    lambda: sim.ledger.resume_count(success=True) >= 8, 40, "8 resumes", gw.log
                )
                info = status(port)
                assert await gw.stop() == 0, log_of(gw)
            assert sim.ledger.identify_count() == identified  # resumed, none identified
            assert info["shard_count"] == 8
            assert {w["generation"] for w in info["workers"]} == {1}
            assert {r.get("generation") for r in records(gw)} == {1}
    finally:
        for key in r.scan_iter(f"{prefix}*"):
            r.delete(key)
        r.close()
