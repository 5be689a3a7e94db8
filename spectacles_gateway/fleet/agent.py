"""The fleet agent: one per member, a child of its supervisor, the only part that talks to Redis
about ownership (the supervisor itself never loads an asyncio Redis client).

Every round (a quarter of the lease, or at once when another member lets a shard go) it renews
the member's leases, refreshes the member in the membership hash, reads every shard's owner,
claims free shards while below its target (:mod:`.placement`), and hands one shard off while
above it and someone else is below theirs. It tells the supervisor what it owns (:class:`Own`,
with a local deadline a fifth of the lease short of Redis' own), what it renewed
(:class:`Leases`), what it lost (:class:`Lose`) and what to let go (:class:`HandOff`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from .. import metrics
from ..control import (
    FleetView,
    HandOff,
    Leases,
    Locked,
    Lose,
    MemberView,
    Message,
    Own,
    ReshardAsk,
    Superseded,
)
from ..generation import POINT_SCRIPT, Pointer, format_pointer, parse_pointer
from ..redis_link import REDIS_ERRORS, Outage
from .keys import FleetKeys
from .leases import LeaseBook, Owner
from .placement import targets, to_claim, to_hand_off

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger(__name__)

#: A member's local deadline ends this share of the lease after the renewal was asked for:
#: Redis keeps the lease the whole lease time from when it *received* the renewal.
LOCAL_SHARE = 0.8
#: Seconds between two handoffs of one member (rebalancing moves shards one at a time).
HANDOFF_GAP = 1.0
VIEW_EVERY = 2.0
#: The reshard lock lasts this many leases without renewal (its holder renews it every round).
LOCK_LEASES = 3
#: After a switch, the first handoff waits this long: the other members start fresh workers
#: for the new generation as they notice it, and a shard handed to a worker still starting
#: would wait for it.
SWITCH_SETTLE = 3.0

# KEYS: the lock. ARGV: our value, ttl (ms). 1 when it is (still) ours, now for ttl again.
_LOCK = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if held then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: the lock. ARGV: our value. Deletes it if it is ours.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class AgentConfig:
    member: str
    capacity: int  # 0: as many as it gets
    lease: float
    shard_count: int
    allowed: frozenset[int] | None  # None: any shard
    generation: int = 0


@dataclass
class _Held:
    epoch: int
    until: float


class Agent:
    def __init__(
        self,
        client: Redis,
        keys: FleetKeys,
        config: AgentConfig,
        send: Callable[[Message], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.generation = config.generation
        self.shard_count = config.shard_count
        self.keys = keys.of_generation(config.generation)
        self.config = config
        self.send = send
        self.clock = clock
        self.book = LeaseBook(client, self.keys, config.member, config.lease)
        self.lock_held = False
        self._lock_value = f"{config.member} {id(self):x}"
        self._lock = client.register_script(_LOCK)
        self._unlock = client.register_script(_UNLOCK)
        self._point = client.register_script(POINT_SCRIPT)
        self._serial = asyncio.Lock()  # a round and a switch never interleave
        self.owned: dict[int, _Held] = {}
        self.handing_off: dict[int, float] = {}
        self.draining = False
        self.outage = Outage("fleet", "")
        self._wake = asyncio.Event()
        self._expiry: dict[int, float] = {}  # shard -> when its owner's lease runs out (ours)
        self._last_handoff = 0.0
        self._next_view = 0.0
        self._rounds = 0

    @property
    def tick(self) -> float:
        return max(0.2, self.config.lease / 4)

    def shards(self) -> range:
        return range(self.shard_count)

    # ------------------------------------------------------------------ from the supervisor

    async def released(self, shard: int, generation: int | None = None) -> None:
        """The supervisor's worker let ``shard`` go (after a HandOff, or on its own)."""
        held = self.owned.get(shard)
        if held is None or (generation is not None and generation != self.generation):
            return  # a shard of a generation we left: its lease went with it
        try:  # it stays in owned until its lease is gone: a draining agent waits for that
            await self.book.release(shard, held.epoch)
        except REDIS_ERRORS as exc:  # its lease runs out by itself
            log.warning("fleet: could not release shard %d (%s); it expires instead", shard, exc)
        finally:
            self.owned.pop(shard, None)
            self.handing_off.pop(shard, None)
        metrics.leases_held.set(len(self.owned))
        self.wake()

    def drain(self) -> None:
        self.draining = True
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            while not (self.draining and not self.owned):
                started = self.clock()
                try:
                    async with self._serial:
                        await self.round()
                    self.outage.succeeded(self.clock())
                except REDIS_ERRORS as exc:
                    self.outage.failed(self.clock(), exc, "; leases are not renewed meanwhile")
                    self._expire_local()
                except Exception:  # a bug of ours: the next round must still come
                    log.exception("fleet: internal error in a round")
                    self._expire_local()
                self._wake.clear()
                wait = max(0.0, started + self.tick - self.clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            listener.cancel()

    async def _listen(self) -> None:
        """Another member let a shard go (claim it now rather than next round), an operator
        asked for a reshard, or a reshard switched: look now."""
        while True:
            try:
                pubsub = self.client.pubsub()
                await pubsub.subscribe(self.keys.free, self.keys.reshard_ask)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: rounds go on at their own pace
                log.debug("fleet: lost the free-shard channel (%s)", exc)
                await asyncio.sleep(1.0)

    async def round(self) -> None:
        now = self.clock()
        if await self._generation_moved():
            return
        await self._renew(now)
        members = await self._members()
        owners = await self.book.owners(self.shards())
        self._note_expiry(owners, now)
        if not self._rounds:  # a restarted agent finds the leases it held: they are still ours
            self._adopt(owners, now)
        goal = self._targets(members)
        if self.draining:
            for shard in self.owned:
                if shard not in self.handing_off:
                    self._hand_off(shard, "stopping", now)
        elif self._rounds:  # the first round only shows us to the others starting with us
            await self._claim(owners, goal, now)
            self._rebalance(owners, goal, now)
        self._rounds += 1
        if now >= self._next_view:
            self._next_view = now + VIEW_EVERY
            self._view(members, owners, goal)

    async def _generation_moved(self) -> bool:
        """Read the generation pointer (and an operator's reshard request, taking it so only
        one member acts on it); True when the fleet moved on to a newer generation than ours:
        ours is over, the supervisor retires it, and we own shards of the new one from now."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.pointer)
            pipe.getdel(self.keys.reshard_ask)
            if self.lock_held:
                await self._lock(
                    keys=[self.keys.reshard_lock],
                    args=[self._lock_value, self._lock_ms],
                    client=pipe,
                )
            replies = await pipe.execute()
        if self.lock_held and not int(replies[2]):
            log.error("fleet: the reshard lock was lost (not renewed in time)")
            self.lock_held = False
        ask = replies[1]
        if ask is not None and not self.draining:
            try:
                to = json.loads(ask).get("to")
                to = int(to) if to is not None else None
            except (ValueError, TypeError, AttributeError):
                log.warning("fleet: ignored a reshard request that is not one: %r", ask[:80])
            else:
                log.info("fleet: an operator asked for a reshard: this member takes it")
                self.send(ReshardAsk(to))
        pointer = parse_pointer(replies[0])
        if pointer is None or pointer.generation <= self.generation:
            return False
        self._move_to(pointer)
        return True

    def _move_to(self, pointer: Pointer) -> None:
        log.warning(
            "fleet: the fleet runs generation %d (%d shards) now, not %d: retiring ours",
            pointer.generation,
            pointer.shard_count,
            self.generation,
        )
        self.send(Superseded(pointer.generation, pointer.shard_count))
        self._switch_keys(pointer)
        metrics.leases_held.set(0)

    def _switch_keys(self, pointer: Pointer) -> None:
        """Our leases of the old generation die with it (nobody may claim those any more)."""
        self.generation = pointer.generation
        self.shard_count = pointer.shard_count
        self.keys = self.keys.of_generation(pointer.generation)
        self.book = LeaseBook(self.client, self.keys, self.config.member, self.config.lease)
        self.owned.clear()
        self.handing_off.clear()
        self._expiry.clear()

    # ------------------------------------------------------------------ reshard

    @property
    def _lock_ms(self) -> int:
        return max(1000, round(self.config.lease * LOCK_LEASES * 1000))

    async def lock_reshard(self) -> None:
        """Take the fleet's reshard lock for our supervisor (answer: :class:`Locked`)."""
        try:
            ok = bool(
                int(
                    await self._lock(
                        keys=[self.keys.reshard_lock], args=[self._lock_value, self._lock_ms]
                    )
                )
            )
            holder = "" if ok else (await self.client.get(self.keys.reshard_lock) or b"")
        except REDIS_ERRORS as exc:
            log.warning("fleet: could not take the reshard lock (%s)", exc)
            self.send(Locked(False, "redis unreachable"))
            return
        self.lock_held = ok
        who = holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)
        self.send(Locked(ok, who.rpartition(" ")[0]))

    async def unlock_reshard(self) -> None:
        if not self.lock_held:
            return
        self.lock_held = False
        with contextlib.suppress(*REDIS_ERRORS):
            await self._unlock(keys=[self.keys.reshard_lock], args=[self._lock_value])

    async def switch(self, generation: int, shard_count: int) -> None:
        """Our supervisor's new generation publishes: take every lease of it, then point the
        fleet at it (the others retire their shards of the old one and take ours as we hand
        them off), then let the old leases and the lock go."""
        async with self._serial:
            await self._switch(generation, shard_count)

    async def _switch(self, generation: int, shard_count: int) -> None:
        old = dict(self.owned)
        old_book = self.book
        pointer = Pointer(generation, shard_count)
        self._switch_keys(pointer)
        now = self.clock()
        until = now + self.config.lease * LOCAL_SHARE
        for shard in self.shards():
            epoch = await self.book.claim(shard)
            if epoch <= 0:
                log.error("fleet: shard %d of generation %d is not free", shard, generation)
                continue
            self.owned[shard] = _Held(epoch, until)
            metrics.lease_acquisitions.labels("switch").inc()
            self.send(Own(shard, epoch, until, how="switch", generation=generation))
        metrics.leases_held.set(len(self.owned))
        moved = int(
            await self._point(keys=[self.keys.pointer], args=[generation, format_pointer(pointer)])
        )
        if not moved:
            log.error("fleet: the generation pointer was already at %d or beyond", generation)
        else:
            log.info("fleet: generation %d (%d shards) is the fleet's", generation, shard_count)
        await self.client.publish(self.keys.free, "switch")  # the others look now
        self._last_handoff = self.clock() + SWITCH_SETTLE - HANDOFF_GAP
        for shard, held in old.items():
            with contextlib.suppress(*REDIS_ERRORS):
                await old_book.release(shard, held.epoch)
        await self.unlock_reshard()

    async def _renew(self, now: float) -> None:
        owned = {shard: held.epoch for shard, held in self.owned.items()}
        if not owned:
            return
        results = await self.book.renew(owned)
        until = now + self.config.lease * LOCAL_SHARE
        renewed: dict[int, float] = {}
        for shard, ours in results.items():
            held = self.owned.get(shard)
            if held is None or held.epoch != owned[shard]:
                continue  # let go (or taken again) while we were asking
            if ours:
                held.until = until
                renewed[shard] = until
            else:
                self._lose(shard, "taken")
        if renewed:
            self.send(Leases(renewed))

    def _expire_local(self) -> None:
        """No renewal got through: shards past their local deadline are lost (the workers
        already stopped publishing them)."""
        now = self.clock()
        for shard, held in list(self.owned.items()):
            if now > held.until:
                self._lose(shard, "expired")

    def _lose(self, shard: int, reason: str) -> None:
        self.owned.pop(shard, None)
        self.handing_off.pop(shard, None)
        metrics.lease_losses.labels(reason).inc()
        metrics.leases_held.set(len(self.owned))
        log.warning("fleet: lost shard %d (%s)", shard, reason)
        self.send(Lose(shard, reason, self.generation))

    async def _members(self) -> dict[str, dict[str, int]]:
        """Refresh us in the membership hash; the live members (seen within a lease)."""
        seconds, micros = await self.client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        me = {"capacity": self.config.capacity, "shards": len(self.owned), "seen": now_ms}
        if self.config.allowed is not None:
            me["allowed"] = len(self.config.allowed)
        if self.draining:  # leaving: the others count without us (and claim what we let go)
            await self.client.hdel(self.keys.members, self.config.member)
        else:
            await self.client.hset(self.keys.members, self.config.member, json.dumps(me))
        raw = await self.client.hgetall(self.keys.members)
        live: dict[str, dict[str, int]] = {}
        lease_ms = self.config.lease * 1000
        for key, value in raw.items():
            member = key.decode() if isinstance(key, bytes) else str(key)
            try:
                info = json.loads(value)
                seen = int(info["seen"])
            except (ValueError, KeyError, TypeError):
                continue
            if now_ms - seen <= lease_ms:
                live[member] = info
            elif now_ms - seen > 10 * lease_ms:  # long gone: tidy the hash
                await self.client.hdel(self.keys.members, member)
        if self.draining:
            live.pop(self.config.member, None)
        return live

    def _note_expiry(self, owners: dict[int, Owner | None], now: float) -> None:
        for shard, owner in owners.items():
            if owner is not None and owner.member != self.config.member:
                self._expiry[shard] = now + owner.ttl

    def _adopt(self, owners: dict[int, Owner | None], now: float) -> None:
        """Leases of ours we do not know of (the agent restarted): keep them. Only in the first
        round: later, a lease of ours we do not hold is one being let go."""
        for shard, owner in owners.items():
            if owner is None or owner.member != self.config.member or shard in self.owned:
                continue
            until = now + min(owner.ttl, self.config.lease * LOCAL_SHARE)
            self.owned[shard] = _Held(owner.epoch, until)
            self.send(Own(shard, owner.epoch, until, how="keep", generation=self.generation))

    def _targets(self, members: dict[str, dict[str, int]]) -> dict[str, int]:
        allowed = {m: int(i["allowed"]) for m, i in members.items() if "allowed" in i}
        capacities = {m: int(i.get("capacity", 0)) for m, i in members.items()}
        if not self.draining:
            capacities.setdefault(self.config.member, self.config.capacity)
        return targets(self.shard_count, capacities, allowed=allowed)

    async def _claim(
        self, owners: dict[int, Owner | None], goal: dict[str, int], now: float
    ) -> None:
        allowed = self.config.allowed
        free = [s for s, o in owners.items() if o is None and (allowed is None or s in allowed)]
        mine = goal.get(self.config.member, 0)
        for shard in to_claim(self.config.member, mine, len(self.owned), free):
            epoch = await self.book.claim(shard)
            if epoch < 0:
                return  # the fleet moved on: the next round retires our generation
            if not epoch:
                continue  # someone was quicker
            claimed_at = self.clock()
            until = claimed_at + self.config.lease * LOCAL_SHARE
            self.owned[shard] = _Held(epoch, until)
            expired_at = self._expiry.pop(shard, None)
            how = "failover" if expired_at is not None and expired_at <= claimed_at else "claim"
            metrics.lease_acquisitions.labels(how).inc()
            if how == "failover":
                metrics.failovers.labels("lease_expired").inc()
            metrics.leases_held.set(len(self.owned))
            log.info("fleet: shard %d is ours (epoch %d, %s)", shard, epoch, how)
            self.send(
                Own(shard, epoch, until, how=how, expired_at=expired_at, generation=self.generation)
            )

    def _rebalance(self, owners: dict[int, Owner | None], goal: dict[str, int], now: float) -> None:
        if self.handing_off or now - self._last_handoff < HANDOFF_GAP:
            return
        counts: dict[str, int] = {}
        for owner in owners.values():
            if owner is not None:
                counts[owner.member] = counts.get(owner.member, 0) + 1
        free = sum(1 for o in owners.values() if o is None)
        shard = to_hand_off(self.config.member, goal, counts, self.owned, free)
        if shard is not None:
            self._hand_off(shard, "rebalance", now)

    def _hand_off(self, shard: int, reason: str, now: float) -> None:
        self.handing_off[shard] = now
        self._last_handoff = now
        metrics.handoffs.labels(reason).inc()
        log.info("fleet: handing shard %d off (%s)", shard, reason)
        self.send(HandOff(shard, reason, self.generation))

    def _view(
        self,
        members: dict[str, dict[str, int]],
        owners: dict[int, Owner | None],
        goal: dict[str, int],
    ) -> None:
        now_ms = time.time() * 1000
        view = [
            MemberView(
                member=m,
                capacity=int(i.get("capacity", 0)),
                shards=int(i.get("shards", 0)),
                seen_ago=round(max(0.0, now_ms - int(i.get("seen", 0))) / 1000, 1),
            )
            for m, i in sorted(members.items())
        ]
        owned = {s: (o.member, o.epoch) for s, o in owners.items() if o is not None}
        self.send(FleetView(members=view, owners=owned, targets=goal))
