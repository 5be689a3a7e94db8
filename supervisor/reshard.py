"""Resharding without downtime (fleet.md, "Resharding without downtime"), in one supervisor.

The old generation never stops while the new one comes up:

1. *Decide*: Discord's recommended count (``GET /gateway/bot``, every ``check_interval``) is
   above the running count (policy ``recommended``), a shard was closed with 4011 (sharding
   required), or an operator asked (``POST /reshard``, ``spectacles-supervise reshard``). The
   target is rounded up to a multiple of ``max_concurrency``.
2. *Budget*: the new generation spends one session start per shard; while what is left of
   Discord's daily budget would fall under the reserve, wait (logs and ``/status`` say so).
3. *Standby*: new workers run every new shard, identified under the same pacer as everything
   else, reading and publishing nothing.
4. *Switch*: once every new shard is READY and has its guilds (and every old one is still up),
   the new generation publishes; once each new worker said so, and ``overlap`` later, the old
   generation is retired: it tells consumers where it stopped (``GATEWAY_GAP``), closes with
   1000 and forgets its sessions, and the store records the new generation as current.
5. A reshard that cannot finish (a new worker dies, a new shard is refused, the time runs out)
   retires the new generation instead: the old one carried on all along.

The decisions are pure functions (:mod:`.reshardpolicy`); :class:`Reshard`
is the state machine, driven by the supervisor's loop (``tick``) and its workers' reports, and
does its I/O through the :class:`Host` the supervisor is.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from spectacles_gateway import metrics
from spectacles_gateway.discovery import GatewayBot
from spectacles_gateway.protocol.identify import IDENTIFY_MARGIN, IDENTIFY_WINDOW
from spectacles_gateway.protocol.state import Session

from .reshardpolicy import (
    GUILD_QUIET,
    LOCK_TIMEOUT,
    RETIRE_TIMEOUT,
    RETRY_AFTER,
    SWITCH_TIMEOUT,
    Host,
    ReshardOptions,
    ReshardRun,
    State,
    budget_wait,
    choose_target,
    round_up,
)
from .slots import WorkerSlot

__all__ = [
    "Host",
    "Reshard",
    "ReshardOptions",
    "State",
    "budget_wait",
    "choose_target",
    "round_up",
]

log = logging.getLogger("spectacles_gateway.supervisor")


class Reshard:
    def __init__(
        self, host: Host, options: ReshardOptions, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.host = host
        self.options = options
        self.clock = clock  # for answers that arrive between ticks (tests pass a fake one)
        self.state = State.IDLE
        self.run: ReshardRun | None = None
        now = clock()
        self.next_check = now + options.check_interval
        self.not_before = 0.0
        self.last: dict[str, Any] | None = None  # the last reshard's outcome, for /status
        self.recommended: int | None = None
        self._request: tuple[str, int | None] | None = None  # (reason, requested count)
        self._checking = False
        self._checked: GatewayBot | BaseException | None = None
        self._lock = threading.Lock()
        self._told: set[int] = set()

    # ------------------------------------------------------------------ views

    @property
    def active(self) -> bool:
        return self.state is not State.IDLE

    @property
    def busy(self) -> bool:
        """Running, or about to (asked for, or asking Discord for the count)."""
        return self.active or self._request is not None or self._checking

    @property
    def generation(self) -> int | None:
        """The generation being started (None: none)."""
        return self.run.generation if self.run is not None else None

    def owner_of(self, shard: int) -> WorkerSlot | None:
        return self.run.owner.get(shard) if self.run is not None else None

    def sessions(self) -> dict[int, Session | None]:
        return self.run.sessions if self.run is not None else {}

    def status(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state.value,
            "policy": self.options.policy,
            "generation": self.host.generation,
            "recommended_shards": self.recommended,
            "next_check_in": round(max(0.0, self.next_check - now), 1),
        }
        if self.options.unavailable:
            out["unavailable"] = self.options.unavailable
        run = self.run
        if run is not None:
            ready = sum(s.ready_count for s in run.slots)
            out.update(
                {
                    "from": run.source,
                    "to": run.target,
                    "new_generation": run.generation,
                    "reason": run.reason,
                    "for_seconds": round(now - run.started, 1),
                    "new_shards_ready": ready,
                    "guilds_pending": max(0, run.guilds_pending),
                }
            )
            if run.waiting:
                out["waiting"] = run.waiting
        if self.last is not None:
            out["last"] = self.last
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must run next, ahead of the supervisor's own round."""
        run = self.run
        if self.state is State.OVERLAP and run is not None:
            return run.overlap_until
        return None

    # ------------------------------------------------------------------ what starts one

    def request(self, reason: str, count: int | None = None) -> str:
        """Ask for a reshard (``reason``: ``operator`` or ``sharding_required``); the answer
        says what happens."""
        if self.options.unavailable:
            return f"no reshard here: {self.options.unavailable}"
        if self.options.policy == "off" and reason != "operator":
            return "resharding is off"
        if self.active:
            return f"a reshard is already running ({self.state.value})"
        if self._request is not None and self._request[0] == reason == "sharding_required":
            return "already asked"
        self._request = (reason, count)
        self.not_before = 0.0
        self.next_check = 0.0  # look at Discord's numbers now
        log.info(
            "reshard asked for (%s%s)", reason.replace("_", " "), f", to {count}" if count else ""
        )
        return "accepted"

    def sharding_required(self, shard: int) -> None:
        """A shard of the running generation was closed with 4011."""
        if self.active or self._request is not None:
            return  # the reshard under way (or about to be) replaces that shard
        if self.options.policy != "recommended":
            if shard not in self._told:
                self._told.add(shard)
                log.error(
                    "shard %d was closed with 4011 (sharding required): it stays closed until "
                    "`spectacles-supervise reshard` (policy %s)",
                    shard,
                    self.options.policy,
                )
            return
        log.warning("shard %d was closed with 4011 (sharding required): resharding", shard)
        self.request("sharding_required")

    # ------------------------------------------------------------------ the loop

    def tick(self, now: float) -> None:
        if self.host.stopping is not None:
            return
        self._collect_check(now)
        state = self.state
        if state is State.LOCKING:
            run = self.run
            if run is not None and now > run.deadline:
                self._give_up(now, "the fleet's reshard lock did not come", record=False)
        elif state is State.IDLE:
            due = now >= self.next_check and now >= self.not_before and not self._checking
            if due and (self.options.policy != "off" or self._request is not None):
                self._start_check(now)
        elif state is State.WAITING_BUDGET:
            if now >= self.next_check and not self._checking:
                self._start_check(now)  # the budget as Discord sees it now
            self._wait_budget(now)
        elif state is State.STARTING:
            self._starting(now)
        elif state is State.SWITCHING:
            run = self.run
            assert run is not None
            if len(run.published) == len(run.slots):
                run.overlap_until = now + self.options.overlap
                self.state = State.OVERLAP
                log.info(
                    "reshard: generation %d publishes; overlap %.1f s",
                    run.generation,
                    self.options.overlap,
                )
            elif now > run.deadline:
                self._roll_back(now, "the new workers did not confirm the switch in time")
        elif state is State.OVERLAP:
            self._overlap(now)
        elif state in (State.RETIRING, State.ROLLING_BACK):
            self._retiring(now)

    def _start_check(self, now: float) -> None:
        check = self.options.check
        if check is None:
            self._checked = None
            self.next_check = now + self.options.check_interval
            return
        self._checking = True

        def run() -> None:
            try:
                result: GatewayBot | BaseException = check()
            except BaseException as exc:
                result = exc
            with self._lock:
                self._checked = result

        threading.Thread(target=run, name="reshard-check", daemon=True).start()

    def _collect_check(self, now: float) -> None:
        with self._lock:
            result, self._checked = self._checked, None
        if result is None:
            return
        self._checking = False
        self.next_check = now + self.options.check_interval
        if isinstance(result, BaseException):
            log.warning("reshard: could not ask Discord for the shard count: %s", result)
            return
        self.recommended = result.shards
        metrics.recommended_shards.set(result.shards)
        budget = self.host.budget
        if budget is not None:
            budget.total = result.total
            budget.remaining = result.remaining
            budget.reset_at = now + result.reset_after
        if self.state is State.WAITING_BUDGET:
            self._wait_budget(now)
            return
        if self.state is not State.IDLE:
            return
        reason, requested = self._request or ("recommended", None)
        if reason == "recommended" and self.options.policy != "recommended":
            return
        self._request = None
        target = choose_target(
            reason=reason,
            running=self.host.shard_count,
            recommended=result.shards,
            requested=requested,
            mc=self.host.max_concurrency,
        )
        if target is None:
            if reason != "recommended":
                log.info(
                    "reshard (%s): already at %d shards; nothing to do",
                    reason.replace("_", " "),
                    self.host.shard_count,
                )
            return
        self._begin(now, target, reason)

    def _begin(self, now: float, target: int, reason: str) -> None:
        host = self.host
        run = self.run = ReshardRun(
            target=target,
            reason=reason,
            generation=host.generation + 1,
            started=now,
            source=host.shard_count,
        )
        metrics.reshard_state.set(1)
        log.info(
            "reshard: %d -> %d shards (%s), as generation %d beside the running one",
            host.shard_count,
            target,
            reason.replace("_", " "),
            host.generation + 1,
        )
        if self.options.fleet:
            self.state = State.LOCKING
            run.deadline = now + LOCK_TIMEOUT
            if not host.lock_reshard():
                self._give_up(now, "the fleet agent is not running", record=False)
            return
        self.state = State.WAITING_BUDGET
        self._wait_budget(now)

    def locked(self, ok: bool, holder: str) -> None:
        """Fleet: the answer to our lock request."""
        if self.state is not State.LOCKING:
            if ok:
                self.host.unlock_reshard()  # late: we gave up meanwhile
            return
        now = self.clock()
        if not ok:
            log.info("reshard: member %s runs one already; not here", holder or "?")
            self._give_up(
                now, f"member {holder or '?'} holds the fleet's reshard lock", record=False
            )
            return
        log.info("reshard: this member holds the fleet's reshard lock")
        self.state = State.WAITING_BUDGET
        self._wait_budget(now)

    def superseded(self) -> None:
        """Fleet: another member's reshard switched the fleet to a newer generation; ours (if
        any) is moot: its new workers retire."""
        if self.run is None:
            return
        now = self.clock()
        if self.state in (State.LOCKING, State.WAITING_BUDGET):
            self._give_up(now, "another member's reshard switched the fleet", record=False)
        elif self.state in (State.STARTING, State.SWITCHING, State.OVERLAP):
            self._roll_back(now, "another member's reshard switched the fleet")

    def _wait_budget(self, now: float) -> None:
        run = self.run
        assert run is not None
        budget = self.host.budget
        wait = None
        if budget is not None:
            wait = budget_wait(budget, run.target, self.options.budget_reserve, now)
        if wait is math.inf:
            assert budget is not None
            self._give_up(
                now,
                f"{run.target} session starts and a reserve of {self.options.budget_reserve} "
                f"are more than Discord's whole daily budget of {budget.total}",
            )
            return
        if wait is not None:
            assert budget is not None
            why = (
                f"waiting for Discord's session budget: {budget.remaining} starts left, "
                f"{run.target} needed plus a reserve of {self.options.budget_reserve}; it "
                f"resets in {wait:.0f} s"
            )
            if why.split(";", maxsplit=1)[0] != run.waiting.split(";")[0]:
                log.warning("reshard: %s", why)
            run.waiting = why
            return
        run.waiting = ""
        self._spawn(now)

    def _spawn(self, now: float) -> None:
        run = self.run
        assert run is not None
        host = self.host
        run.slots = host.spawn_generation(run.generation, run.target)
        run.owner = {shard: slot for slot in run.slots for shard in slot.shards}
        mc = max(1, host.max_concurrency)
        pacing = math.ceil(run.target / mc) * (IDENTIFY_WINDOW + IDENTIFY_MARGIN)
        run.deadline = now + pacing + self.options.timeout
        run.guilds_moved = now
        self.state = State.STARTING
        self._cover()

    def _cover(self) -> None:
        """The running generation's shards Discord refused for good (4011) publish nothing:
        the new generation publishes their guilds' events while it stands by."""
        run = self.run
        assert run is not None
        host = self.host
        gone = frozenset(
            shard
            for slot in host.slots
            if slot.generation == host.generation
            for shard, info in slot.status.items()
            if info.fatal is not None
        )
        if gone != run.covered:
            run.covered = gone
            for slot in run.slots:
                host.cover(slot, host.shard_count, gone)

    def _starting(self, now: float) -> None:
        run = self.run
        assert run is not None
        self._cover()
        for slot in run.slots:
            refused = [s for s, st in slot.status.items() if st.fatal is not None]
            if refused:
                code = slot.status[refused[0]].fatal
                self._roll_back(now, f"new shard {refused[0]} was refused by Discord ({code})")
                return
        new_ready = sum(s.ready_count for s in run.slots)
        pending = sum(st.guilds_pending for s in run.slots for st in s.status.values())
        if pending != run.guilds_pending:
            run.guilds_pending = pending
            run.guilds_moved = now
        unsettled = self.host.running_unsettled()
        waiting = ""
        if new_ready < run.target:
            waiting = f"{new_ready}/{run.target} new shards ready"
        elif pending and now - run.guilds_moved < GUILD_QUIET:
            waiting = f"{pending} guilds not received yet"
        elif not all(s.broker for s in run.slots):
            waiting = "the new workers' brokers are not connected yet"
        elif unsettled:
            waiting = unsettled
        run.waiting = waiting
        if waiting:
            if now > run.deadline:
                self._roll_back(now, f"not ready in time ({waiting})")
            return
        if pending:
            log.warning(
                "reshard: %d guilds never arrived in %.0f s (unavailable): switching anyway",
                pending,
                GUILD_QUIET,
            )
        log.info(
            "reshard: all %d shards of generation %d are ready with their guilds "
            "(%.1f s); switching",
            run.target,
            run.generation,
            now - run.started,
        )
        for slot in run.slots:
            self.host.publish(slot)
        run.deadline = now + SWITCH_TIMEOUT
        self.state = State.SWITCHING

    def identify_sent(self, slot: WorkerSlot) -> None:
        if self.run is not None and slot.generation == self.run.generation:
            self.run.identifies += 1

    def publishing(self, slot: WorkerSlot) -> None:
        """A new worker confirmed it publishes."""
        run = self.run
        if run is None or slot not in run.slots:
            return
        run.published.add(slot.index)
        if self.state is State.SWITCHING and len(run.published) == len(run.slots):
            self.tick(self.clock())

    def _overlap(self, now: float) -> None:
        run = self.run
        assert run is not None
        if now < run.overlap_until:
            return
        host = self.host
        old = [s for s in host.slots if s.generation == host.generation]
        # In a fleet the agent points the fleet at the new generation, once it leases it.
        successor = None if self.options.fleet else (run.generation, run.target)
        host.commit_generation(run.generation, run.target, run.slots, run.sessions)
        if self.options.fleet:
            host.switch_fleet(run.generation, run.target)
        run.old = old
        for slot in old:
            host.retire(slot, successor)
        run.retire_deadline = now + RETIRE_TIMEOUT
        self.state = State.RETIRING
        log.info(
            "reshard: generation %d (%d shards) is current; retiring generation %d",
            run.generation,
            run.target,
            run.generation - 1,
        )

    def _retiring(self, now: float) -> None:
        run = self.run
        assert run is not None
        leaving = [s for s in run.old if s.proc is not None]
        if leaving and now > run.retire_deadline:
            for slot in leaving:
                log.warning("worker %d did not retire in time: killing it", slot.index)
                self.host.kill(slot)
            run.retire_deadline = now + 5.0
            return
        if leaving:
            return
        if self.state is State.RETIRING:
            identifies = run.identifies
            self._finish(
                now,
                "done",
                f"{run.source} -> {run.target} shards in {now - run.started:.1f} s",
                identifies=identifies,
            )
        else:
            self.state = State.IDLE
            self.run = None
            metrics.reshard_state.set(0)

    def _roll_back(self, now: float, why: str) -> None:
        run = self.run
        assert run is not None
        log.error(
            "reshard to %d shards failed: %s; rolling back (the running generation carries on)",
            run.target,
            why,
        )
        self._record(now, "rolled_back", why)
        run.old = list(run.slots)
        for slot in run.slots:
            self.host.retire(slot, None)
        run.retire_deadline = now + RETIRE_TIMEOUT
        self.not_before = now + max(RETRY_AFTER, self.options.check_interval)
        self.next_check = self.not_before
        self.state = State.ROLLING_BACK
        self.host.unlock_reshard()

    def crashed(self, slot: WorkerSlot, how: str) -> None:
        """A worker of the new generation died before the switch (``how``: its exit)."""
        if self.state not in (State.STARTING, State.SWITCHING, State.OVERLAP):
            return
        refused = sorted(
            {f"shard {s}: {info.fatal}" for s, info in slot.status.items() if info.fatal}
        )
        why = f"new worker {slot.index} {how}"
        if refused:
            why += f" (Discord refused {', '.join(refused[:4])})"
        self._roll_back(self.clock(), why)

    def _give_up(self, now: float, why: str, *, record: bool = True) -> None:
        if record:
            log.error("reshard: %s; not resharding", why)
            self._record(now, "impossible", why)
        self.state = State.IDLE
        self.run = None
        metrics.reshard_state.set(0)
        # Impossible now: not for a while. Someone else's turn: look again at the next check.
        wait = max(RETRY_AFTER, self.options.check_interval) if record else 0.0
        self.not_before = now + wait
        self.host.unlock_reshard()

    def _finish(self, now: float, outcome: str, detail: str, *, identifies: int) -> None:
        self.host.unlock_reshard()
        log.info("reshard done: %s, %d identifies", detail, identifies)
        self._record(now, outcome, detail, identifies=identifies)
        self.state = State.IDLE
        self.run = None
        metrics.reshard_state.set(0)

    def _record(self, now: float, outcome: str, detail: str, **extra: Any) -> None:
        run = self.run
        metrics.reshards.labels(outcome).inc()
        self.last = {
            "outcome": outcome,
            "detail": detail,
            "at": round(time.time(), 3),
            **({"from": run.source, "to": run.target, "reason": run.reason} if run else {}),
            **extra,
        }
