"""Generations: what a reshard asks of the supervisor (the :class:`~.reshard.Host` side).

A reshard runs a new generation of workers beside the running one, switches to it and retires
the old; in a fleet, another member's switch supersedes ours. A mixin of
:class:`~.arbiter.Supervisor`: the state it reads is declared here; spawning, killing and the
maps it changes are the arbiter's.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Any

import msgspec

from spectacles_gateway import metrics
from spectacles_gateway.control import Cover, Publish, Retire
from spectacles_gateway.protocol.identify import SessionBudget, pacer_key
from spectacles_gateway.protocol.state import Session

from .plan import describe_ids, group_shards
from .slots import WorkerSlot

if TYPE_CHECKING:
    from spectacles_gateway.protocol.identify import IdentifyPacer
    from spectacles_gateway.telemetry import Aggregator

    from .fleet import FleetSide
    from .relay import StdinRouter
    from .reshard import Reshard

__all__ = ["Generations"]

log = logging.getLogger("spectacles_gateway.supervisor")


class Generations:
    # What the arbiter provides.
    options: Any
    slots: list[WorkerSlot]
    owner: dict[int, WorkerSlot]
    sessions: dict[int, Session | None]
    pacer: IdentifyPacer
    aggregator: Aggregator
    stopping: str | None
    stdin: StdinRouter | None
    fleet: FleetSide | None
    reshard: Reshard | None
    generation: int
    shard_count: int
    _next_index: int
    _gate_dirty: bool
    _ready_notified: bool

    if TYPE_CHECKING:  # the other parts of the Supervisor (only declared: never shadowed)

        def spawn(self, slot: WorkerSlot) -> None: ...
        def _kill(self, slot: WorkerSlot, sig: int) -> None: ...

    def _owner_of(self, generation: int, shard: int) -> WorkerSlot | None:
        if generation == self.generation:
            return self.owner.get(shard)
        if self.reshard is not None and self.reshard.generation == generation:
            return self.reshard.owner_of(shard)
        return None

    def _sessions_for(self, slot: WorkerSlot) -> dict[int, Session | None]:
        if slot.generation == self.generation or self.reshard is None:
            return self.sessions
        if self.reshard.generation == slot.generation:
            return self.reshard.sessions()
        return {}  # a generation on its way out: nothing of it is kept

    def current_slots(self) -> list[WorkerSlot]:
        """The workers of the running generation (not those a reshard adds or retires)."""
        generation = self.generation
        return [s for s in self.slots if s.generation == generation]

    @property
    def max_concurrency(self) -> int:
        return int(self.options.max_concurrency)

    @property
    def budget(self) -> SessionBudget | None:
        budget: SessionBudget | None = self.options.budget
        return budget

    def spawn_generation(self, generation: int, shard_count: int) -> list[WorkerSlot]:
        """Start the workers of a reshard's new generation, in standby: as many workers as
        now, each with a share of every identify window (as at start-up)."""
        workers = max(1, len(self.current_slots()))
        groups = group_shards(range(shard_count), workers, self.options.max_concurrency)
        slots = []
        for group in groups:
            slot = WorkerSlot(
                self._next_index,
                group,
                generation=generation,
                shard_count=shard_count,
                standby=True,
            )
            self._next_index += 1
            slots.append(slot)
        self.slots.extend(slots)
        for slot in slots:
            self.spawn(slot)
        return slots

    def publish(self, slot: WorkerSlot) -> None:
        if slot.channel is not None:
            slot.channel.send(Publish())

    def commit_generation(
        self,
        generation: int,
        shard_count: int,
        slots: list[WorkerSlot],
        sessions: dict[int, Session | None],
    ) -> None:
        """The switch is done: ``generation`` is the running one from now on. The maps are
        changed in place: the relay, the stdin router and the fleet side hold them."""
        self.generation = generation
        self.shard_count = shard_count
        self.owner.clear()
        self.owner.update({shard: slot for slot in slots for shard in slot.shards})
        self.sessions.clear()
        self.sessions.update(sessions)
        if self.stdin is not None:
            self.stdin.shard_count = shard_count
        self.options.plan = msgspec.structs.replace(
            self.options.plan, shard_count=shard_count, generation=generation
        )
        self.options.shard_count = shard_count
        metrics.total_shards.set(shard_count)
        metrics.generation.set(generation)
        if self.fleet is not None:
            self.fleet.adopt_generation(generation, shard_count)
        self._ready_notified = self._ready_notified and all(s.all_ready() for s in slots)

    def retire(self, slot: WorkerSlot, successor: tuple[int, int] | None) -> None:
        slot.retiring = True
        slot.restart_at = None
        for shard in slot.shards:
            self.pacer.cancel(pacer_key(shard, slot.generation))
        self._gate_dirty = True
        if slot.proc is None:  # dead already (refused, or waiting for a restart): just gone
            if slot in self.slots:
                self.slots.remove(slot)
            self.aggregator.retire(slot.index)
        elif slot.channel is not None:
            slot.channel.send(Retire("reshard", successor))

    def kill(self, slot: WorkerSlot) -> None:
        self._kill(slot, signal.SIGKILL)

    def cover(self, slot: WorkerSlot, shard_count: int, shards: frozenset[int]) -> None:
        if slot.channel is not None:
            slot.channel.send(Cover(shard_count, sorted(shards)))

    def lock_reshard(self) -> bool:
        return self.fleet is not None and self.fleet.lock_reshard()

    def unlock_reshard(self) -> None:
        if self.fleet is not None:
            self.fleet.unlock_reshard()

    def switch_fleet(self, generation: int, shard_count: int) -> None:
        if self.fleet is not None:
            self.fleet.switch(generation, shard_count)

    def running_unsettled(self) -> str:
        down = [
            shard
            for slot in self.current_slots()
            if not slot.fatal
            for shard in slot.shards
            if (info := slot.status.get(shard)) is None or not (info.ready or info.fatal)
        ]
        if down:
            return f"running shards {describe_ids(down)} are reconnecting"
        if self.fleet is not None and not self.fleet.fully_owned():
            return "the fleet does not own every running shard"
        return ""

    def superseded(self, generation: int, shard_count: int) -> None:
        """Fleet: another member's reshard switched the fleet to ``generation``: our shards of
        the old one retire, and fresh workers take shards of the new one as the fleet leases
        them (as many workers as before)."""
        if generation <= self.generation or self.stopping is not None:
            return
        if self.reshard is not None:
            self.reshard.superseded()
        old = self.current_slots()
        log.info(
            "fleet: generation %d of %d shards is the fleet's now: retiring our %d workers of "
            "generation %d",
            generation,
            shard_count,
            len(old),
            self.generation,
        )
        fresh = []
        for _ in range(max(1, len(old))):
            fresh.append(
                WorkerSlot(self._next_index, (), generation=generation, shard_count=shard_count)
            )
            self._next_index += 1
        self.slots.extend(fresh)
        self.commit_generation(generation, shard_count, fresh, {})
        for slot in fresh:
            self.spawn(slot)
        for slot in old:
            self.retire(slot, None)

    def request_reshard(self, count: int | None) -> tuple[int, str]:
        """``POST /reshard``: (HTTP status, answer)."""
        if self.reshard is None:
            return 409, "resharding is not available here"
        if count is not None and count < 1:
            return 400, "the shard count must be at least 1"
        answer = self.reshard.request("operator", count)
        return (202 if answer == "accepted" else 409), answer
