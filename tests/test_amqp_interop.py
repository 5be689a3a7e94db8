"""Interop with a real Spectacles consumer: ``@spectacles/brokers`` (npm) run by Node, against
``spectacles-supervise`` (a subprocess, ``BROKER_TYPE=amqp``), the simulator and RabbitMQ.

The consumer (tests/interop/consumer.js) declares the exchange and its queue itself, decodes
each message as the Spectacles libraries do (msgpack, then ``JSON.parse``) and publishes
``SEND`` commands the way a Spectacles bot does (``broker.publish("SEND", jsonText)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from spectacles_gateway.simulator import Close, InvalidSession

from .gwproc import gateway, gateway_env
from .gwtest import simulator, wait_until
from .support.brokers import AMQP_URL, PRESENCE, delete_group, depth, unique_group
from .test_consumers import node_for

INTEROP = Path(__file__).resolve().parent / "interop"


@pytest.fixture(scope="module")
def node() -> str:
    return node_for(INTEROP, "@spectacles/brokers", "the Spectacles (npm) consumer")


@dataclass
class Consumer:
    process: asyncio.subprocess.Process
    records: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == kind]

    def ids(self) -> list[str]:
        return [r["id"] for r in self.of("event")]

    async def send(self, event: str, data: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"event": event, "data": data}).encode() + b"\n")
        await self.process.stdin.drain()


async def _read(stream: asyncio.StreamReader, sink: list[dict[str, Any]]) -> None:
    while line := await stream.readline():
        sink.append(json.loads(line))


@contextlib.asynccontextmanager
async def spectacles_consumer(node: str, group: str, *events: str) -> AsyncIterator[Consumer]:
    url = urlsplit(AMQP_URL)
    target = f"{url.username}:{url.password}@{url.hostname}:{url.port or 5672}"
    process = await asyncio.create_subprocess_exec(
        node,
        str(INTEROP / "consumer.js"),
        target,
        group,
        *events,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=INTEROP,
    )
    assert process.stdout is not None
    consumer = Consumer(process)
    consumer.task = asyncio.create_task(_read(process.stdout, consumer.records))
    try:
        await wait_until(lambda: bool(consumer.of("ready") or consumer.of("error")), 20, "node")
        assert not consumer.of("error"), consumer.records
        yield consumer
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.gather(consumer.task, return_exceptions=True)


async def test_a_spectacles_consumer_reads_every_event_and_its_sends_reach_the_right_shard(
    node: str,
) -> None:
    group = unique_group()
    guilds = {0: (1234 << 22) | 99, 1: (1235 << 22) | 99}  # (guild_id >> 22) % 2
    try:
        async with simulator(shard_count=2, max_concurrency=2, rate=150) as sim:
            async with spectacles_consumer(node, group, "MESSAGE_CREATE") as consumer:
                env = gateway_env(
                    sim,
                    BROKER_TYPE="amqp",
                    BROKER_GROUP=group,
                    AMQP_URL=AMQP_URL,
                )
                async with gateway(env, "--shards", "0-1", "--shard-count", "2") as gw:
                    await wait_until(lambda: len(consumer.ids()) > 300, 20, "events in node")
                    # Two workers consume <group>:SEND: about half of these are handed on
                    # to the other worker's per-shard queue.
                    for i in range(8):
                        shard = i % 2
                        presence = dict(PRESENCE, since=i)
                        send = {"guild_id": str(guilds[shard]), "packet": {"op": 3, "d": presence}}
                        await consumer.send("SEND", json.dumps(send))
                    await wait_until(lambda: len(sim.ledger.commands) == 8, 15, "8 commands")
                    sim.pause_dispatch()
                    expected = set(sim.ledger.events_sent())
                    await wait_until(lambda: set(consumer.ids()) >= expected, 20, "all events")
                    await asyncio.sleep(0.3)
                    code = await gw.stop()
                log = gw.log()
            ids = consumer.ids()
            assert code == 0, log[-3000:]
            assert not consumer.of("error"), consumer.of("error")[:3]
            assert {r["kind"] for r in consumer.of("event")} == {"string"}  # msgpack strings
            assert len(ids) == len(set(ids)), "an event arrived twice"
            assert set(ids) == set(sim.ledger.events_sent())
            assert {r.shard_id for r in sim.ledger.commands} == {0, 1}
            for record in sim.ledger.commands:
                assert record.op == 3
                assert record.shard_id == record.d["since"] % 2, record
            assert sorted(r.d["since"] for r in sim.ledger.commands) == list(range(8))
            assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
        assert depth(f"{group}:SEND") == 0
    finally:
        delete_group(group, [f"{group}:MESSAGE_CREATE"], shards=2)


async def test_gaps_reach_a_spectacles_consumer_as_ordinary_events(node: str) -> None:
    """op 9 false and a forced re-identify (4009) each end a session: Discord will not send its
    missed events again, and a GATEWAY_GAP says so to every consumer of the exchange."""
    group = unique_group()
    try:
        async with simulator(shard_count=1, rate=50) as sim:
            events = ("MESSAGE_CREATE", "GATEWAY_GAP")
            async with spectacles_consumer(node, group, *events) as consumer:
                env = gateway_env(sim, BROKER_TYPE="amqp", BROKER_GROUP=group, AMQP_URL=AMQP_URL)
                async with gateway(env) as gw:
                    await wait_until(lambda: len(consumer.ids()) > 20, 20, "events in node")
                    first = sim.session_ids(0)[-1]
                    seq = sim.ledger.sessions_for(0)[-1].last_seq
                    sim.inject(0, InvalidSession(resumable=False))
                    await wait_until(lambda: len(sim.session_ids(0)) == 2, 20, "a new session")
                    await wait_until(lambda: len(gaps(consumer)) == 1, 20, "the first gap")
                    second = sim.session_ids(0)[-1]
                    sim.inject(0, Close(4009))  # session timed out: identify again
                    await wait_until(lambda: len(gaps(consumer)) == 2, 30, "the second gap")
                    third = sim.session_ids(0)[-1]
                    code = await gw.stop()
            assert code == 0, gw.log()[-3000:]
            one, two = gaps(consumer)
            assert (one["reason"], one["old_session"], one["new_session"]) == (
                "invalid_session",
                first,
                second,
            )
            assert one["last_seq"] >= seq and one["shard_id"] == 0 and one["generation"] == 0
            assert one["since"] <= one["until"]
            assert (two["reason"], two["old_session"], two["new_session"]) == (
                "session_closed",
                second,
                third,
            )
            assert sim.ledger.identify_count() == 3
    finally:
        delete_group(group, [f"{group}:MESSAGE_CREATE", f"{group}:GATEWAY_GAP"])


def gaps(consumer: Consumer) -> list[dict[str, Any]]:
    return [r["fields"] for r in consumer.of("event") if r["event"] == "GATEWAY_GAP"]
