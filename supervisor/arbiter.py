"""The supervisor: spawns one worker process per group of shards and keeps them running.

A single-threaded select loop, no event loop (the habits of gunicorn's arbiter): signal handlers
only record the signal; the loop acts on it. The supervisor owns what spans workers: the identify
pacer, the sessions of every shard (so a restarted worker resumes even with the memory store),
the metrics of every worker and the health endpoints (:mod:`.status`), and, for the stdio broker,
the real stdout and stdin (:mod:`.relay`). Each worker is reached over its control channel
(:mod:`.channel`). Periodic work runs on a tick, not on every wake-up, so a busy relay costs no
more per event than the reads and writes it does.
"""

from __future__ import annotations

import functools
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from spectacles_gateway import metrics
from spectacles_gateway.control import (
    FrameError,
    Grant,
    Identified,
    IdentifyRequest,
    Message,
    Publishing,
    Released,
    Start,
    Status,
)
from spectacles_gateway.exitcodes import EX_IOERR
from spectacles_gateway.plan import WorkerPlan
from spectacles_gateway.protocol.closecodes import SHARDING_REQUIRED
from spectacles_gateway.protocol.identify import (
    IdentifyPacer,
    SessionBudget,
    pacer_key,
    shard_of_key,
)
from spectacles_gateway.protocol.state import Session
from spectacles_gateway.telemetry import Aggregator

from .channel import ControlChannel
from .generations import Generations
from .httpd import HttpServer
from .lifecycle import Lifecycle, describe_exit
from .plan import describe_ids
from .relay import (
    StdinRouter,
    StdioRelay,
    lock_file,
    pollable,
    read_available,
    shares_stdout,
)
from .reshard import Reshard, ReshardOptions
from .slots import WorkerSlot
from .status import Routes

if TYPE_CHECKING:
    from .fleet import FleetOptions, FleetSide

__all__ = ["Supervisor", "SupervisorOptions", "describe_exit"]

log = logging.getLogger("spectacles_gateway.supervisor")

TICK = 1.0  # seconds between two rounds of periodic work (deadlines inside are kept exactly)


def jitter() -> float:
    """``random.random()``; the module is loaded at the first restart, not at start-up."""
    import random

    return random.random()


class SupervisorOptions(msgspec.Struct):
    groups: list[tuple[int, ...]]
    shard_count: int
    max_concurrency: int
    plan: WorkerPlan  # shared by every worker (shard ids and worker id filled in per worker)
    argv: list[str]  # the command line the workers read the settings from
    stdio: str | None  # stdio format ("json"/"msgpack") when the broker is stdio, else None
    shutdown_timeout: float = 10.0
    stall_timeout: float = 10.0
    http: tuple[str, int] | None = None
    metrics_path: str = "/metrics"
    max_clients: int = 64
    input_buffer: int = 4 << 20
    budget: SessionBudget | None = None
    fleet: FleetOptions | None = None  # fleet mode: shards come from the fleet agent
    reshard: ReshardOptions | None = None
    generation: int = 0  # the generation the store says is current (see .generation)
    notifier: Any = None  # sdnotify.Notifier or None
    rand: Callable[[], float] = jitter


class Supervisor(Lifecycle, Generations):
    def __init__(self, options: SupervisorOptions) -> None:
        self.options = options
        self.selector = selectors.DefaultSelector()
        self.generation = options.generation
        self.slots = [
            WorkerSlot(i, group, generation=self.generation, shard_count=options.shard_count)
            for i, group in enumerate(options.groups)
        ]
        self._next_index = len(self.slots)
        self.owner = {shard: slot for slot in self.slots for shard in slot.shards}
        self.shard_count = options.shard_count
        self.sessions: dict[int, Session | None] = {}
        self.pacer = IdentifyPacer(options.max_concurrency, budget=options.budget)
        self.aggregator = Aggregator(metrics.REGISTRY.families)
        self.stopping: str | None = None  # None, "graceful" or "fast"
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.http: HttpServer | None = None
        self.relay: StdioRelay | None = None
        #: stdio, direct output: the lock file the workers share (None: relayed, or no stdio).
        self.stdout_lock: int | None = None
        self.stdin: StdinRouter | None = None
        self._stdin_fd: int | None = None
        self._next_tick = 0.0
        self._gate_dirty = False
        self.started = time.monotonic()
        self.fleet: FleetSide | None = None
        if options.fleet is not None:
            from .fleet import FleetSide  # fleet mode only

            self.fleet = FleetSide(
                options.fleet,
                options.shard_count,
                options.argv,
                self.selector,
                self.slots,
                self.owner,
                self.aggregator,
                options.rand,
            )
        self.reshard: Reshard | None = None
        if options.reshard is not None:
            self.reshard = Reshard(self, options.reshard)
        if self.fleet is not None:
            self.fleet.generation = self.generation
            self.fleet.on_superseded = self.superseded
            if self.reshard is not None:
                self.fleet.on_ask = self.request_reshard
                self.fleet.on_locked = self.reshard.locked
        super().__init__()

    # ------------------------------------------------------------------ set-up

    def _setup_stdio(self) -> None:
        fmt = self.options.stdio
        if fmt is None:
            return
        out = sys.stdout.fileno()
        if shares_stdout(out, fmt):
            self.stdout_lock = lock_file()  # the workers write to our stdout themselves
        if self.stdout_lock is None:
            self.relay = StdioRelay(self.selector, fmt, out, self._output_lost)
        self.stdin = StdinRouter(
            fmt,
            self.shard_count,
            self.owner.get,
            self.slots,
            limit=self.options.input_buffer,
        )
        try:
            fd = sys.stdin.fileno()
            os.fstat(fd)
        except (OSError, ValueError, AttributeError):
            return
        if pollable(fd):
            os.set_blocking(fd, False)
            self._stdin_fd = fd
            self.selector.register(fd, selectors.EVENT_READ, self._read_stdin)
        else:  # a file of commands: take it all now; /dev/null gives nothing
            with open(fd, "rb", closefd=False) as f:
                self.stdin.feed(f.read())

    def _read_stdin(self, mask: int) -> None:
        assert self._stdin_fd is not None and self.stdin is not None
        data = read_available(self._stdin_fd)
        if data is None:
            return
        if not data:
            log.info("stdin closed; no more commands from stdin")
            self.selector.unregister(self._stdin_fd)
            self._stdin_fd = None
            return
        self.stdin.feed(data)

    def _output_lost(self, exc: OSError) -> None:
        log.error("stdout was closed (%s); events can no longer be written; stopping", exc)
        self.exit_code = EX_IOERR
        self._begin_stop("fast")

    # ------------------------------------------------------------------ workers

    def spawn(self, slot: WorkerSlot) -> None:
        parent, child = socket.socketpair()
        spec = describe_ids(slot.shards)
        argv = [
            sys.executable,
            "-P",  # never our working directory first on sys.path: a checkout there is not us
            "-m",
            "spectacles_gateway.workerproc",
            "--worker",
            str(slot.index),
            "--shards",
            spec,
            "--fd",
            str(child.fileno()),
        ]
        stdio = self.options.stdio is not None
        lock = self.stdout_lock
        # Direct output: our own stdout (None); relayed: a pipe to us.
        stdout = None if lock is not None else subprocess.PIPE if stdio else subprocess.DEVNULL
        blocked = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                argv,
                pass_fds=(child.fileno(),) if lock is None else (child.fileno(), lock),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                close_fds=True,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            child.close()
        slot.proc = proc
        slot.reset_for_spawn(time.monotonic())
        slot.channel = ControlChannel(
            parent,
            self.selector,
            functools.partial(self._on_message, slot),
            _nothing,  # the reaper notices the death
        )
        fleet = self.fleet is not None
        # A fleet's workers get their shards as the fleet leases them; a reshard's new
        # generation starts with all of its own (the fleet leases them at the switch).
        fixed = not fleet or slot.standby
        sessions = self._sessions_for(slot)
        plan = self.options.plan.for_worker(slot.index, slot.shards if fixed else ())
        if slot.generation or slot.standby or plan.shard_count != slot.shard_count:
            plan = msgspec.structs.replace(
                plan,
                shard_count=slot.shard_count or plan.shard_count,
                generation=slot.generation,
                standby=slot.standby,
            )
        slot.channel.send(
            Start(
                plan=plan,
                argv=self.options.argv,
                sessions={s: sessions.get(s) for s in slot.shards} if fixed else {},
                confirm_on_relay=stdio and lock is None,
                stdout_lock=lock,
                fleet=fleet,
            )
        )
        if self.fleet is not None:
            self.fleet.worker_started(slot)
        if self.relay is not None and proc.stdout is not None:
            self.relay.attach(slot, proc.stdout)
        if self.stdin is not None:
            self.stdin.pump(slot)
        log.info(
            "worker %d started (pid %d) for shards %s%s",
            slot.index,
            proc.pid,
            spec,
            f" of {slot.shard_count} (generation {slot.generation}"
            f"{', standby' if slot.standby else ''})"
            if slot.generation != self.generation or slot.generation
            else "",
        )
        metrics.workers.inc()

    def _on_message(self, slot: WorkerSlot, message: Message | FrameError) -> None:
        slot.last_seen = time.monotonic()
        if isinstance(message, Status):
            became_ready = slot.apply_status(message.shards)
            if self.fleet is not None:
                for shard in became_ready:
                    self.fleet.shard_ready(shard, slot.last_seen)
            slot.broker = message.broker
            sessions = self._sessions_for(slot)
            for shard, session in message.sessions.items():
                if shard in slot.shard_set:
                    sessions[shard] = session
            if message.metrics:
                self.aggregator.update(slot.index, message.metrics)
            if self.reshard is not None and slot.generation == self.generation:
                for shard, info in message.shards.items():
                    if info.fatal == SHARDING_REQUIRED:
                        self.reshard.sharding_required(shard)
        elif isinstance(message, IdentifyRequest):
            if message.shard in slot.shard_set and self.stopping is None and not slot.retiring:
                self.pacer.request(pacer_key(message.shard, slot.generation))
                self._gate_dirty = True
        elif isinstance(message, Identified):
            self.pacer.release(pacer_key(message.shard, slot.generation), message.sent)
            if message.sent is not None and self.reshard is not None:
                self.reshard.identify_sent(slot)
            self._gate_dirty = True
            if message.sent is not None and self.options.budget is not None:
                metrics.session_starts_remaining.set(self.options.budget.remaining)
        elif isinstance(message, Released) and self.fleet is not None:
            self.fleet.released(slot, message)
        elif isinstance(message, Publishing):
            slot.standby = False
            if self.reshard is not None:
                self.reshard.publishing(slot)
        elif isinstance(message, FrameError):
            log.error("worker %d sent a bad control frame: %s", slot.index, message)
            metrics.input_dropped.labels("control", "bad_frame").inc()
        else:
            log.error("worker %d sent an unexpected %s", slot.index, type(message).__name__)
            metrics.input_dropped.labels("control", "unexpected").inc()

    def _grant(self, now: float) -> None:
        self._gate_dirty = False
        if self.stopping is not None:
            return
        for key in self.pacer.grants(now):
            shard, generation = shard_of_key(key)
            slot = self._owner_of(generation, shard)
            if slot is None or slot.channel is None or slot.channel.closed:
                self.pacer.cancel(key)
                continue
            slot.channel.send(Grant(shard))

    def _reap(self) -> None:
        if self.fleet is not None and self.fleet.reap(time.monotonic()):
            self._drained()
        for slot in list(self.slots):  # a retired worker leaves the list as it is reaped
            proc = slot.proc
            if proc is None:
                continue
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = proc.pid, 0
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            self._worker_died(slot, status)

    def _release_worker(self, slot: WorkerSlot) -> None:
        """What a dead worker leaves behind: its last messages, its output, its metrics."""
        if slot.channel is not None:
            slot.channel.drain()
            slot.channel = None
        if self.relay is not None:
            self.relay.detach(slot)
        slot.proc = None
        for shard in slot.shards:
            self.pacer.cancel(pacer_key(shard, slot.generation))
        self._gate_dirty = True
        self.aggregator.retire(slot.index)
        metrics.workers.dec()

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        self._install_signals()
        metrics.total_shards.set(sum(len(s.shards) for s in self.slots))
        if self.options.budget is not None:
            metrics.session_starts_remaining.set(self.options.budget.remaining)
        self._setup_stdio()
        if self.options.http is not None:
            host, port = self.options.http
            routes = Routes(self, self.aggregator, self.options.metrics_path)
            self.http = HttpServer(
                self.selector,
                host,
                port,
                routes,
                max_clients=self.options.max_clients,
                post=routes.post,
            )
            log.info("metrics and health on http://%s:%d", host, self.http.port)
        for slot in self.slots:
            self.spawn(slot)
        if self.fleet is not None:
            self.fleet.spawn()
        try:
            while True:
                now = time.monotonic()
                self._handle_signals()
                if self._stopped():
                    break
                if now >= self._next_tick or self._due(now):
                    self._reap()
                    self._tick(now)
                    if self.reshard is not None:
                        self.reshard.tick(now)
                    self._next_tick = now + TICK
                next_grant = self.pacer.next_time(now) if self.pacer.waiting else None
                if self._gate_dirty or (next_grant is not None and now >= next_grant):
                    self._grant(now)
                    next_grant = self.pacer.next_time(now) if self.pacer.waiting else None
                if self.relay is not None:
                    self.relay.wake(now)
                    for slot, relayed in self.relay.acks(now):
                        if slot.channel is not None:
                            slot.channel.send(relayed)
                timeout = self._timeout(now, next_grant)
                for key, mask in self.selector.select(timeout):
                    key.data(mask)
        finally:
            self._shutdown_io()
        return self.exit_code

    def _stopped(self) -> bool:
        """Stopping, and every child (workers, the fleet agent) has exited."""
        if self.stopping is None or any(s.proc is not None for s in self.slots):
            return False
        return self.fleet is None or self.fleet.proc is None

    def _due(self, now: float) -> bool:
        """A deadline of the periodic round has come before the round (a restart, a client)."""
        if any(s.restart_at is not None and now >= s.restart_at for s in self.slots):
            return True
        reshard = self.reshard.next_deadline() if self.reshard is not None else None
        if reshard is not None and now >= reshard:
            return True
        deadline = self.http.next_deadline() if self.http is not None else None
        return deadline is not None and now >= deadline

    def _timeout(self, now: float, next_grant: float | None) -> float:
        if self._signals:
            return 0.0
        at = self._next_tick
        if next_grant is not None:
            at = min(at, next_grant)
        for slot in self.slots:
            if slot.restart_at is not None:
                at = min(at, slot.restart_at)
        if self.http is not None and (deadline := self.http.next_deadline()) is not None:
            at = min(at, deadline)
        if self.reshard is not None and (deadline := self.reshard.next_deadline()) is not None:
            at = min(at, deadline)
        if self.relay is not None:
            if (ack := self.relay.next_ack()) is not None:
                at = min(at, ack)
            if (wake := self.relay.next_wake()) is not None:
                at = min(at, wake)
        return max(0.0, at - now)

    def _shutdown_io(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        if self.relay is not None:
            self.relay.close()
        if self.stdout_lock is not None:
            os.close(self.stdout_lock)
            self.stdout_lock = None
        if self.http is not None:
            self.http.close()
        self._close_signals()


def _nothing() -> None:
    return None
