"""Shard stores: where sessions live between connections, processes and hosts."""

from __future__ import annotations

from typing import Protocol

from .protocol.state import Session

__all__ = ["MemoryStore", "ShardStore"]


class ShardStore(Protocol):
    """Per shard: session id, confirmed seq, resume URL, and the shard count it was made with.

    ``load`` returns None for an unknown session, an expired one, or one made with another shard
    count (resuming it would put the session into the wrong topology). ``save(..., None)``
    forgets the shard's session (a dead session). Implementations must not raise on an outage:
    the worker keeps the last state in memory and saves again on its next round.
    """

    #: True when a session saved here outlives this process (then shutdown keeps sessions).
    persistent: bool

    async def start(self) -> None: ...

    async def load(self, shard_id: int, shard_count: int) -> Session | None: ...

    async def save(
        self, shard_id: int, shard_count: int, session: Session | None, *, epoch: int = 0
    ) -> None:
        """``epoch`` (fleet mode): the lease epoch this process holds the shard under; a store
        that knows a newer one refuses the write (a member that lost the shard must never
        overwrite its new owner's state)."""
        ...

    def forget(self, shard_id: int) -> None:
        """This process no longer runs the shard: stop keeping its session alive."""
        ...

    async def aclose(self) -> None: ...


class MemoryStore:
    """Sessions in this process only (the default). Survives reconnects, not restarts."""

    persistent = False

    def __init__(self, sessions: dict[int, tuple[Session, int]] | None = None) -> None:
        self._sessions: dict[int, tuple[Session, int]] = dict(sessions or {})

    async def start(self) -> None:
        return None

    async def load(self, shard_id: int, shard_count: int) -> Session | None:
        entry = self._sessions.get(shard_id)
        if entry is None or entry[1] != shard_count:
            return None
        return entry[0]

    async def save(
        self, shard_id: int, shard_count: int, session: Session | None, *, epoch: int = 0
    ) -> None:
        if session is None:
            self._sessions.pop(shard_id, None)
        else:
            self._sessions[shard_id] = (session, shard_count)

    def forget(self, shard_id: int) -> None:
        return None  # the session stays: a shard that comes back here resumes it

    async def aclose(self) -> None:
        return None
