"""A supervisor's status routes served by the real HTTP listener, with shards of our making.

For what needs many shards or exact states (the shard map at 2,500 shards, a fleet section, the
status command's tables): the real :class:`~supervisor.status.Routes` and
:class:`~supervisor.httpd.HttpServer`, driven by a select loop in a thread, over worker slots
whose shard statuses the test sets (no worker processes behind them).
"""

from __future__ import annotations

import random
import selectors
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from spectacles_gateway import metrics
from spectacles_gateway.control import FleetView, MemberView, ShardStatus
from spectacles_gateway.protocol.identify import IdentifyPacer
from spectacles_gateway.telemetry import Aggregator
from supervisor.fleet import FleetOptions, FleetSide
from supervisor.httpd import HttpServer, Response
from supervisor.plan import group_shards
from supervisor.slots import WorkerSlot
from supervisor.status import Routes


def shard_status(
    state: str = "ready",
    seq: int | None = 100,
    latency_ms: float | None = 41.5,
    last_close: str | None = None,
    fatal: int | None = None,
) -> ShardStatus:
    return ShardStatus(state, state == "ready", seq, latency_ms, last_close, fatal)


@dataclass
class FakeView:
    """What :class:`~supervisor.status.View` reads, for ``shards`` shards in ``workers`` slots."""

    slots: list[WorkerSlot]
    shard_count: int
    pacer: IdentifyPacer = field(default_factory=lambda: IdentifyPacer(16))
    stopping: str | None = None
    started: float = field(default_factory=time.monotonic)
    fleet: FleetSide | None = None
    reshard: Any = None
    generation: int = 0

    def current_slots(self) -> list[WorkerSlot]:
        return [s for s in self.slots if s.generation == self.generation]

    @classmethod
    def of(cls, shards: int, workers: int = 4, state: str = "ready") -> FakeView:
        slots = [WorkerSlot(i, g) for i, g in enumerate(group_shards(range(shards), workers, 16))]
        for slot in slots:
            slot.broker = True
            slot.apply_status({s: shard_status(state, seq=1000 + s) for s in slot.shards})
        return cls(slots, shards)

    def set(self, shard: int, status: ShardStatus) -> None:
        for slot in self.slots:
            if shard in slot.shard_set:
                slot.apply_status({shard: status})


@dataclass
class Served:
    view: FakeView
    port: int
    #: Called in the server's thread before each request: changes between refreshes.
    before: Callable[[FakeView], None] | None = None
    requests: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def serve(view: FakeView) -> Iterator[Served]:
    """``view`` on a free loopback port until the block ends."""
    routes = Routes(view, Aggregator(metrics.REGISTRY.families), "/metrics")  # type: ignore[arg-type]
    selector = selectors.DefaultSelector()
    served: Served

    def handler(path: str, query: str) -> Response:
        served.requests += 1
        if served.before is not None:
            served.before(view)
        return routes(path, query)

    with running(selector, HttpServer(selector, "127.0.0.1", 0, handler)) as server:
        served = Served(view, server.port)
        yield served


@contextmanager
def running(selector: selectors.BaseSelector, server: HttpServer) -> Iterator[HttpServer]:
    """``server`` answering from a thread of its own (the supervisor's loop, in small) until
    the block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for key, mask in selector.select(0.05):
                key.data(mask)
            server.expire(time.monotonic())

    thread = threading.Thread(target=loop, name="status-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        server.close()
        selector.close()


def fleet_member(
    view: FakeView, member: str, shard_count: int, fleet: FleetView, name: str = "bot"
) -> FakeView:
    """``view`` as the member ``member`` of a fleet of ``shard_count`` shards that its agent
    sees as ``fleet`` (what ``/status`` says of the fleet comes from the real fleet side)."""
    options = FleetOptions(name, member, 10.0, None, 1000, 1000, 0.0)
    view.shard_count = shard_count
    view.fleet = FleetSide(
        options,
        shard_count,
        [],
        selectors.DefaultSelector(),
        view.slots,
        {s: slot for slot in view.slots for s in slot.shards},
        Aggregator(metrics.REGISTRY.families),
        random.random,
        view=fleet,
    )
    return view


__all__ = [
    "FakeView",
    "FleetView",
    "MemberView",
    "Served",
    "fleet_member",
    "running",
    "serve",
    "shard_status",
]
