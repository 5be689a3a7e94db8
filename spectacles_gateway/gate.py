"""The identify gate of one process: :class:`~.protocol.identify.IdentifyPacer` on asyncio.

A shard that must IDENTIFY takes its bucket's permit before it connects and gives it back as soon
as its IDENTIFY was written (or the connection failed first). The next shard of the bucket may
identify ``window`` seconds after that write. Resumes never come here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .protocol.identify import IDENTIFY_MARGIN, IDENTIFY_WINDOW, IdentifyPacer, SessionBudget

__all__ = ["LocalIdentifyGate"]

log = logging.getLogger(__name__)


class LocalIdentifyGate:
    """Permits are shard ids; waiters are woken by one timer at the pacer's next time."""

    def __init__(
        self,
        max_concurrency: int,
        *,
        window: float = IDENTIFY_WINDOW,
        budget: SessionBudget | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.pacer = IdentifyPacer(max_concurrency, window=window + IDENTIFY_MARGIN, budget=budget)
        self.budget = budget
        self._clock = clock
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._budget_warned = False

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def acquire(self, shard_id: int) -> int:
        future = asyncio.get_running_loop().create_future()
        self._waiters[shard_id] = future
        self.pacer.request(shard_id)
        self._schedule()
        try:
            await future
        except BaseException:
            self._waiters.pop(shard_id, None)
            self.pacer.cancel(shard_id)  # a request, or a permit granted as we were cancelled
            self._schedule()
            raise
        return shard_id

    def release(self, permit: object, sent_at: float | None) -> None:
        assert isinstance(permit, int)
        self.pacer.release(permit, sent_at)
        self._schedule()

    def _schedule(self) -> None:
        pacer = self.pacer
        now = self._now()
        for shard_id in pacer.grants(now):
            future = self._waiters.pop(shard_id, None)
            if future is None or future.done():
                pacer.cancel(shard_id)
            else:
                future.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = pacer.next_time(now)
        if at is None:
            return
        wait = at - now
        if self.budget is not None and self.budget.wait_before_identify(now) > 0:
            if not self._budget_warned:
                self._budget_warned = True
                log.warning(
                    "Discord's daily session start budget is used up; %d shards wait %.0f s for "
                    "it to reset before identifying",
                    pacer.waiting,
                    self.budget.wait_before_identify(now),
                )
        else:
            self._budget_warned = False
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, wait), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()
