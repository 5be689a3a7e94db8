"""Where a fleet keeps its state in Redis (fleet.md). Pure: names only.

Per fleet ``name``, under the shard store's ``prefix``::

    <prefix>fleet:<name>:lease:<shard>   "<member> <epoch>", PX = the lease time
    <prefix>fleet:<name>:epoch:<shard>   the shard's fencing epoch (INCR at every acquisition)
    <prefix>fleet:<name>:members         hash: member -> JSON (capacity, shards, last seen)
    <prefix>fleet:<name>:budget          hash: Discord's session start budget, for every member
    <prefix>fleet:<name>:free            pub/sub channel: a shard was let go (claim it now)
    <prefix>fleet:<name>:unclaimed       pub/sub channel nobody reads: a claim given back
    <prefix>fleet:<name>:reshard         the reshard lock: "<member> <token>", PX = the lease
    <prefix>fleet:<name>:reshard:ask     an operator's request (JSON), and its pub/sub channel

A generation after the first (a reshard) has leases and epochs of its own, under
``<prefix>fleet:<name>:g<generation>:`` (:meth:`FleetKeys.of_generation`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..generation import pointer_key

__all__ = ["FleetKeys"]


@dataclass(frozen=True)
class FleetKeys:
    prefix: str
    name: str
    generation: int = 0

    @property
    def root(self) -> str:
        return f"{self.prefix}fleet:{self.name}:"

    @property
    def base(self) -> str:
        """Where this generation's leases and epochs live."""
        return self.root if self.generation == 0 else f"{self.root}g{self.generation}:"

    def of_generation(self, generation: int) -> FleetKeys:
        return FleetKeys(self.prefix, self.name, generation)

    @property
    def pointer(self) -> str:
        """The generation pointer (:mod:`spectacles_gateway.generation`): shared with the
        shard store, outside the fleet's own keys."""
        return pointer_key(self.prefix)

    @property
    def reshard_lock(self) -> str:
        return f"{self.root}reshard"

    @property
    def reshard_ask(self) -> str:
        return f"{self.root}reshard:ask"

    def lease(self, shard: int) -> str:
        return f"{self.base}lease:{shard}"

    def epoch(self, shard: int) -> str:
        return f"{self.base}epoch:{shard}"

    @property
    def members(self) -> str:
        return f"{self.root}members"

    @property
    def budget(self) -> str:
        return f"{self.root}budget"

    @property
    def free(self) -> str:
        return f"{self.root}free"

    @property
    def unclaimed(self) -> str:
        """Where a claim that a failover could lose is given back without waking anyone
        (:meth:`~.leases.LeaseBook.claim`)."""
        return f"{self.root}unclaimed"
