"""The consumer examples (examples/, docs/consumers.md), each run as a real program against the
real broker, with ``spectacles-supervise`` and the simulator: it receives events, drops one
that it is handed twice (same message id), and its commands reach the simulator's shards.

- ``examples/amqp_consumer.py`` (Python, pika) and ``examples/node/consumer.js``
  (``@spectacles/brokers``) on RabbitMQ;
- ``examples/redis_streams_consumer.py`` (consumer group) on Redis streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest
import redis

from spectacles_gateway.brokers.wire import msgpack_string

from .gwproc import gateway, gateway_env
from .gwtest import simulator, wait_until
from .support.brokers import AMQP_URL, delete_group, unique_group

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
STATUS_EVERY = 20


@dataclass
class Program:
    process: asyncio.subprocess.Process
    records: list[dict[str, Any]] = field(default_factory=list)
    stderr: bytes = b""

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == kind]


async def _read(stream: asyncio.StreamReader, sink: list[dict[str, Any]]) -> None:
    while line := await stream.readline():
        sink.append(json.loads(line))


@contextlib.asynccontextmanager
async def consumer(argv: list[str], env: dict[str, str], cwd: Path) -> AsyncIterator[Program]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", ""), "STATUS_EVERY": str(STATUS_EVERY), **env},
        cwd=cwd,
    )
    assert process.stdout is not None and process.stderr is not None
    program = Program(process)
    reader = asyncio.create_task(_read(process.stdout, program.records))
    errors = asyncio.create_task(process.stderr.read())
    try:
        await wait_until(
            lambda: bool(program.of("ready") or program.of("error")) or reader.done(),
            20,
            "the consumer to subscribe",
        )
        assert program.of("ready"), (program.records, process.returncode)
        yield program
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT if argv[0] == sys.executable else signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.gather(reader, return_exceptions=True)
        program.stderr = await errors


@dataclass
class Case:
    argv: Callable[[], list[str]]
    cwd: Path
    broker: str
    #: Hands the consumer a second copy of an event it has handled (same message id).
    duplicate: Callable[[str, str, str], None]


def amqp_duplicate(group: str, _prefix: str, message_id: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        body = msgpack_string(b'{"id":"0","content":"again"}')
        properties = pika.BasicProperties(message_id=message_id, headers={"shard_id": 0})
        connection.channel().basic_publish(group, "MESSAGE_CREATE", body, properties)
    finally:
        connection.close()


def redis_duplicate(_group: str, prefix: str, message_id: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    body = msgpack_string(b'{"id":"0","content":"again"}')
    client.xadd(f"{prefix}MESSAGE_CREATE", {"data": body, "shard_id": 0, "id": message_id})
    client.close()


def node_for(folder: Path, package: str, what: str) -> str:
    """The ``node`` binary, with ``folder``'s locked npm packages installed (``npm ci``) unless
    ``package`` is there already; skips, saying ``what`` cannot run, without node."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"node is not installed: {what} cannot run")
    if not (folder / "node_modules" / package).is_dir():
        npm = shutil.which("npm")
        assert npm is not None, f"node without npm: cannot install {folder.name}"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=folder, check=True, timeout=300)
    return node


def node_argv() -> list[str]:
    node = node_for(EXAMPLES / "node", "@spectacles/brokers", "the Node example")
    return [node, "consumer.js", "MESSAGE_CREATE"]


CASES = {
    "python-pika": Case(
        lambda: [sys.executable, str(EXAMPLES / "amqp_consumer.py"), "MESSAGE_CREATE"],
        EXAMPLES,
        "amqp",
        amqp_duplicate,
    ),
    "node-spectacles-brokers": Case(node_argv, EXAMPLES / "node", "amqp", amqp_duplicate),
    "python-redis-streams": Case(
        lambda: [sys.executable, str(EXAMPLES / "redis_streams_consumer.py"), "MESSAGE_CREATE"],
        EXAMPLES,
        "redis",
        redis_duplicate,
    ),
}


def cleanup(case: Case, group: str, prefix: str) -> None:
    if case.broker == "amqp":
        delete_group(group, [f"{group}:MESSAGE_CREATE"], shards=2)
        return
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.parametrize("name", list(CASES))
async def test_consumer_example_receives_deduplicates_and_commands(name: str) -> None:
    case = CASES[name]
    argv = case.argv()
    group = unique_group()
    prefix = f"{group}:"
    if case.broker == "amqp":
        consumer_env = {"AMQP_URL": AMQP_URL, "BROKER_GROUP": group}
        gateway_extra = {"BROKER_TYPE": "amqp", "BROKER_GROUP": group, "AMQP_URL": AMQP_URL}
    else:
        consumer_env = {
            "REDIS_URL": REDIS_URL,
            "BROKER_GROUP": "bot",
            "REDIS_STREAM_PREFIX": prefix,
        }
        gateway_extra = {
            "BROKER_TYPE": "redis",
            "BROKER_GROUP": group,
            "REDIS_URL": REDIS_URL,
            "REDIS_STREAM_PREFIX": prefix,
        }
    try:
        async with simulator(shard_count=2, max_concurrency=2, rate=40) as sim:
            async with consumer(argv, consumer_env, case.cwd) as program:
                env = gateway_env(sim, **gateway_extra)
                async with gateway(env, "--shards", "0-1", "--shard-count", "2") as gw:
                    await wait_until(
                        lambda: len(program.of("event")) >= 3 * STATUS_EVERY,
                        30,
                        "events in the consumer",
                        gw.log,
                    )
                    first = program.of("event")[0]["message_id"]
                    case.duplicate(group, prefix, first)
                    await wait_until(
                        lambda: any(d["message_id"] == first for d in program.of("duplicate")),
                        15,
                        "the duplicate to be dropped",
                    )
                    await wait_until(
                        lambda: any(c.op == 3 for c in sim.ledger.commands),
                        20,
                        "a command to reach a shard",
                        gw.log,
                    )
                    code = await gw.stop()
            events = program.of("event")
            ids = [e["message_id"] for e in events]
            assert code == 0, gw.log()[-3000:]
            assert not program.of("error"), program.of("error")[:3]
            assert len(ids) == len(set(ids)), "an event was handled twice"
            assert all(e["id"] and e["shard_id"] in (0, 1) for e in events)
            assert all(re.fullmatch(r"[\w-]+:\d+", i) for i in ids), ids[:3]  # <session>:<seq>
            sent = {c.d["activities"][0]["name"] for c in sim.ledger.commands if c.op == 3}
            assert f"{STATUS_EVERY} events" in sent, sent
            for command in sim.ledger.commands:
                assert command.shard_id in (0, 1)
    finally:
        cleanup(case, group, prefix)
