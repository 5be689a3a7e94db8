"""Every AMQP command delivery is taken inside its own boundary (issue 10): whatever one
delivery does, it is logged with the reason, counted in ``gateway_input_dropped_total``,
acknowledged, and the consumers go on. Against the worker, the simulator and the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from spectacles_gateway.brokers.wire import msgpack_string

from .gwtest import simulator, wait_until
from .support.brokers import (
    GOOD_SEND,
    POISON,
    PRESENCE,
    amqp_broker,
    delete_group,
    depth,
    gateway,
    inject_poison,
    publish,
    sample,
    shard_ready,
    unique_group,
)


def internal_errors() -> float:
    return sample("gateway_input_dropped_total", source="amqp", reason="internal_error")


@pytest.mark.parametrize(("key", "wrap"), [("SEND", False), ("SEND", True), ("0", False)])
async def test_a_delivery_that_raises_is_logged_counted_acked_and_the_next_one_goes_on(
    key: str, wrap: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    group = unique_group()
    internal = internal_errors()
    bad = msgpack_string(POISON) if wrap else POISON
    good = GOOD_SEND if key == "SEND" else json.dumps({"op": 3, "d": PRESENCE}).encode()
    try:
        async with simulator() as sim:
            async with gateway(sim, group) as (worker, broker):
                inject_poison(broker, monkeypatch)
                await wait_until(lambda: shard_ready(worker) and broker.connected, 10, "ready")
                await asyncio.to_thread(publish, group, key, bad)
                await asyncio.to_thread(publish, group, key, good)
                await wait_until(lambda: len(sim.ledger.commands) == 1, 10, "the good command")
                assert broker.connected and broker.reconnects == 0  # the connection survived
                await wait_until(lambda: internal_errors() == internal + 1, 5, "the drop counted")
            # Both acked: nothing comes back once the consumer is gone.
            queue = f"{group}:{key}"
            assert await asyncio.to_thread(depth, queue) == 0
        assert sim.ledger.commands[0].d == PRESENCE
    finally:
        delete_group(group)
    (record,) = [r for r in caplog.records if "internal_error" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert queue in record.getMessage()
    assert "a bug that this body triggers" in caplog.text  # the reason, with its traceback


async def test_a_bug_that_ends_the_connection_task_does_not_stop_reconnecting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug of ours in the connect loop's error path (injected: the first set-up fails, and
    so does the clean-up after it) ends the task; it is started again and connects."""
    caplog.set_level(logging.WARNING)
    group = unique_group()
    broker = amqp_broker(group, connect_wait=0.1)
    connect, abandon = broker.link._connect, broker.link._abandon
    failures = {"connect": 1, "abandon": 1}

    async def failing_connect() -> Any:
        if failures["connect"]:
            failures["connect"] -= 1
            raise RuntimeError("set-up failed")
        return await connect()

    def failing_abandon() -> None:
        if failures["abandon"]:
            failures["abandon"] -= 1
            raise RuntimeError("a bug in the clean-up")
        abandon()

    monkeypatch.setattr(broker.link, "_connect", failing_connect)
    monkeypatch.setattr(broker.link, "_abandon", failing_abandon)
    try:
        await broker.start()
        await wait_until(lambda: broker.connected, 10, "a connection after the failure")
        assert failures == {"connect": 0, "abandon": 0}
        await broker.aclose()
    finally:
        delete_group(group)
    (record,) = [r for r in caplog.records if "connection task failed" in r.getMessage()]
    assert record.levelno == logging.ERROR and "a bug in the clean-up" in caplog.text
