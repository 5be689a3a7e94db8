"""Playing the worker's part for a broker under test, and helpers for tests against RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pika

from spectacles_gateway.brokers.amqp import AmqpBroker
from spectacles_gateway.brokers.base import Ack, Broker, Progress
from spectacles_gateway.brokers.redis_streams import RedisStreamsBroker
from spectacles_gateway.metrics import REGISTRY
from spectacles_gateway.redis_store import redis_client
from spectacles_gateway.simulator import Simulator

from ..gwtest import running_worker
from ..test_redis_store import REDIS_URL, settings_for


def _nothing(*args: object) -> None:
    return None


class Driver:
    """Takes a broker's :class:`Progress` (after each flush, and when the broker wakes us) and
    hands it to callbacks shaped like the worker's handling of it."""

    def __init__(
        self,
        broker: Broker,
        *,
        confirm: Callable[[int, str, int], None] = _nothing,
        pause: Callable[[], None] = _nothing,
        resume: Callable[[], None] = _nothing,
        commands: Callable[[bytes, Ack], None] | None = None,
        shard_commands: Callable[[int, bytes, Ack], None] | None = None,
        fail: Callable[[str], None] = _nothing,
    ) -> None:
        self.broker = broker
        self.confirm = confirm
        self.pause = pause
        self.resume = resume
        self.commands = commands
        self.shard_commands = shard_commands
        self.fail = fail
        self._scheduled = False
        broker.set_wakeup(self._wake)

    def flush(self) -> None:
        self.apply(self.broker.flush())

    def _wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        self._scheduled = False
        self.apply(self.broker.take_progress())

    def apply(self, progress: Progress | None) -> None:
        if progress is None:
            return
        for shard_id, (session, seq) in progress.confirmed.items():
            self.confirm(shard_id, session, seq)
        if progress.paused is True:
            self.pause()
        elif progress.paused is False:
            self.resume()
        for inbound in progress.commands:
            if inbound.shard_id is None:
                if self.commands is not None:
                    self.commands(inbound.body, inbound.ack)
                else:
                    inbound.ack()
            elif self.shard_commands is not None:
                self.shard_commands(inbound.shard_id, inbound.body, inbound.ack)
            else:
                inbound.ack()
        if progress.failed is not None:
            self.fail(progress.failed)


# ------------------------------------------------------------------------------ RabbitMQ

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PRESENCE = {"status": "idle", "since": None, "activities": [], "afk": False}


def unique_group() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def channel() -> Iterator[Any]:
    """A short-lived pika channel (blocking): one per operation, so any thread may use it."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def declare_event_queue(group: str, event: str = "MESSAGE_CREATE") -> str:
    """What a Spectacles consumer declares: the exchange and ``<group>:<event>`` bound."""
    queue = f"{group}:{event}"
    with channel() as ch:
        ch.exchange_declare(group, "direct", durable=True)
        ch.queue_declare(queue, durable=True)
        ch.queue_bind(queue, group, event)
    return queue


def depth(queue: str) -> int:
    with channel() as ch:
        return int(ch.queue_declare(queue, passive=True).method.message_count)


def drain(queue: str) -> list[tuple[Any, bytes]]:
    """Every message in ``queue`` as (properties, body), acked."""
    out: list[tuple[Any, bytes]] = []
    with channel() as ch:
        ch.basic_qos(prefetch_count=1000)
        for method, props, body in ch.consume(queue, inactivity_timeout=0.5):
            if method is None:
                break
            out.append((props, body))
            ch.basic_ack(method.delivery_tag)
        ch.cancel()
    return out


def publish(group: str, routing_key: str, body: bytes) -> None:
    with channel() as ch:
        ch.confirm_delivery()
        ch.basic_publish(group, routing_key, body)


def delete_group(group: str, queues: Sequence[str] = (), shards: int = 4) -> None:
    names = [*queues, f"{group}:SEND", *(f"{group}:{i}" for i in range(shards))]
    with channel() as ch:
        for name in names:
            ch.queue_delete(name)
        ch.exchange_delete(group)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def shard_ready(worker: Any, shard_id: int = 0) -> bool:
    runner = worker.runners.get(shard_id)
    return runner is not None and bool(runner.ready)


def amqp_broker(group: str, shard_ids: tuple[int, ...] = (0,), **options: Any) -> AmqpBroker:
    options.setdefault("reconnect_base", 0.1)
    options.setdefault("reconnect_cap", 1.0)
    return AmqpBroker(AMQP_URL, group=group, shard_ids=shard_ids, **options)


@contextlib.asynccontextmanager
async def gateway(
    sim: Simulator, group: str, shard_ids: tuple[int, ...] = (0,), **options: Any
) -> AsyncIterator[tuple[Any, AmqpBroker]]:
    broker = amqp_broker(group, shard_ids, **options)
    async with running_worker(sim, shard_ids, broker=broker) as (worker, _):
        yield worker, broker


# ------------------------------------------------------------------------------ Redis streams


def redis_streams_broker(prefix: str, url: str | None = None, **kwargs: Any) -> RedisStreamsBroker:
    """A streams broker on ``prefix`` (its streams, ``<prefix>SEND``, group ``gateway``) with
    its two clients, as :meth:`RedisStreamsBroker.from_settings` builds them."""
    url = url or REDIS_URL
    settings = settings_for(prefix, url=url)
    kwargs.setdefault("stream_prefix", prefix)
    kwargs.setdefault("group", "gateway")
    return RedisStreamsBroker(
        redis_client(settings), redis_client(settings, max_connections=1), url=url, **kwargs
    )
