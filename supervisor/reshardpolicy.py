"""Resharding's pure parts: the decisions (:func:`choose_target`, :func:`budget_wait`), its
options, states and timings, and the :class:`Host` protocol the supervisor implements for the
state machine in :mod:`.reshard`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from spectacles_gateway.discovery import GatewayBot
from spectacles_gateway.protocol.identify import SessionBudget
from spectacles_gateway.protocol.state import Session

from .slots import WorkerSlot

__all__ = [
    "GUILD_QUIET",
    "LOCK_TIMEOUT",
    "RETIRE_TIMEOUT",
    "RETRY_AFTER",
    "SWITCH_TIMEOUT",
    "Host",
    "ReshardOptions",
    "ReshardRun",
    "State",
    "budget_wait",
    "choose_target",
    "round_up",
]

#: Seconds the new workers have to confirm they publish after the switch was sent.
SWITCH_TIMEOUT = 30.0
#: Guilds that stop arriving for this long are taken as unavailable: the switch goes on.
GUILD_QUIET = 10.0
#: After a reshard that did not finish, the next attempt waits at least this long.
RETRY_AFTER = 60.0
#: How long retired workers have to close before they are killed.
RETIRE_TIMEOUT = 30.0
#: How long the fleet's reshard lock may take to come.
LOCK_TIMEOUT = 10.0


def round_up(count: int, max_concurrency: int) -> int:
    """Large bots must run a multiple of ``max_concurrency`` shards."""
    if max_concurrency <= 1:
        return count
    return math.ceil(count / max_concurrency) * max_concurrency


def choose_target(
    *, reason: str, running: int, recommended: int | None, requested: int | None, mc: int
) -> int | None:
    """The shard count to reshard to, or None (nothing to do).

    ``requested`` (an operator's ``--to``) wins; else Discord's recommendation when it is above
    the running count; after a 4011 with no higher recommendation, twice the running count (the
    shard that was refused holds too many guilds at this count, whatever the recommendation
    says).
    """
    if requested is not None:
        target = requested
    elif recommended is not None and recommended > running:
        target = recommended
    elif reason == "sharding_required":
        target = running * 2
    else:
        return None
    target = round_up(max(1, target), mc)
    return None if target == running else target


def budget_wait(budget: SessionBudget, needed: int, reserve: int, now: float) -> float | None:
    """None: the budget pays for ``needed`` session starts and keeps ``reserve``; else the
    seconds until it resets (``math.inf``: even a full budget would not)."""
    left = budget.total if now >= budget.reset_at else budget.remaining
    if left - needed >= reserve:
        return None
    if budget.total - needed < reserve:
        return math.inf
    return max(0.0, budget.reset_at - now)


class ReshardOptions(msgspec.Struct, frozen=True):
    policy: str  # "off", "recommended", "manual"
    check_interval: float
    budget_reserve: int
    #: Seconds the new generation may take beyond pacing its identifies.
    timeout: float = 300.0
    #: Seconds both generations publish after the switch before the old one is retired.
    overlap: float = 1.0
    #: Asks Discord's ``/gateway/bot`` (blocking: it runs in a thread).
    check: Callable[[], GatewayBot] | None = None
    #: Why no reshard can run here (shard ids chosen by hand): None when one can.
    unavailable: str | None = None
    #: Fleet mode: one reshard at a time in the fleet (a lock in Redis, taken by the agent).
    fleet: bool = False


class State(enum.Enum):
    IDLE = "idle"
    LOCKING = "locking"
    WAITING_BUDGET = "waiting_for_budget"
    STARTING = "starting"
    SWITCHING = "switching"
    OVERLAP = "overlap"
    RETIRING = "retiring"
    ROLLING_BACK = "rolling_back"


class Host(Protocol):
    """What the supervisor does for a reshard."""

    slots: list[WorkerSlot]
    generation: int
    shard_count: int
    stopping: str | None

    @property
    def max_concurrency(self) -> int: ...

    @property
    def budget(self) -> SessionBudget | None: ...

    def spawn_generation(self, generation: int, shard_count: int) -> list[WorkerSlot]: ...

    def publish(self, slot: WorkerSlot) -> None: ...

    def commit_generation(
        self, generation: int, shard_count: int, slots: list[WorkerSlot], sessions: Any
    ) -> None: ...

    def retire(self, slot: WorkerSlot, successor: tuple[int, int] | None) -> None: ...

    def cover(self, slot: WorkerSlot, shard_count: int, shards: frozenset[int]) -> None: ...

    def lock_reshard(self) -> bool:
        """Fleet: ask for the reshard lock (False: cannot ask now)."""
        ...

    def unlock_reshard(self) -> None: ...

    def running_unsettled(self) -> str:
        """Why the running generation is not ready to be taken over ("": it is)."""
        ...

    def switch_fleet(self, generation: int, shard_count: int) -> None: ...

    def kill(self, slot: WorkerSlot) -> None: ...


class ReshardRun(msgspec.Struct):
    """One reshard in progress."""

    target: int
    reason: str
    generation: int
    started: float
    source: int  # the shard count it started from
    slots: list[WorkerSlot] = msgspec.field(default_factory=list)
    owner: dict[int, WorkerSlot] = msgspec.field(default_factory=dict)
    sessions: dict[int, Session | None] = msgspec.field(default_factory=dict)
    deadline: float = 0.0
    waiting: str = ""  # why it waits, for logs and /status
    published: set[int] = msgspec.field(default_factory=set)  # slot indexes that said they publish
    overlap_until: float = 0.0
    guilds_pending: int = -1
    guilds_moved: float = 0.0
    old: list[WorkerSlot] = msgspec.field(default_factory=list)  # retired or retiring
    retire_deadline: float = 0.0
    covered: frozenset[int] = frozenset()  # running shards refused for good, covered by us
    identifies: int = 0  # IDENTIFYs the new generation sent
