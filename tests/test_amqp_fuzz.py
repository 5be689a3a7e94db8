"""Hostile command bodies through RabbitMQ into a running worker (issue 10), with hypothesis.

Each example publishes one body, to ``<group>:SEND`` or to the per-shard queue of the worker's
shard, and waits until RabbitMQ got its ``basic.ack``. Whatever the body (random bytes, broken
msgpack, JSON nested 50,000 deep, 300 KB, every key of a command with every wrong type), nothing
raises out of the broker's and the worker's boundaries: the consumer and the connection stay up,
every delivery is acknowledged exactly once (the channel's ``basic_ack`` is counted by delivery
tag; a second ack of a tag would also close the channel), and each body has exactly one outcome:
dropped and counted in ``gateway_input_dropped_total{source="amqp"}``, written to the shard's
websocket (the simulator's ledger), or handed on to shard 1's queue.

``HYPOTHESIS_MAX_EXAMPLES`` examples per property (200 by default).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from hypothesis import strategies as st

from .support.brokers import (
    AMQP_URL,
    KNOWN_BODIES,
    FuzzHarness,
    LoopThread,
    amqp_broker,
    delete_group,
    depth,
    packet_bodies,
    run_fuzz,
    send_bodies,
    unique_group,
)


class Harness(FuzzHarness):
    """Bodies published to ``<group>:SEND`` or ``<group>:0`` from the test's thread."""

    what = "bodies"

    def __init__(self, loop: LoopThread, group: str) -> None:
        super().__init__(loop, amqp_broker(group, (0,)))
        self.group = group
        self.acks: Counter[int] = Counter()
        channel = self.broker.link.command_channel  # type: ignore[attr-defined]
        ack = channel.basic_ack

        def counted(delivery_tag: int, *args: Any, **kwargs: Any) -> None:
            self.acks[delivery_tag] += 1
            ack(delivery_tag, *args, **kwargs)

        channel.basic_ack = counted  # a spy: what RabbitMQ is told, by delivery tag
        self.publisher = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.publisher.channel()
        self.channel.confirm_delivery()
        # Shard 1's queue, as its worker would declare it (nobody consumes it here).
        self.channel.queue_declare(f"{group}:1", durable=True)
        self.channel.queue_bind(f"{group}:1", group, "1")

    def _write(self, target: str, record: Any) -> None:
        self.channel.basic_publish(self.group, target, record)

    def acked(self) -> int:
        return sum(self.acks.values())

    def forwarded(self) -> int:
        return depth(f"{self.group}:1")

    def check(self) -> None:
        super().check()
        assert set(self.acks.values()) == {1}  # each delivery tag acked once
        assert self.broker.reconnects == 0  # type: ignore[attr-defined]


@pytest.fixture
def harness() -> Iterator[Harness]:
    group = unique_group()
    try:
        with LoopThread() as loop:
            h = Harness(loop, group)
            try:
                yield h
            finally:
                h.publisher.close()
        # The consumer is gone: anything not acked would be back in the queues.
        assert depth(f"{group}:SEND") == 0 and depth(f"{group}:0") == 0
    finally:
        delete_group(group)


def test_hostile_bodies_are_each_acked_once_and_dropped_or_sent(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    bodies = st.one_of(
        st.tuples(st.just("SEND"), send_bodies), st.tuples(st.just("0"), packet_bodies)
    )
    run_fuzz(harness, bodies, KNOWN_BODIES)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
