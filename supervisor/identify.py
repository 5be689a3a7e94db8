"""The identify gate of a supervisor, as a pure scheduler (no clock reads, no I/O).

Workers ask for a permit per shard; the scheduler grants at most one permit per bucket
(``shard_id % max_concurrency``) at a time, the next one of a bucket only ``window`` seconds after
the previous IDENTIFY was sent, lowest shard ids first (buckets "in order"), and never more than
the daily session start budget allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spectacles_gateway.gate import IDENTIFY_MARGIN
from spectacles_gateway.protocol.identify import IDENTIFY_WINDOW, SessionBudget, bucket_of

__all__ = ["IdentifyScheduler"]


@dataclass
class _Bucket:
    holder: int | None = None  # shard holding the permit
    free_at: float = 0.0  # when the next identify of this bucket may be sent
    waiting: set[int] = field(default_factory=set)


class IdentifyScheduler:
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
        self.identified = 0  # IDENTIFYs sent through this gate

    def request(self, shard_id: int) -> None:
        """A worker wants to identify ``shard_id`` (it waits for :meth:`grants` to name it)."""
        self._buckets[bucket_of(shard_id, self.max_concurrency)].waiting.add(shard_id)

    def cancel(self, shard_id: int) -> None:
        """Forget a request or a held permit without an IDENTIFY (worker died, gave up)."""
        bucket = self._buckets[bucket_of(shard_id, self.max_concurrency)]
        bucket.waiting.discard(shard_id)
        if bucket.holder == shard_id:
            bucket.holder = None

    def release(self, shard_id: int, sent_at: float | None) -> None:
        """The permit comes back: ``sent_at`` is when the IDENTIFY was sent, None if it wasn't."""
        bucket = self._buckets[bucket_of(shard_id, self.max_concurrency)]
        if bucket.holder != shard_id:
            return
        bucket.holder = None
        if sent_at is not None:
            bucket.free_at = max(bucket.free_at, sent_at + self.window)
            self.identified += 1
            if self.budget is not None:
                self.budget.spend(sent_at)

    def grants(self, now: float) -> list[int]:
        """Shards that may identify now (each gets the permit of its bucket)."""
        out: list[int] = []
        budget = self.budget
        # Lowest shard ids first across buckets: the order Discord asks buckets to start in.
        for bucket in sorted(self._buckets, key=lambda b: min(b.waiting, default=1 << 62)):
            if bucket.holder is not None or not bucket.waiting or now < bucket.free_at:
                continue
            if budget is not None and budget.wait_before_identify(now) > 0:
                break
            shard_id = min(bucket.waiting)
            bucket.waiting.discard(shard_id)
            bucket.holder = shard_id
            out.append(shard_id)
        return out

    def next_time(self, now: float) -> float | None:
        """When :meth:`grants` may name a shard next (None: nobody is waiting)."""
        times = [b.free_at for b in self._buckets if b.waiting and b.holder is None]
        if not times:
            return None
        at = max(now, min(times))
        if self.budget is not None:
            at = max(at, now + self.budget.wait_before_identify(now))
        return at

    @property
    def waiting(self) -> int:
        return sum(len(b.waiting) for b in self._buckets)
