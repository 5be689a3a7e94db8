"""The identify gate of one process: Discord's identify pacing applied to asyncio tasks.

A shard that must IDENTIFY takes its bucket's permit before it connects and gives it back as soon
as its IDENTIFY was written (or the connection failed first). The next shard of the bucket may
identify ``window`` seconds after that write. Resumes never come here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .protocol.identify import IDENTIFY_WINDOW, SessionBudget, bucket_of

__all__ = ["IDENTIFY_MARGIN", "LocalIdentifyGate", "Permit"]

#: Added to every identify window: our clock reads the time an IDENTIFY was handed to the
#: socket, Discord's the time it arrived; jitter between the two must never make two identifies
#: of one bucket look closer than the window.
IDENTIFY_MARGIN = 0.15

log = logging.getLogger(__name__)


@dataclass
class Permit:
    shard_id: int
    bucket: int


class LocalIdentifyGate:
    def __init__(
        self,
        max_concurrency: int,
        *,
        window: float = IDENTIFY_WINDOW,
        budget: SessionBudget | None = None,
        clock: Callable[[], float] | None = None,
        on_spend: Callable[[int], None] | None = None,
    ) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.window = window
        self.budget = budget
        self._clock = clock
        self._locks = [asyncio.Lock() for _ in range(self.max_concurrency)]
        self._next = [0.0] * self.max_concurrency
        self._on_spend = on_spend

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def acquire(self, shard_id: int) -> Permit:
        bucket = bucket_of(shard_id, self.max_concurrency)
        lock = self._locks[bucket]
        await lock.acquire()
        try:
            while True:
                now = self._now()
                wait = self._next[bucket] - now
                if self.budget is not None:
                    budget_wait = self.budget.wait_before_identify(now)
                    if budget_wait > 0:
                        log.warning(
                            "shard %d: Discord's daily session start budget is used up; "
                            "waiting %.0f s for it to reset before identifying",
                            shard_id,
                            budget_wait,
                        )
                        wait = max(wait, budget_wait)
                if wait <= 0:
                    return Permit(shard_id, bucket)
                await asyncio.sleep(wait)
        except BaseException:
            lock.release()
            raise

    def release(self, permit: object, sent_at: float | None) -> None:
        assert isinstance(permit, Permit)
        if sent_at is not None:
            self._next[permit.bucket] = sent_at + self.window + IDENTIFY_MARGIN
            if self.budget is not None:
                self.budget.spend(sent_at)
                if self._on_spend is not None:
                    self._on_spend(self.budget.remaining)
        self._locks[permit.bucket].release()
