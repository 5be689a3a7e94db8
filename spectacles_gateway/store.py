"""Shard stores: where sessions live between connections, processes and hosts."""

from __future__ import annotations

from .protocol.shard import Session

__all__ = ["MemoryStore"]


class MemoryStore:
    """Sessions in this process only (the default). Survives reconnects, not restarts."""

    def __init__(self) -> None:
        self._sessions: dict[int, tuple[Session, int]] = {}

    async def load(self, shard_id: int, shard_count: int) -> Session | None:
        entry = self._sessions.get(shard_id)
        if entry is None or entry[1] != shard_count:
            return None
        return entry[0]

    async def save(self, shard_id: int, shard_count: int, session: Session | None) -> None:
        if session is None:
            self._sessions.pop(shard_id, None)
        else:
            self._sessions[shard_id] = (session, shard_count)

    @property
    def persistent(self) -> bool:
        return False
