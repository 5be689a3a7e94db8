"""Where a fleet keeps its state in Redis (fleet.md). Pure: names only.

Per fleet ``name``, under the shard store's ``prefix``::

    <prefix>fleet:<name>:lease:<shard>   "<member> <epoch>", PX = the lease time
    <prefix>fleet:<name>:epoch:<shard>   the shard's fencing epoch (INCR at every acquisition)
    <prefix>fleet:<name>:members         hash: member -> JSON (capacity, shards, last seen)
    <prefix>fleet:<name>:budget          hash: Discord's session start budget, for every member
    <prefix>fleet:<name>:free            pub/sub channel: a shard was let go (claim it now)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FleetKeys"]


@dataclass(frozen=True)
class FleetKeys:
    prefix: str
    name: str

    @property
    def base(self) -> str:
        return f"{self.prefix}fleet:{self.name}:"

    def lease(self, shard: int) -> str:
        return f"{self.base}lease:{shard}"

    def epoch(self, shard: int) -> str:
        return f"{self.base}epoch:{shard}"

    @property
    def members(self) -> str:
        return f"{self.base}members"

    @property
    def budget(self) -> str:
        return f"{self.base}budget"

    @property
    def free(self) -> str:
        return f"{self.base}free"
