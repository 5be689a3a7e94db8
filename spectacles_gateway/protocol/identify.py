"""Identify rules as pure code (discord.md §5, §8): the payload, its size limit, and pacing.

``max_concurrency`` buckets (``shard_id % max_concurrency``): identifies in one bucket at least
``window`` seconds apart; different buckets may identify together, lowest shard ids first. The
daily session start budget is never run out: with nothing left, wait for its reset.

:class:`IdentifyPacer` is the one pacing core: the supervisor drives it from its select loop,
:class:`~spectacles_gateway.gate.LocalIdentifyGate` from asyncio, and the Redis gate keeps its
window and margin for the leases it takes across hosts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = [
    "IDENTIFY_MARGIN",
    "IDENTIFY_WINDOW",
    "MAX_PAYLOAD_BYTES",
    "IdentifyPacer",
    "SessionBudget",
    "bucket_of",
    "identify_payload",
    "pacer_key",
    "shard_of_key",
]

#: Seconds between two identifies of one bucket (Discord's rule).
IDENTIFY_WINDOW = 5.0
#: Added to every identify window: our clock reads the time an IDENTIFY was handed to the
#: socket, Discord's the time it arrived; jitter between the two must never make two identifies
#: of one bucket look closer than the window.
IDENTIFY_MARGIN = 0.15
#: Discord closes with 4002 on a sent payload over this many bytes.
MAX_PAYLOAD_BYTES = 4096


def bucket_of(shard_id: int, max_concurrency: int) -> int:
    """The identify rate-limit key of a shard."""
    return shard_id % max(1, max_concurrency)


_SHARD_BITS = 32
_SHARD_MASK = (1 << _SHARD_BITS) - 1


def pacer_key(shard_id: int, generation: int = 0) -> int:
    """What :class:`IdentifyPacer` knows a shard by: during a reshard two generations run
    shards with the same ids (and Discord's buckets, ``shard_id % max_concurrency``, span both).
    Generation 0's keys are the shard ids themselves; lower keys are served first, so an older
    generation's shard that must identify again goes before the new generation's."""
    return generation << _SHARD_BITS | shard_id


def shard_of_key(key: int) -> tuple[int, int]:
    """``(shard_id, generation)`` of a :func:`pacer_key`."""
    return key & _SHARD_MASK, key >> _SHARD_BITS


def identify_payload(
    *,
    token: str,
    intents: int,
    properties: Mapping[str, str],
    large_threshold: int,
    shard: tuple[int, int],
    presence: Mapping[str, Any] | None,
) -> bytes:
    """The op 2 IDENTIFY payload. Raises ValueError when it is over Discord's 4096 bytes (a long
    presence can do that): better refused at start-up than closed with 4002 by Discord."""
    d: dict[str, Any] = {
        "token": token,
        "intents": intents,
        "properties": dict(properties),
        "compress": False,
        "large_threshold": large_threshold,
        "shard": list(shard),
    }
    if presence is not None:
        d["presence"] = dict(presence)
    payload = msgspec.json.encode({"op": 2, "d": d})
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"IDENTIFY would be {len(payload)} bytes, over Discord's {MAX_PAYLOAD_BYTES}-byte "
            "limit (shorten the presence)"
        )
    return payload


class SessionBudget(msgspec.Struct):
    """``session_start_limit`` from ``/gateway/bot``, on our clock."""

    total: int
    remaining: int
    reset_at: float  # clock time at which ``remaining`` goes back to ``total``

    def wait_before_identify(self, now: float) -> float:
        """Seconds to wait before one more identify may be spent (0: go now)."""
        if now >= self.reset_at:
            return 0.0
        return 0.0 if self.remaining > 0 else self.reset_at - now

    def spend(self, now: float, reset_after: float = 86_400.0) -> None:
        """Count one identify at ``now``; after the reset time the full budget is back."""
        if now >= self.reset_at:
            self.remaining = self.total
            self.reset_at = now + reset_after
        self.remaining = max(0, self.remaining - 1)


class _Bucket(msgspec.Struct, gc=False):  # (ints and a set of ints: no cycles)
    holder: int | None = None  # shard holding the permit
    free_at: float = 0.0  # when the next identify of this bucket may be sent
    waiting: set[int] = msgspec.field(default_factory=set)


class IdentifyPacer:
    """Who may identify when: permits per bucket, no clock reads, no I/O.

    Callers :meth:`request` a permit for a shard, learn from :meth:`grants` (at the time
    :meth:`next_time` names) which shards hold one now, and :meth:`release` it once the
    IDENTIFY was sent (or not). At most one permit per bucket at a time; the next one of a bucket
    only ``window`` seconds after the previous IDENTIFY was sent; lowest shard ids first; never
    more than the session start budget allows.
    """

    def __init__(
        self,
        max_concurrency: int,
        *,
        window: float = IDENTIFY_WINDOW + IDENTIFY_MARGIN,
        budget: SessionBudget | None = None,
    ) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.window = window
        self.budget = budget
        self._buckets = [_Bucket() for _ in range(self.max_concurrency)]
        self.identified = 0  # IDENTIFYs sent through this pacer
        self.waiting = 0  # shards waiting for a permit
        self.holding = 0  # permits handed out and not back yet

    def _bucket(self, shard_id: int) -> _Bucket:
        return self._buckets[bucket_of(shard_id & _SHARD_MASK, self.max_concurrency)]

    def request(self, shard_id: int) -> None:
        """``shard_id`` wants to identify (it waits for :meth:`grants` to name it)."""
        waiting = self._bucket(shard_id).waiting
        if shard_id not in waiting:
            waiting.add(shard_id)
            self.waiting += 1

    def cancel(self, shard_id: int) -> None:
        """Forget a request or a held permit without an IDENTIFY (worker died, gave up)."""
        bucket = self._bucket(shard_id)
        if shard_id in bucket.waiting:
            bucket.waiting.discard(shard_id)
            self.waiting -= 1
        if bucket.holder == shard_id:
            bucket.holder = None
            self.holding -= 1

    def release(self, shard_id: int, sent_at: float | None) -> None:
        """The permit comes back: ``sent_at`` is when the IDENTIFY was sent, None if it wasn't."""
        bucket = self._bucket(shard_id)
        if bucket.holder != shard_id:
            return
        bucket.holder = None
        self.holding -= 1
        if sent_at is not None:
            bucket.free_at = max(bucket.free_at, sent_at + self.window)
            self.identified += 1
            if self.budget is not None:
                self.budget.spend(sent_at)

    def grants(self, now: float) -> list[int]:
        """Shards that may identify now (each now holds the permit of its bucket)."""
        ready = [b for b in self._buckets if b.holder is None and b.waiting and now >= b.free_at]
        if not ready:
            return []
        allowed = len(ready)
        budget = self.budget
        if budget is not None:
            # Permits out are identifies the budget has not counted yet: never hand out more
            # than what is left of it.
            left = budget.total if now >= budget.reset_at else budget.remaining
            allowed = min(allowed, left - self.holding)
        # Lowest shard ids first across buckets: the order Discord asks buckets to start in.
        ready.sort(key=lambda b: min(b.waiting))
        out: list[int] = []
        for bucket in ready[: max(0, allowed)]:
            shard_id = min(bucket.waiting)
            bucket.waiting.discard(shard_id)
            bucket.holder = shard_id
            out.append(shard_id)
        self.waiting -= len(out)
        self.holding += len(out)
        return out

    def seconds_left(self, now: float) -> float:
        """Seconds until the last shard waiting now has identified, at Discord's pace: each
        bucket's waiting shards one per window, the first once the bucket is free (a permit
        out frees it a window after its IDENTIFY). Uneven buckets count (a shard subset whose
        ids share a bucket waits for that bucket alone); a spent session budget adds its reset."""
        worst = 0.0
        for bucket in self._buckets:
            waiting = len(bucket.waiting)
            if not waiting:
                continue
            start = max(now, bucket.free_at)
            if bucket.holder is not None:
                start = max(start, now + self.window)
            worst = max(worst, start + (waiting - 1) * self.window - now)
        budget = self.budget
        short = budget is not None and budget.remaining - self.holding < self.waiting
        if short and budget is not None and now < budget.reset_at:
            worst = max(worst, budget.reset_at - now)
        return worst

    def next_time(self, now: float) -> float | None:
        """When :meth:`grants` may name a shard next (None: nobody is waiting)."""
        if not self.waiting:
            return None
        times = [b.free_at for b in self._buckets if b.waiting and b.holder is None]
        if not times:
            return None
        at = max(now, min(times))
        budget = self.budget
        if budget is not None:
            at = max(at, now + budget.wait_before_identify(now))
            if self.holding and budget.remaining - self.holding <= 0 and now < budget.reset_at:
                return None  # the permits out may use the last of the budget: their release decides
        return at
