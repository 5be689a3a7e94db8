"""Every Redis stream entry is taken inside its own boundary (issue 10), and the command reader
survives anything one entry does; a reader that dies anyway is started again and shows as not
connected meanwhile. Against the worker, the simulator and the real Redis.

The finding reproduced here (on abe88d8, before the broker handed commands over through
``flush()``): a ``SEND`` whose ``guild_id`` is ``"²³"`` passed ``str.isdigit()``, ``int()``
raised inside the reader, which died; the entry stayed pending, and once ``message_timeout``
had passed the next worker claimed it and its reader died too, while ``connected`` stayed True.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from redis.asyncio import Redis

from spectacles_gateway.brokers.wire import msgpack_string

from .gwtest import running_worker, simulator, wait_until
from .support.brokers import (
    GOOD_SEND,
    POISON,
    PRESENCE,
    inject_poison,
    redis_streams_broker,
    sample,
    shard_ready,
)
from .support.redis import cleanup, raw_client, unique_prefix


def dropped(reason: str) -> float:
    return sample("gateway_input_dropped_total", source="redis", reason=reason)


async def pending(r: Redis, stream: str) -> int:
    return int((await r.xpending(stream, "gateway"))["pending"])


async def test_an_entry_that_raises_is_logged_counted_acked_and_the_next_one_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    internal = dropped("internal_error")
    with cleanup(unique_prefix()) as prefix:
        send = f"{prefix}SEND"
        broker = redis_streams_broker(prefix)
        inject_poison(broker, monkeypatch)
        async with simulator() as sim, raw_client() as r:
            async with running_worker(sim, broker=broker) as (worker, _):
                await wait_until(lambda: shard_ready(worker) and broker.connected, 10, "ready")
                await r.xadd(send, {"data": POISON})
                await r.xadd(send, {"data": msgpack_string(GOOD_SEND)})
                await wait_until(lambda: len(sim.ledger.commands) == 1, 10, "the good command")
                assert dropped("internal_error") == internal + 1
                await wait_until(lambda: broker.commands.acked == 2, 5, "both acknowledged")
                assert await pending(r, send) == 0
                assert broker.connected
    assert sim.ledger.commands[0].d == PRESENCE
    (record,) = [r for r in caplog.records if "internal_error" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert send in record.getMessage()


async def test_a_claimed_entry_that_raises_leaves_the_claiming_reader_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    internal = dropped("internal_error")
    with cleanup(unique_prefix()) as prefix:
        send = f"{prefix}SEND"
        async with raw_client() as r:
            await r.xgroup_create(send, "gateway", id="0", mkstream=True)
            await r.xadd(send, {"data": POISON})
            # Another worker read it, then died before acknowledging it.
            await r.xreadgroup("gateway", "dead-host:1", {send: ">"}, count=10)
            broker = redis_streams_broker(prefix, message_timeout=0.3)
            inject_poison(broker, monkeypatch)
            async with simulator() as sim:
                async with running_worker(sim, broker=broker) as (worker, _):
                    await wait_until(lambda: shard_ready(worker), 10, "ready")
                    await wait_until(
                        lambda: dropped("internal_error") == internal + 1, 10, "the claim"
                    )
                    await r.xadd(send, {"data": GOOD_SEND})
                    await wait_until(lambda: len(sim.ledger.commands) == 1, 10, "the next one")
                    await wait_until(lambda: broker.commands.acked == 2, 5, "both acknowledged")
                    assert await pending(r, send) == 0
                    assert broker.connected


async def test_a_reader_that_fails_is_started_again_and_shows_as_not_connected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure outside any one entry (a bug of ours in the claim round, injected) ends the
    reader task: it is started again with a backoff, and until it reads again the broker (and
    so /readyz) says not connected."""
    caplog.set_level(logging.WARNING)
    failing = [True]
    with cleanup(unique_prefix()) as prefix:
        send = f"{prefix}SEND"
        broker = redis_streams_broker(prefix, message_timeout=0.3)
        claim = broker.commands._claim

        async def broken_claim() -> None:
            if failing[0]:
                raise RuntimeError("a bug in the claim round")
            await claim()

        monkeypatch.setattr(broker.commands, "_claim", broken_claim)
        async with simulator() as sim, raw_client() as r:
            async with running_worker(sim, broker=broker) as (worker, _):
                await wait_until(lambda: shard_ready(worker), 10, "ready")
                await wait_until(lambda: not broker.connected, 5, "the reader's failure shown")
                assert sample("gateway_broker_connected") == 0
                await wait_until(lambda: broker.commands.restarts >= 2, 10, "restarts")
                failing[0] = False
                await wait_until(lambda: broker.connected, 10, "the reader reading again")
                assert sample("gateway_broker_connected") == 1
                await r.xadd(send, {"data": GOOD_SEND})
                await wait_until(lambda: len(sim.ledger.commands) == 1, 10, "a command")
                await wait_until(lambda: broker.commands.acked == 1, 5, "acknowledged")
    failures = [r for r in caplog.records if "command reader failed" in r.getMessage()]
    assert failures and all(r.exc_info is not None for r in failures)
    assert "a bug in the claim round" in caplog.text


#: (reason counted, fields of a SEND entry): what one hostile client can write.
HOSTILE: list[tuple[str, dict[Any, Any]]] = [
    ("wrong_shape", {"data": b'{"guild_id":"\xc2\xb2\xc2\xb3","packet":{"op":3,"d":{}}}'}),
    ("not_json", {"data": b"[" * 10_000 + b"]" * 10_000}),
    ("not_json", {"data": b"\xff\xfe not utf-8"}),
    ("not_msgpack", {"data": b"\xdb\xff\xff\xff\xff{}"}),
    ("wrong_shape", {"not-data": b"x"}),
    ("too_large", {"data": b"x" * 70_000}),
    ("wrong_shape", {"data": b'{"packet":{"op":"3","d":{}}}'}),
    ("forbidden_op", {"data": b'{"packet":{"op":2,"d":{}}}'}),
    ("unknown_shard", {"data": b'{"shard_id":9,"packet":{"op":3,"d":{}}}'}),
]


async def test_hostile_entries_are_dropped_with_their_reason_and_intake_goes_on() -> None:
    reasons = sorted({reason for reason, _ in HOSTILE})
    before = {reason: dropped(reason) for reason in reasons}
    with cleanup(unique_prefix()) as prefix:
        send = f"{prefix}SEND"
        broker = redis_streams_broker(prefix)
        async with simulator() as sim, raw_client() as r:
            async with running_worker(sim, broker=broker) as (worker, _):
                await wait_until(lambda: shard_ready(worker), 10, "ready")
                for _, fields in HOSTILE:
                    await r.xadd(send, fields)
                await r.xadd(send, {"data": GOOD_SEND})
                await wait_until(lambda: len(sim.ledger.commands) == 1, 10, "the good command")
                await wait_until(
                    lambda: broker.commands.acked == len(HOSTILE) + 1, 5, "all acknowledged"
                )
                assert await pending(r, send) == 0
                assert broker.connected
    for reason in reasons:
        expected = sum(1 for r, _ in HOSTILE if r == reason)
        assert dropped(reason) - before[reason] == expected, reason
