"""Hostile command bodies through RabbitMQ into a running worker (issue 10), with hypothesis.

Each example publishes one body, to ``<group>:SEND`` or to the per-shard queue of the worker's
shard, and waits until RabbitMQ got its ``basic.ack``. Whatever the body (random bytes, broken
msgpack, JSON nested 50,000 deep, 300 KB, every key of a command with every wrong type), nothing
raises out of the broker's and the worker's boundaries: the consumer and the connection stay up,
every delivery is acknowledged exactly once (the channel's ``basic_ack`` is counted by delivery
tag; a second ack of a tag would also close the channel), and each body has exactly one outcome:
dropped and counted in ``gateway_input_dropped_total{source="amqp"}``, written to the shard's
websocket (the simulator's ledger), or handed on to shard 1's queue.

``FUZZ_EXAMPLES`` examples per property (200 by default).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any

import pika
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from spectacles_gateway.simulator import Simulator

from .gwtest import running_worker, simulator
from .support.brokers import (
    AMQP_URL,
    FUZZ_EXAMPLES,
    LoopThread,
    amqp_broker,
    delete_group,
    depth,
    dropped_by_reason,
    dropped_since,
    fuzz_settings,
    packet_bodies,
    send_bodies,
    unique_group,
)

#: Found by reading and kept: non-ASCII digits that pass str.isdigit() (issue 10), deep nesting.
KNOWN = [
    ("SEND", '{"guild_id":"²³","packet":{"op":3,"d":{}}}'.encode()),
    ("SEND", b"[" * 10_000 + b"]" * 10_000),
    ("0", b'{"op":3,"d":' * 5_000 + b"1" + b"}" * 5_000),
]


class Harness:
    """Simulator (2 shards) -> worker running shard 0 -> AMQP broker -> RabbitMQ, on a loop
    thread; bodies published from this thread."""

    def __init__(self, loop: LoopThread, group: str) -> None:
        self.loop = loop
        self.group = group
        self.sim: Simulator = loop.enter(
            simulator(shard_count=2, max_concurrency=2, send_limit=(10**6, 60.0))
        )
        self.broker = amqp_broker(group, (0,))
        self.worker, _ = loop.enter(
            running_worker(self.sim, (0,), broker=self.broker, send_limit=10**6, send_period=60.0)
        )
        loop.wait(self._ready, 10, "shard 0 ready and the broker connected")
        self.acks: Counter[int] = Counter()
        channel = self.broker.link.command_channel
        ack = channel.basic_ack

        def counted(delivery_tag: int, *args: Any, **kwargs: Any) -> None:
            self.acks[delivery_tag] += 1
            ack(delivery_tag, *args, **kwargs)

        channel.basic_ack = counted  # a spy: what RabbitMQ is told, by delivery tag
        self.before = dropped_by_reason("amqp")
        self.fed = 0
        self.publisher = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.publisher.channel()
        self.channel.confirm_delivery()
        # Shard 1's queue, as its worker would declare it (nobody consumes it here).
        self.channel.queue_declare(f"{group}:1", durable=True)
        self.channel.queue_bind(f"{group}:1", group, "1")

    def _ready(self) -> bool:
        runner = self.worker.runners.get(0)
        return runner is not None and bool(runner.ready) and self.broker.connected

    def feed(self, key: str, body: bytes) -> None:
        self.channel.basic_publish(self.group, key, body)
        self.fed += 1
        fed = self.fed
        self.loop.wait(lambda: sum(self.acks.values()) >= fed, 10, f"the ack of {body[:80]!r}")

    def outcomes(self) -> tuple[float, int, int]:
        dropped = sum(dropped_since(self.before, "amqp").values())
        forwarded = depth(f"{self.group}:1")
        return dropped, len(self.sim.ledger.commands), forwarded

    def check(self) -> None:
        """Every body had exactly one outcome; every delivery was acked once; nothing broke."""
        with contextlib.suppress(AssertionError):
            self.loop.wait(lambda: sum(self.outcomes()) >= self.fed, 10, "every outcome")
        dropped, sent, forwarded = self.outcomes()
        assert dropped + sent + forwarded == self.fed, (dropped, sent, forwarded, self.fed)
        assert sum(self.acks.values()) == self.fed and set(self.acks.values()) == {1}
        assert self.broker.reconnects == 0 and self.broker.connected
        assert self._ready()
        assert self.sim.ledger.violations == []
        assert dropped_since(self.before, "amqp").get("internal_error", 0) == 0
        print(
            f"amqp fuzz: {self.fed} bodies: {dropped:.0f} dropped "
            f"{dict(sorted(dropped_since(self.before, 'amqp').items()))}, {sent} sent, "
            f"{forwarded} handed on"
        )

    def close(self) -> None:
        self.publisher.close()


@pytest.fixture
def harness() -> Any:
    group = unique_group()
    try:
        with LoopThread() as loop:
            h = Harness(loop, group)
            try:
                yield h
            finally:
                h.close()
        # The consumer is gone: anything not acked would be back in the queues.
        assert depth(f"{group}:SEND") == 0 and depth(f"{group}:0") == 0
    finally:
        delete_group(group)


def test_hostile_bodies_are_each_acked_once_and_dropped_or_sent(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    bodies = st.one_of(
        st.tuples(st.just("SEND"), send_bodies), st.tuples(st.just("0"), packet_bodies)
    )

    @fuzz_settings()
    @given(bodies)
    def feed(item: tuple[str, bytes]) -> None:
        harness.feed(*item)

    for item in KNOWN:
        feed = example(item)(feed)
    caplog.set_level(logging.WARNING)
    feed()
    harness.check()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert harness.fed >= len(KNOWN) + FUZZ_EXAMPLES // 2  # hypothesis did run
