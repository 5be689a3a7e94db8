"""The worker's rest (issue 14): after a flush its loop sleeps unless it is busy, so that events
arriving a few at a time (many shards at a few events per second each, or one shard at a few
thousand) are read one turn per rest, not one wake-up per event. Busy: the loop's thread used
more than half the time since the previous flush. A flush that carried no event never rests."""

from __future__ import annotations

import asyncio

from spectacles_gateway.plan import WorkerPlan
from spectacles_gateway.protocol.events import Dispatch
from spectacles_gateway.worker import BUSY_SHARE, FLUSH_EVENTS, FLUSH_INTERVAL, REST, Worker

from .gwtest import RecordingBroker


class CpuClock:
    """The loop thread's CPU time as the worker reads it: advanced by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_worker() -> tuple[Worker, RecordingBroker, list[float], CpuClock]:
    plan = WorkerPlan(shard_ids=(0, 1), shard_count=2, token="t", intents=0, gateway_url="wss://x/")
    broker = RecordingBroker()
    worker = Worker(plan, broker)
    slept: list[float] = []
    worker._sleep = slept.append  # what the loop would have slept, without sleeping
    cpu = worker._cpu_clock = CpuClock()
    return worker, broker, slept, cpu


async def deliver(worker: Worker, count: int, *, first_seq: int = 1) -> None:
    """``count`` events of one read, as the transport hands them over, then a turn of the
    loop for the flush the worker scheduled."""
    for seq in range(first_seq, first_seq + count):
        worker.publish(seq % 2, Dispatch("MESSAGE_CREATE", seq, b"{}", "session"))
    worker.end_of_batch(0)
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_flush_of_a_worker_that_is_not_busy_is_followed_by_a_rest() -> None:
    worker, broker, slept, _ = make_worker()
    await deliver(worker, 3)
    assert [seq for _, _, seq, _ in broker.events] == [1, 2, 3]  # out before the rest
    assert slept == [REST]
    assert 0 < REST <= 0.02 and 0 < BUSY_SHARE < 1  # latency stays small
    # However many events a flush carries: the share of CPU decides, not the count.
    await deliver(worker, FLUSH_EVENTS, first_seq=4)  # flushed in the read
    assert slept == [REST, REST]


async def test_a_busy_worker_and_an_empty_flush_never_rest() -> None:
    worker, broker, slept, cpu = make_worker()
    await deliver(worker, 1)  # the first flush: nothing measured before it, not busy
    assert slept == [REST]
    loop = asyncio.get_running_loop()
    for start in (2, 2 + FLUSH_EVENTS):
        # The thread was busy all the time since the last flush (and more: a CPU clock that
        # ran ahead of the loop's wall clock, as after a long callback).
        cpu.now += 1.0
        await deliver(worker, FLUSH_EVENTS, first_seq=start)
        assert slept == [REST]
    assert len(broker.events) == 1 + 2 * FLUSH_EVENTS
    # Busy for under the share of the time since the last flush: it rests again (the flush
    # waits for FLUSH_INTERVAL after the last one).
    since = loop.time() - worker._flushed_at
    cpu.now += BUSY_SHARE * since * 0.5
    await deliver(worker, 2, first_seq=2 + 2 * FLUSH_EVENTS)
    await asyncio.sleep(2 * FLUSH_INTERVAL)
    assert len(broker.events) == 3 + 2 * FLUSH_EVENTS
    assert slept == [REST, REST]
    worker._wake()  # the broker has news (confirms), no event was published since
    for _ in range(3):
        await asyncio.sleep(0)
    assert slept == [REST, REST]


async def test_rests_can_be_turned_off() -> None:
    worker, _, slept, _ = make_worker()
    worker.rest = 0.0
    await deliver(worker, 1)
    assert slept == []
