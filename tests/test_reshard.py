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

import contextlib
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pika
import pytest

from spectacles_gateway.simulator import Simulator

from .gwproc import Gateway, free_port, gateway, gateway_env, metric, scrape, status
from .gwtest import ready_count, simulator, wait_until
from .support.brokers import AMQP_URL, declare_event_queue, delete_group, unique_group

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
    assert len(worst) == 48 and max(worst.values()) < 1.0, sorted(worst.values())[-5:]
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
