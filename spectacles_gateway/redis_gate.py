"""The identify gate shared through Redis by every process and host of one bot.

One key per rate-limit bucket, ``<prefix>identify:<bucket>`` (``bucket = shard_id %
max_concurrency``, ``prefix`` is ``[shard_store] prefix``). Whoever holds the key may identify
one shard of that bucket:

1. **acquire**: ``SET key <random token> NX PX <lease>`` (one Lua call that also returns the
   key's PTTL when it is taken, so a waiter sleeps exactly until it may try again, at most
   :data:`POLL_MAX` seconds). The lease (:data:`LEASE`) is renewed every third of itself while
   the holder connects, so a holder that crashed blocks its bucket for one lease at most.
2. **release** after the IDENTIFY was written at ``sent_at`` (loop time): the key is set to
   expire when the identify window (5 s + :data:`~.protocol.identify.IDENTIFY_MARGIN`)
   has passed since ``sent_at``, with ``PEXPIRE``; without an IDENTIFY (``sent_at=None``) it is
   deleted. Both only if the key still holds our token (compare-and-set in Lua).

Resumes never come here. While Redis is unreachable identifies wait (one warning per outage):
identifying without the gate could break Discord's limits across hosts.

**The daily session start budget** is kept in the same Redis for every process and host
(``<prefix>identify:budget``: ``total``, ``remaining``, ``reset_at`` in Unix ms by Redis' clock):
taking a bucket's key spends one start in the same script, a permit given back without an
IDENTIFY refunds it, and with nothing left the script refuses until the reset, so the hosts of
a fleet together never start more sessions than Discord allows. Each process seeds it with
Discord's last answer it knows (:attr:`~.plan.WorkerPlan.session_budget`): a newer window
replaces an older one, and within a window the lower ``remaining`` wins.

The gate can wrap an in-process gate (``local``): that one is taken first and keeps what only a
process knows (the daily session start budget, FIFO order among the process's own shards,
the window of its own identifies even if Redis loses the key).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from .protocol.identify import IDENTIFY_MARGIN, IDENTIFY_WINDOW, bucket_of
from .redis_link import REDIS_ERRORS, Outage, redis_client

if TYPE_CHECKING:
    from .config import Settings
    from .plan import WorkerPlan
    from .transport import IdentifyGateLike

__all__ = ["LEASE", "POLL_MAX", "RedisIdentifyGate", "RedisPermit"]

log = logging.getLogger(__name__)

#: Seconds a taken key lives without renewal (a crashed holder blocks its bucket this long).
LEASE = 15.0
#: Longest sleep between two tries of a waiter.
POLL_MAX = 0.5

# KEYS: the bucket's key, the budget hash. ARGV: token, lease (ms), then the seed: total,
# remaining, reset_at (Unix ms; 0: no seed). SET NX PX and spend one start; {1, 0} when taken.
# When the key is taken: {0, its PTTL} (-1: no TTL, -2: just expired). With no start left:
# {2, ms until the reset}. A key that already holds our token is ours (the reply to an earlier
# try was lost on the way): nothing is spent twice.
_ACQUIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = tonumber(ARGV[3])
local seed_left = tonumber(ARGV[4])
local seed_reset = tonumber(ARGV[5])
local reset = tonumber(redis.call('HGET', KEYS[2], 'reset_at') or '0')
if seed_reset > 0 then
  if reset <= now or seed_reset > reset + 60000 then
    if seed_reset > now then
      redis.call('HSET', KEYS[2], 'total', total, 'remaining', seed_left, 'reset_at', seed_reset)
    else
      redis.call('HSET', KEYS[2], 'total', total, 'remaining', total, 'reset_at', now + 86400000)
    end
  elseif seed_reset > reset - 60000 then
    local left = tonumber(redis.call('HGET', KEYS[2], 'remaining') or seed_left)
    if seed_left < left then
      redis.call('HSET', KEYS[2], 'remaining', seed_left)
    end
  end
elseif reset > 0 and reset <= now then
  local full = tonumber(redis.call('HGET', KEYS[2], 'total') or '0')
  redis.call('HSET', KEYS[2], 'remaining', full, 'reset_at', now + 86400000)
end
local left = redis.call('HGET', KEYS[2], 'remaining')
if left and tonumber(left) <= 0 then
  return {2, tonumber(redis.call('HGET', KEYS[2], 'reset_at')) - now}
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if left then
    redis.call('HINCRBY', KEYS[2], 'remaining', -1)
  end
  return {1, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
"""
# KEYS: the bucket's key, the budget hash. If the key is ours: ARGV[2] > 0 -> PEXPIRE to it
# (an IDENTIFY was sent), else DEL and, when ARGV[3] is 1, give the start back (none was sent).
# Returns 1 if it was ours.
_SETTLE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ms = tonumber(ARGV[2])
if ms > 0 then
  redis.call('PEXPIRE', KEYS[1], ms)
else
  redis.call('DEL', KEYS[1])
  if ARGV[3] == '1' and redis.call('HEXISTS', KEYS[2], 'remaining') == 1 then
    redis.call('HINCRBY', KEYS[2], 'remaining', 1)
  end
end
return 1
"""


@dataclass
class RedisPermit:
    shard_id: int
    bucket: int
    key: str
    token: str
    inner: object = None  # the local gate's permit
    renewer: asyncio.Task[None] | None = field(default=None, repr=False)
    released: bool = False
    sent: bool = False  # an IDENTIFY went out under it (the start is spent for good)


class RedisIdentifyGate:
    """:class:`~spectacles_gateway.transport.IdentifyGateLike` through Redis; see the module
    docstring for the algorithm."""

    def __init__(
        self,
        client: Redis,
        max_concurrency: int,
        *,
        prefix: str = "gateway",
        url: str = "",
        window: float = IDENTIFY_WINDOW,
        lease: float = LEASE,
        local: IdentifyGateLike | None = None,
        op_timeout: float = 3.0,
        budget: tuple[int, int, int] | None = None,
    ) -> None:
        self.client = client
        self.max_concurrency = max(1, max_concurrency)
        self.prefix = prefix
        #: Seconds between two identifies of one bucket, margin included.
        self.window = window + IDENTIFY_MARGIN
        self.lease = lease
        self.local = local
        self.op_timeout = op_timeout
        self.outage = Outage("identify gate", url, base=0.25, cap=2.0)
        self._locks = [asyncio.Lock() for _ in range(self.max_concurrency)]
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._rand = random.Random()
        #: Discord's last answer we know: (total, remaining, reset_at in Unix ms).
        self.budget = budget
        self._told_spent = False

    @classmethod
    def from_settings(
        cls, settings: Settings, plan: WorkerPlan, *, local: IdentifyGateLike | None = None
    ) -> RedisIdentifyGate:
        return cls(
            redis_client(settings, name="spectacles-identify-gate"),
            plan.max_concurrency,
            prefix=settings.shard_store.prefix,
            url=settings.redis.url,
            local=local,
            budget=plan.session_budget,
        )

    def key(self, bucket: int) -> str:
        return f"{self.prefix}identify:{bucket}"

    @property
    def budget_key(self) -> str:
        return f"{self.prefix}identify:budget"

    # ------------------------------------------------------------------ IdentifyGateLike

    async def acquire(self, shard_id: int) -> RedisPermit:
        """Wait until this shard may connect and IDENTIFY; hand the permit to :meth:`release`."""
        bucket = bucket_of(shard_id, self.max_concurrency)
        inner = await self.local.acquire(shard_id) if self.local is not None else None
        lock = self._locks[bucket]
        try:
            await lock.acquire()  # one waiter per bucket and process polls Redis
            try:
                permit = RedisPermit(shard_id, bucket, self.key(bucket), secrets.token_hex(16))
                await self._take(permit)
            except BaseException:
                lock.release()
                raise
        except BaseException:
            if self.local is not None:
                self.local.release(inner, None)
            raise
        permit.inner = inner
        permit.renewer = asyncio.get_running_loop().create_task(
            self._renew(permit), name=f"identify-lease-{shard_id}"
        )
        return permit

    def release(self, permit: object, sent_at: float | None) -> None:
        """The IDENTIFY was written at ``sent_at`` (loop time), or not at all (None)."""
        assert isinstance(permit, RedisPermit)
        permit.released = True
        if permit.renewer is not None:
            permit.renewer.cancel()
        if self.local is not None:
            self.local.release(permit.inner, sent_at)
        loop = asyncio.get_running_loop()
        until = None if sent_at is None else sent_at + self.window
        permit.sent = sent_at is not None
        task = loop.create_task(self._finish(permit, until), name="identify-release")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Let pending releases finish (bounded), then disconnect."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        await self.client.aclose()

    # ------------------------------------------------------------------ internals

    async def _take(self, permit: RedisPermit) -> None:
        loop = asyncio.get_running_loop()
        lease_ms = str(math.ceil(self.lease * 1000))
        keys = [permit.key, self.budget_key]
        total, left, reset_at = self.budget if self.budget is not None else (0, 0, 0)
        args: list[str | int] = [permit.token, lease_ms, total, left, reset_at]
        while True:
            try:
                async with asyncio.timeout(self.op_timeout):
                    reply = await self._acquire(keys=keys, args=args)
            except REDIS_ERRORS as exc:
                delay = self.outage.failed(
                    loop.time(), exc, "; identifies wait until it is back (resumes go on)"
                )
                await asyncio.sleep(delay)
                continue
            self.outage.succeeded(loop.time())
            taken, pttl = int(reply[0]), int(reply[1])
            if taken == 1:
                self._told_spent = False
                return
            if taken == 2:  # the fleet's daily budget is spent: wait for Discord's reset
                if not self._told_spent:
                    self._told_spent = True
                    log.warning(
                        "identify gate: Discord's daily session start budget is spent (shared "
                        "in Redis by every host): identifies wait %.0f s for its reset",
                        pttl / 1000,
                    )
                await asyncio.sleep(min(5.0, max(0.05, pttl / 1000)))
                continue
            if pttl == -2:  # expired between SET and PTTL
                continue
            wait = POLL_MAX if pttl < 0 else min(POLL_MAX, pttl / 1000)
            # A little jitter keeps waiters of several hosts from meeting at the same instant.
            await asyncio.sleep(wait + self._rand.uniform(0.0, 0.02))

    async def _renew(self, permit: RedisPermit) -> None:
        lease_ms = str(math.ceil(self.lease * 1000))
        while True:
            await asyncio.sleep(self.lease / 3)
            if permit.released:  # (should a cancellation have been swallowed)
                return
            try:
                async with asyncio.timeout(self.op_timeout):
                    ours = await self._settle(
                        keys=[permit.key, self.budget_key], args=[permit.token, lease_ms, "0"]
                    )
            except REDIS_ERRORS as exc:
                log.debug("shard %d: could not renew the identify lease: %s", permit.shard_id, exc)
                continue
            if not int(ours):
                log.warning(
                    "shard %d: the identify lease of bucket %d was lost (Redis restarted?)",
                    permit.shard_id,
                    permit.bucket,
                )
                return

    async def _finish(self, permit: RedisPermit, until: float | None) -> None:
        """Set the key to expire at ``until`` (loop time) or delete it; then let the next
        waiter of this process in. Retried while it matters (the lease ends it otherwise)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.lease
        try:
            renewer, permit.renewer = permit.renewer, None
            if renewer is not None:  # a renewal in flight must not land after us
                await asyncio.wait({renewer}, timeout=self.op_timeout)
            while True:
                ms = 0 if until is None else math.ceil((until - loop.time()) * 1000)
                try:
                    async with asyncio.timeout(self.op_timeout):
                        await self._settle(
                            keys=[permit.key, self.budget_key],
                            args=[permit.token, str(max(0, ms)), "0" if permit.sent else "1"],
                        )
                    return
                except REDIS_ERRORS as exc:
                    delay = self.outage.failed(loop.time(), exc)
                    if loop.time() + delay >= give_up:
                        return  # the lease expires by itself
                    await asyncio.sleep(delay)
        finally:
            self._locks[permit.bucket].release()
