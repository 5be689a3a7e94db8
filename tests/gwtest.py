"""Shared helpers for tests that run the worker against the gateway simulator."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from spectacles_gateway.brokers.base import Broker, Progress
from spectacles_gateway.gate import LocalIdentifyGate
from spectacles_gateway.plan import WorkerPlan
from spectacles_gateway.simulator import Ledger, Simulator, SimulatorConfig
from spectacles_gateway.worker import Worker

#: One factor scales every time-based wait in the tests (slow CI: TEST_TIME_FACTOR=2).
TIME_FACTOR = float(os.environ.get("TEST_TIME_FACTOR", "1"))
TOKEN = "simulated-token"


def t(seconds: float) -> float:
    return seconds * TIME_FACTOR


class RecordingBroker(Broker):
    """Records what the worker publishes and confirms it at the end of each batch."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, str, int | None, bytes]] = []
        self._batch: dict[int, tuple[str, int]] = {}

    def publish(
        self, shard_id: int, event: str, seq: int | None, data: bytes, session: str
    ) -> None:
        self.events.append((shard_id, event, seq, data))
        if seq is not None:
            self._batch[shard_id] = (session, seq)

    def flush(self) -> Progress | None:
        for shard_id, (session, seq) in self._batch.items():
            self._confirmed(shard_id, session, seq)
        self._batch.clear()
        return self.take_progress()

    def ids(self, event: str = "MESSAGE_CREATE") -> list[str]:
        return [json.loads(d)["id"] for _, e, _, d in self.events if e == event]

    def by_event(self, event: str) -> list[dict[str, Any]]:
        return [json.loads(d) for _, e, _, d in self.events if e == event]


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str = "",
    context: Callable[[], str] | None = None,
    *,
    interval: float = 0.01,
) -> None:
    """Poll ``predicate`` (plain or async) until it holds; on timeout fail with ``what`` and the
    tail of ``context()``. ``timeout`` is scaled here, by :func:`t`: pass it unscaled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + t(timeout)
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if loop.time() > deadline:
            tail = context()[-4000:] if context is not None else ""
            raise AssertionError(f"timed out after {t(timeout):.1f} s waiting for {what}\n{tail}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def simulator(**config: Any) -> AsyncIterator[Simulator]:
    sim = Simulator(SimulatorConfig(**config))
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def plan_for(sim: Simulator, shard_ids: tuple[int, ...] = (0,), **overrides: Any) -> WorkerPlan:
    plan = WorkerPlan(
        shard_ids=shard_ids,
        shard_count=sim.config.shard_count,
        token=TOKEN,
        intents=513,
        gateway_url=sim.gateway_url,
        events=frozenset({"MESSAGE_CREATE", "GUILD_CREATE", "FUTURE_EVENT"}),
        hello_timeout=t(5.0),
        open_timeout=t(5.0),
        shutdown_timeout=t(5.0),
        max_concurrency=sim.config.max_concurrency,
    )
    return msgspec.structs.replace(plan, **overrides)


@contextlib.asynccontextmanager
async def running_worker(
    sim: Simulator,
    shard_ids: tuple[int, ...] = (0,),
    *,
    broker: Broker | None = None,
    gate: Any = None,
    **overrides: Any,
) -> AsyncIterator[tuple[Worker, RecordingBroker]]:
    plan = plan_for(sim, shard_ids, **overrides)
    recorder = broker if broker is not None else RecordingBroker()
    worker = Worker(
        plan,
        recorder,
        gate=gate or LocalIdentifyGate(plan.max_concurrency, window=sim.config.identify_window),
    )
    # The simulator shares this loop: a resting worker would put it to sleep too (in the
    # worker process, where rests belong, nothing else runs in the loop).
    worker.rest = 0.0
    task = asyncio.create_task(worker.run(install_signals=False))
    try:
        yield worker, recorder  # type: ignore[misc]
    finally:
        worker.request_stop()
        worker.exit_code = await asyncio.wait_for(task, t(15))  # type: ignore[attr-defined]


def ready_count(ledger: Ledger) -> int:
    return sum(1 for r in ledger.identifies if r.outcome == "ready")
