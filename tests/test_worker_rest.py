"""The worker's rest (issue 14): after flushing a small batch its loop sleeps, so that many
shards at a few events per second each are read one turn per rest, not one wake-up per event.
A busy worker never rests, and neither does a flush that carried no event."""

from __future__ import annotations

import asyncio

from spectacles_gateway.plan import WorkerPlan
from spectacles_gateway.protocol.events import Dispatch
from spectacles_gateway.worker import FLUSH_EVENTS, REST, REST_BELOW, Worker

from .gwtest import RecordingBroker


def make_worker() -> tuple[Worker, RecordingBroker, list[float]]:
    plan = WorkerPlan(shard_ids=(0, 1), shard_count=2, token="t", intents=0, gateway_url="wss://x/")
    broker = RecordingBroker()
    worker = Worker(plan, broker)
    slept: list[float] = []
    worker._sleep = slept.append  # what the loop would have slept, without sleeping
    return worker, broker, slept


async def deliver(worker: Worker, count: int, *, first_seq: int = 1) -> None:
    """``count`` events of one read, as the transport hands them over, then a turn of the
    loop for the flush the worker scheduled."""
    for seq in range(first_seq, first_seq + count):
        worker.publish(seq % 2, Dispatch("MESSAGE_CREATE", seq, b"{}", "session"))
    worker.end_of_batch(0)
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_small_batch_is_flushed_and_then_the_loop_rests() -> None:
    worker, broker, slept = make_worker()
    await deliver(worker, 3)
    assert [seq for _, _, seq, _ in broker.events] == [1, 2, 3]  # out before the rest
    assert slept == [REST]
    assert REST_BELOW > 1 and 0 < REST <= 0.02  # a few events per rest; latency stays small


async def test_a_busy_worker_and_an_empty_flush_never_rest() -> None:
    worker, broker, slept = make_worker()
    await deliver(worker, REST_BELOW)  # as many as make a flush worth its wake-up
    assert slept == []
    await deliver(worker, FLUSH_EVENTS, first_seq=REST_BELOW + 1)  # flushed in the read
    assert slept == []
    assert len(broker.events) == REST_BELOW + FLUSH_EVENTS
    worker._wake()  # the broker has news (confirms), no event was published since
    for _ in range(3):
        await asyncio.sleep(0)
    assert slept == []


async def test_rests_can_be_turned_off() -> None:
    worker, _, slept = make_worker()
    worker.rest = 0.0
    await deliver(worker, 1)
    assert slept == []
