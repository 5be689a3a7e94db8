"""Signals and the workers' lives: death and restart with backoff, stalls, stopping, rolling
restarts, and the periodic round that also reports readiness, progress and the systemd watchdog.

A mixin of :class:`~.arbiter.Supervisor`: the state it reads is declared here, the I/O it needs
(spawning, releasing a dead worker's resources) is the arbiter's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from spectacles_gateway import metrics
from spectacles_gateway.exitcodes import EX_CONFIG, EX_IOERR
from spectacles_gateway.protocol.backoff import backoff_delay

from .plan import describe_ids
from .status import human, progress, shards_ready

if TYPE_CHECKING:
    from spectacles_gateway.protocol.identify import IdentifyPacer

    from .fleet import FleetSide
    from .httpd import HttpServer
    from .relay import StdinRouter
    from .reshard import Reshard
    from .slots import WorkerSlot

__all__ = ["Lifecycle", "describe_exit"]

log = logging.getLogger("spectacles_gateway.supervisor")

STABLE_AFTER = 30.0  # a worker alive this long has its restart backoff reset
PROGRESS_EVERY = 5.0  # seconds between two start-up progress lines
ROLLING_PATIENCE = 120.0  # longest wait for a restarted worker's shards during a rolling restart
EXTEND_EVERY = 5.0  # start-up: how often systemd's start timeout is pushed back ...
EXTEND_BY = 20.0  # ... and by how much


def describe_exit(status: int, *, killed_by_us: bool) -> tuple[str, str]:
    """(reason label, human text) for a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
        if sig == signal.SIGKILL and not killed_by_us:
            return "sigkill", "killed by SIGKILL (likely the kernel's OOM killer, or kill -9)"
        return name.lower(), f"killed by {name}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if code == EX_CONFIG:
        return "fatal", "exited with 78: Discord refused the session for good (see its log)"
    if code == 0:
        return "exit", "exited cleanly"
    return f"exit_{code}", f"exited with status {code}"


class Lifecycle:
    # What the arbiter provides.
    options: Any
    selector: selectors.BaseSelector
    slots: list[WorkerSlot]
    pacer: IdentifyPacer
    stopping: str | None
    stop_deadline: float
    exit_code: int
    started: float
    http: HttpServer | None
    stdin: StdinRouter | None
    stdout_lock: int | None
    fleet: FleetSide | None
    reshard: Reshard | None
    generation: int

    if TYPE_CHECKING:  # the other parts of the Supervisor (only declared: never shadowed)

        def current_slots(self) -> list[WorkerSlot]: ...
        def spawn(self, slot: WorkerSlot) -> None: ...
        def _release_worker(self, slot: WorkerSlot) -> None: ...
        def _reap(self) -> None: ...

    def __init__(self) -> None:
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe()
        self._rolling: deque[WorkerSlot] = deque()
        self._rolling_current: WorkerSlot | None = None
        self._rolling_since = 0.0
        self._reloading = False
        self._ready_notified = False
        self._last_ready_count = -1
        self._next_progress = 0.0
        self._next_watchdog = 0.0
        self._next_extend = 0.0
        self._last_round = time.monotonic()
        self.ready_since: float | None = None
        self._agent_stopped = False

    # ------------------------------------------------------------------ signals
    # Handlers only record the signal (and wake the select loop through the wake-up pipe);
    # the loop acts on it in _handle_signals.

    def _install_signals(self) -> None:
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._record_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)

    def _record_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _drain_wakeup(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._wake_r, 4096):
                pass

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.popleft()
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig == signal.SIGTERM:
                self._begin_stop("fast" if self.stopping else "graceful")
            elif sig == signal.SIGINT:
                self._begin_stop("fast")
            elif sig == signal.SIGHUP:
                self._begin_rolling_restart()

    def _close_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ deaths

    def _worker_died(self, slot: WorkerSlot, status: int) -> None:
        now = time.monotonic()
        pid = slot.pid
        reason, text = describe_exit(status, killed_by_us=slot.killed_by_us)
        if slot.stall_killed:
            reason, text = "stalled", "killed after its event loop stalled (no heartbeat)"
        self._release_worker(slot)
        spec = describe_ids(slot.shards)
        if slot.retiring:  # a reshard retired it: it leaves for good
            log.info(
                "worker %d (pid %s, generation %d) retired: %s",
                slot.index,
                pid,
                slot.generation,
                text,
            )
            self.slots.remove(slot)
            return
        if self.stopping is not None:
            log.info("worker %d (pid %s, shards %s) %s", slot.index, pid, spec, text)
            return
        if slot.generation != self.generation and self.reshard is not None:
            # The new generation of a reshard: the old one runs on, the reshard rolls back.
            log.error("worker %d (pid %s) of the new generation %s", slot.index, pid, text)
            slot.retiring = True
            self.slots.remove(slot)
            self.reshard.crashed(slot, text)
            return
        if reason == "fatal":
            slot.fatal = True
            log.warning(
                "worker %d (pid %s, shards %s) %s; not restarting it", slot.index, pid, spec, text
            )
            current = self.current_slots()
            if all(s.fatal for s in current) and not (self.reshard and self.reshard.busy):
                log.warning("no worker is left to run: stopping with exit code 78")
                self.exit_code = EX_CONFIG
                self._begin_stop("graceful")
            return
        if reason == f"exit_{EX_IOERR}" and self.stdout_lock is not None:
            # Direct output: the worker's write to our stdout failed (it said why).
            log.error("worker %d (pid %s) can no longer write to stdout; stopping", slot.index, pid)
            self.exit_code = EX_IOERR
            self._begin_stop("fast")
            return
        if slot.rolling:
            slot.rolling = False
            log.info("worker %d (shards %s) stopped for the rolling restart", slot.index, spec)
            self.spawn(slot)
            return
        if now - slot.started > STABLE_AFTER:
            slot.failures = 0
        slot.failures += 1
        delay = backoff_delay(slot.failures, self.options.rand(), base=0.5, cap=30.0)
        slot.restart_at = now + delay
        log.error(
            "worker %d (pid %s, shards %s) %s; restarting in %.1f s",
            slot.index,
            pid,
            spec,
            text,
            delay,
        )
        metrics.worker_restarts.labels(str(slot.index), reason).inc()

    def _kill(self, slot: WorkerSlot, sig: int) -> None:
        if slot.proc is None:
            return
        slot.killed_by_us = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.proc.pid, sig)

    # ------------------------------------------------------------------ stopping

    def _begin_stop(self, how: str) -> None:
        if self.stopping in ("fast", how):
            return
        self.stopping = how
        timeout = self.options.shutdown_timeout if how == "graceful" else 2.0
        self.stop_deadline = time.monotonic() + timeout + 1.0
        log.info("stopping (%s): no new identifies; workers close their shards resumably", how)
        if self.options.notifier is not None:
            self.options.notifier.stopping()
        for slot in self.slots:
            slot.restart_at = None
        if how == "graceful" and self.fleet is not None and self.fleet.proc is not None:
            # Hand every shard to the other members first; the workers stop once that is done.
            log.info("fleet: handing every shard off before stopping")
            self.fleet.drain()
            return
        if self.fleet is not None:
            self.fleet.stop()
        self._signal_workers(signal.SIGTERM if how == "graceful" else signal.SIGINT)

    def _drained(self) -> None:
        """Fleet: every shard was handed off (or the time is up): the workers may stop."""
        if self.stopping is not None:
            log.info("fleet: shards handed off; stopping the workers")
            self._signal_workers(signal.SIGTERM)

    def _signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, sig)

    # ------------------------------------------------------------------ rolling restart

    def _begin_rolling_restart(self) -> None:
        if self.stopping is not None:
            return
        if self._rolling or self._rolling_current is not None:
            log.info("a rolling restart is already running")
            return
        if self.reshard is not None and self.reshard.active:
            log.warning("no rolling restart during a reshard: send SIGHUP again once it is done")
            return
        self._rolling = deque(s for s in self.current_slots() if not s.fatal)
        log.info("rolling restart of %d workers, one at a time", len(self._rolling))
        self._reloading = True
        if self.options.notifier is not None:
            self.options.notifier.reloading("rolling restart")

    def _step_rolling(self, now: float) -> None:
        current = self._rolling_current
        if current is not None:
            if current.rolling or current.proc is None or not current.all_ready():
                if now - self._rolling_since < ROLLING_PATIENCE:
                    return
                log.warning("worker %d not ready 120 s into its restart; going on", current.index)
            self._rolling_current = None
        if not self._rolling:
            if self._reloading:
                self._reloading = False
                log.info("rolling restart done")
                if self.options.notifier is not None:
                    self.options.notifier.ready("rolling restart done")
            return
        slot = self._rolling.popleft()
        if slot.proc is None:
            return
        self._rolling_current = slot
        self._rolling_since = now
        slot.rolling = True
        log.info(
            "rolling restart: stopping worker %d (shards %s)", slot.index, describe_ids(slot.shards)
        )
        self._kill(slot, signal.SIGTERM)

    # ------------------------------------------------------------------ the periodic round

    def _tick(self, now: float) -> None:
        if self.fleet is not None:
            self.fleet.tick(now)
        if self.stopping is not None:
            if self.fleet is not None and self.fleet.draining and self.fleet.proc is not None:
                if now > self.stop_deadline - 1.0:  # handing off took too long: stop anyway
                    if not self._agent_stopped:
                        log.warning("fleet: handing off took too long; stopping the workers")
                        self._agent_stopped = True
                        self.fleet.stop()
                        self._signal_workers(signal.SIGTERM)
                    else:
                        log.warning("fleet: the agent did not stop: killing it")
                        self.fleet.stop(signal.SIGKILL)
                    self.stop_deadline = now + 3.0
                return
            if now > self.stop_deadline:
                for slot in self.slots:
                    if slot.proc is not None:
                        log.warning("worker %d did not stop in time: killing it", slot.index)
                        self._kill(slot, signal.SIGKILL)
                self.stop_deadline = now + 5.0
            return
        stall = self.options.stall_timeout
        if now - self._last_round > stall / 2:
            # We were not running (SIGSTOP, a VM paused): neither were our workers; their
            # silence meanwhile is not a stall.
            log.warning("the supervisor was paused for %.0f s", now - self._last_round)
            for slot in self.slots:
                slot.last_seen = now
        self._last_round = now
        for slot in self.slots:
            if slot.proc is None:
                if slot.restart_at is not None and now >= slot.restart_at:
                    self.spawn(slot)
            elif not slot.stall_killed and (
                now - slot.last_seen > stall or (slot.channel is not None and slot.channel.stalled)
            ):
                log.error(
                    "worker %d (pid %d) sent no report for %.0f s (or stopped reading its control "
                    "channel): its event loop is stuck; killing it",
                    slot.index,
                    slot.proc.pid,
                    now - slot.last_seen,
                )
                slot.stall_killed = True
                self._kill(slot, signal.SIGKILL)
            elif slot.pending_input and self.stdin is not None:
                self.stdin.pump(slot)
        self._step_rolling(now)
        if self.http is not None:
            self.http.expire(now)
        self._report(now)

    def _report(self, now: float) -> None:
        notifier = self.options.notifier
        total = sum(len(s.shards) for s in self.current_slots() if not s.fatal)
        ready = shards_ready(self)  # type: ignore[arg-type]
        if ready == total and total and not self._ready_notified:
            self._ready_notified = True
            self.ready_since = now
            log.info("all %d shards are ready (%.1f s after start)", total, now - self.started)
            if notifier is not None:
                notifier.ready(f"{total} shards ready")
        if ready != self._last_ready_count:
            self._last_ready_count = ready
            if notifier is not None:
                notifier.status(f"{ready}/{total} shards ready")
        starting = ready < total and not self._ready_notified
        if starting and notifier is not None and now >= self._next_extend:
            # Large bots (or a session budget wait) start for longer than TimeoutStartSec.
            notifier.extend_timeout(EXTEND_BY)
            self._next_extend = now + EXTEND_EVERY
        if ready < total and now >= self._next_progress and now - self.started > 1.0:
            self._next_progress = now + PROGRESS_EVERY
            p = progress(self, now)  # type: ignore[arg-type]
            if p["waiting_to_identify"] or p["identified"] < total:
                log.info(
                    "identified %d/%d shards, %d ready; next bucket in %.1f s, about %s left",
                    p["identified"],
                    total,
                    ready,
                    p["next_bucket_in"],
                    human(p["estimated_seconds_left"]),
                )
        metrics.identify_progress.set(ready / total if total else 1.0)
        if notifier is not None and now >= self._next_watchdog:
            interval = notifier.watchdog_interval()
            if interval:
                notifier.watchdog()
                self._next_watchdog = now + interval
