"""Shard leases with fencing epochs in Redis (fleet.md "Ownership"): atomic Lua scripts.

A lease key holds ``"<member> <epoch>"`` with ``PX`` = the lease time. Taking a free shard
increments its epoch counter (it only grows) in the same script, so every owner in a shard's
history has its own epoch, and the session store refuses writes from older ones. Renewing and
releasing only touch a key that still holds our own value.

With Redis Sentinel, a claim and a renewal count only once a replica has them (``WAIT``, see
:func:`~spectacles_gateway.redis_link.check_replicated`): one that a failover could lose is
given back (a claim) or not counted (a renewal), and :class:`NotReplicated` is raised. Without
that, a claim taken on a master that was just replaced vanishes with its epoch, and the next
owner gets the same epoch again: two owners the fencing could not tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from ..redis_link import REPLICA_WAIT_MS, NotReplicated, check_replicated, waits_for_replica
from .keys import FleetKeys

__all__ = ["LeaseBook", "NotReplicated", "Owner"]

# KEYS: lease, epoch, generation pointer. ARGV: member, ttl (ms), our generation. Returns the
# new epoch, 0 when taken, -1 when the fleet moved on to a newer generation (a reshard
# switched): nobody may take a shard of a generation that is over.
_CLAIM = """
local pointer = redis.call('GET', KEYS[3])
if pointer then
  local generation = tonumber(string.match(pointer, '^(%d+) '))
  if generation and generation > tonumber(ARGV[3]) then
    return -1
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. epoch, 'PX', ARGV[2])
return epoch
"""
# KEYS: lease. ARGV: value, ttl (ms). 1 when the lease is still ours (and now renewed).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# KEYS: lease, free channel. ARGV: value, shard. Deletes our lease and announces the shard.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Owner:
    member: str
    epoch: int
    ttl: float  # seconds the lease still has


class LeaseBook:
    def __init__(self, client: Redis, keys: FleetKeys, member: str, lease: float) -> None:
        self.client = client
        self.keys = keys
        self.member = member
        self.lease_ms = max(1, round(lease * 1000))
        #: How long a claim or renewal waits for a replica (Sentinel): a twentieth of the lease,
        #: so that a master just replaced costs one round, not the lease.
        self.wait_ms = max(50, min(REPLICA_WAIT_MS, self.lease_ms // 20))
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def value(self, epoch: int) -> str:
        return f"{self.member} {epoch}"

    async def claim(self, shard: int) -> int:
        """Take ``shard`` if it is free: its new epoch, 0 when it is taken, -1 when the fleet
        runs a newer generation than ours."""
        keys = self.keys
        args: list[Any] = [self.member, self.lease_ms, keys.generation]
        key_list = [keys.lease(shard), keys.epoch(shard), keys.pointer]
        since = waits_for_replica(self.client)
        if since is None:
            return int(await self._claim(keys=key_list, args=args))
        async with self.client.pipeline(transaction=False) as pipe:
            await self._claim(keys=key_list, args=args, client=pipe)
            pipe.execute_command("WAIT", 1, self.wait_ms)
            epoch, acks = (int(r) for r in await pipe.execute())
        if epoch <= 0:
            return epoch
        try:
            await check_replicated(self.client, acks, since)
        except NotReplicated:
            # Give it back (quietly: nobody is told to claim it) rather than run a shard under
            # an epoch a failover could hand to someone else; if this fails, it expires.
            back = [keys.lease(shard), keys.unclaimed]
            await self._release(keys=back, args=[self.value(epoch), shard])
            raise
        return epoch

    async def renew(self, owned: dict[int, int]) -> dict[int, bool]:
        """Renew every lease of ``owned`` (shard -> epoch) in one round trip: which are still
        ours."""
        if not owned:
            return {}
        since = waits_for_replica(self.client)
        async with self.client.pipeline(transaction=False) as pipe:
            for shard, epoch in owned.items():
                args: list[Any] = [self.value(epoch), self.lease_ms]
                await self._renew(keys=[self.keys.lease(shard)], args=args, client=pipe)
            if since is not None:
                pipe.execute_command("WAIT", 1, self.wait_ms)
            results = await pipe.execute()
        if since is not None:
            await check_replicated(self.client, int(results.pop()), since)
        return {shard: bool(int(r)) for shard, r in zip(owned, results, strict=True)}

    async def release(self, shard: int, epoch: int) -> bool:
        """Let ``shard`` go (if it is still ours) and tell the members waiting to claim."""
        keys = [self.keys.lease(shard), self.keys.free]
        return bool(int(await self._release(keys=keys, args=[self.value(epoch), shard])))

    async def owners(self, shards: range) -> dict[int, Owner | None]:
        """Every shard's owner (None: free), with the time its lease still has."""
        async with self.client.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.get(self.keys.lease(shard))
                pipe.pttl(self.keys.lease(shard))
            replies = await pipe.execute()
        out: dict[int, Owner | None] = {}
        for i, shard in enumerate(shards):
            raw, pttl = replies[2 * i], replies[2 * i + 1]
            if raw is None:
                out[shard] = None
                continue
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            member, _, epoch = text.rpartition(" ")
            try:
                out[shard] = Owner(member, int(epoch), max(0, int(pttl)) / 1000.0)
            except ValueError:  # not ours to read: a foreign value; treat it as taken
                out[shard] = Owner(text, 0, max(0, int(pttl)) / 1000.0)
        return out
