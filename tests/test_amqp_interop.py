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
