"""The shards one worker runs, and how they come and go.

A worker started with a fixed plan runs its shards until it stops. In fleet mode shards come
(:meth:`ShardSet.add`, under a lease epoch and deadline) and go (:meth:`ShardSet.release`: closed
resumably, the broker given time to confirm what they published, the final session saved under
the same epoch, so the next owner resumes exactly where this one stopped).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import metrics
from .protocol.state import Session
from .runner import ShardRunner
from .transport import EventHandler, IdentifyGateLike

if TYPE_CHECKING:
    from .plan import WorkerPlan
    from .store import ShardStore

__all__ = ["ShardSet"]

log = logging.getLogger(__name__)

#: How long a released shard waits for the broker to confirm what it published.
CONFIRM_WAIT = 5.0


class ShardSet:
    def __init__(
        self,
        plan: WorkerPlan,
        handler: EventHandler,
        gate: IdentifyGateLike,
        store: ShardStore,
        *,
        on_done: Callable[[ShardRunner, int | None], None],
    ) -> None:
        self.plan = plan
        self.handler = handler
        self.gate = gate
        self.store = store
        self.on_done = on_done
        self.runners: dict[int, ShardRunner] = {}
        self.tasks: dict[int, asyncio.Task[int | None]] = {}
        self.epochs: dict[int, int] = {}  # fleet: the lease epoch each shard is held under
        self.saved: dict[int, Session | None] = {}  # what the store holds, as far as we know
        #: Fleet mode: some shard runs under a lease (else :meth:`check_leases` has nothing
        #: to look at, and 2,500 idle shards cost no call a second each).
        self.leased = False

    async def add(
        self, shard_id: int, *, epoch: int = 0, until: float | None = None
    ) -> ShardRunner:
        """Load the shard's session and make its runner (not started yet)."""
        session = await self.store.load(shard_id, self.plan.shard_count)
        self.saved[shard_id] = session
        if session is not None:
            log.info(
                "shard %d: stored session %s… at seq %s: will resume",
                shard_id,
                session.session_id[:8],
                session.seq,
            )
        runner = ShardRunner(
            self.plan.shard_config(shard_id),
            self.handler,
            self.gate,
            session=session,
            open_timeout=self.plan.open_timeout,
            max_message_size=self.plan.max_message_size,
        )
        runner.lease_until = until
        self.leased = self.leased or until is not None
        if self.plan.cover:
            runner.core.cover(self.plan.cover_count, self.plan.cover)
        self.runners[shard_id] = runner
        self.epochs[shard_id] = epoch
        metrics.shards_alive.labels(str(shard_id)).set(0)
        return runner

    def start(self, runner: ShardRunner) -> None:
        task = runner.start()
        self.tasks[runner.shard_id] = task
        task.add_done_callback(functools.partial(self._done, runner))

    def _done(self, runner: ShardRunner, task: asyncio.Task[int | None]) -> None:
        code = None
        if not task.cancelled() and task.exception() is None:
            code = task.result()
        elif not task.cancelled():
            log.error("shard %d: its runner failed", runner.shard_id, exc_info=task.exception())
        self.on_done(runner, code)

    def set_leases(self, until: dict[int, float]) -> None:
        for shard_id, deadline in until.items():
            runner = self.runners.get(shard_id)
            if runner is not None:
                runner.lease_until = deadline
                self.leased = True

    def check_leases(self, now: float) -> None:
        if not self.leased:
            return
        for runner in list(self.runners.values()):
            runner.check_lease(now)

    async def release(
        self, shard_id: int, *, save: bool, confirmed: Callable[[], None]
    ) -> Session | None:
        """Close the shard resumably and forget it. ``confirmed()`` is asked to bring the
        broker's confirmations in while we wait for them. Returns the session left behind
        (saved when ``save``), None when there is none."""
        runner = self.runners.get(shard_id)
        if runner is None:
            return None
        runner.stop(keep_session=True)
        task = self.tasks.get(shard_id)
        if task is not None:
            await asyncio.wait({task}, timeout=self.plan.shutdown_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONFIRM_WAIT
        while save and loop.time() < deadline:
            stats = runner.stats()
            if stats.confirmed_seq == stats.seq:
                break
            confirmed()
            await asyncio.sleep(0.01)
        session = runner.session()
        if save:
            await self.store.save(
                shard_id, self.plan.shard_count, session, epoch=self.epochs.get(shard_id, 0)
            )
        self.store.forget(shard_id)
        self.forget(shard_id)
        return session if save else None

    def forget(self, shard_id: int) -> None:
        self.runners.pop(shard_id, None)
        self.tasks.pop(shard_id, None)
        self.epochs.pop(shard_id, None)
        self.saved.pop(shard_id, None)
        metrics.shards_alive.remove(str(shard_id))
        metrics.shard_latency.remove(str(shard_id))

    async def stop_all(self, *, keep_session: bool, wait: float) -> None:
        for runner in self.runners.values():
            runner.stop(keep_session=keep_session)
        tasks = list(self.tasks.values())
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=wait)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
