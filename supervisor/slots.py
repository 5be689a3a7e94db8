"""What the supervisor knows about each worker process: pure state, no I/O."""

from __future__ import annotations

import subprocess
from collections import deque
from typing import TYPE_CHECKING

import msgspec

from spectacles_gateway.control import ShardStatus

if TYPE_CHECKING:
    from .channel import ControlChannel

__all__ = ["WorkerSlot"]


class WorkerSlot(msgspec.Struct):
    """One worker's place: it keeps its shards and its pending input across restarts."""

    index: int
    shards: tuple[int, ...]
    proc: subprocess.Popen[bytes] | None = None
    channel: ControlChannel | None = None
    started: float = 0.0
    last_seen: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    killed_by_us: bool = False
    stall_killed: bool = False
    fatal: bool = False
    rolling: bool = False
    status: dict[int, ShardStatus] = msgspec.field(default_factory=dict)
    ready_count: int = 0  # shards of ``status`` that are ready, kept as reports come in
    broker: bool = False
    #: stdin commands for this worker not yet handed to its control channel (bytes, bodies).
    pending_input: deque[bytes] = msgspec.field(default_factory=deque)
    pending_bytes: int = 0
    #: Which generation of shards it runs (a reshard adds slots of the next one), with how
    #: many shards in all (0: the supervisor's count); in standby until the switch.
    generation: int = 0
    shard_count: int = 0
    standby: bool = False
    #: Retired by a reshard: it closes its shards with 1000 and leaves for good.
    retiring: bool = False
    #: ``shards`` as a set, kept in step with it (set in ``__post_init__``, not passed).
    shard_set: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self.shard_set = frozenset(self.shards)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None

    def apply_status(self, changes: dict[int, ShardStatus]) -> list[int]:
        """A report's changed shards (only those this slot runs); the shards that just became
        ready."""
        status = self.status
        became_ready = []
        for shard, new in changes.items():
            if shard not in self.shard_set:
                continue
            old = status.get(shard)
            was = old is not None and old.ready
            self.ready_count += new.ready - was
            if new.ready and not was:
                became_ready.append(shard)
            status[shard] = new
        return became_ready

    def add_shard(self, shard: int) -> None:
        """Fleet: the slot runs ``shard`` from now on."""
        if shard not in self.shard_set:
            self.shards = tuple(sorted((*self.shards, shard)))
            self.shard_set = frozenset(self.shards)

    def remove_shard(self, shard: int) -> None:
        """Fleet: the slot no longer runs ``shard``."""
        if shard in self.shard_set:
            self.shards = tuple(s for s in self.shards if s != shard)
            self.shard_set = frozenset(self.shards)
            old = self.status.pop(shard, None)
            if old is not None and old.ready:
                self.ready_count -= 1

    def ready_shards(self) -> int:
        return self.ready_count

    def all_ready(self) -> bool:
        return self.ready_count == len(self.shards)

    def reset_for_spawn(self, now: float) -> None:
        self.started = now
        self.last_seen = now
        self.killed_by_us = False
        self.stall_killed = False
        self.restart_at = None
        self.status = {}
        self.ready_count = 0
        self.broker = False
