"""Fleet mode in the supervisor: the fleet agent's orders carried out on the workers.

The agent (a child process, :mod:`spectacles_gateway.fleet`) decides what this member owns; the
supervisor places each owned shard on its least loaded worker (:class:`Assign` with the lease
epoch and deadline), forwards renewed deadlines (:class:`Leases`), stops a shard at once when
its lease is lost (:class:`Release` without saving: the store would refuse it), and hands a
shard off on request (:class:`Release` with a final save, then :class:`Released` back to the
agent, which lets the lease go). A worker that restarts gets its shards again.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spectacles_gateway import metrics
from spectacles_gateway.control import (
    Assign,
    Drain,
    FleetStart,
    FleetView,
    FrameError,
    HandOff,
    Leases,
    Locked,
    LockReshard,
    Lose,
    Message,
    Own,
    Release,
    Released,
    ReshardAsk,
    Status,
    Superseded,
    Switch,
    UnlockReshard,
)
from spectacles_gateway.protocol.backoff import backoff_delay

from .channel import ControlChannel

if TYPE_CHECKING:
    import selectors

    from spectacles_gateway.telemetry import Aggregator

    from .slots import WorkerSlot

__all__ = ["FleetOptions", "FleetSide"]

log = logging.getLogger("spectacles_gateway.supervisor")

AGENT_SOURCE = "fleet-agent"  # the aggregator's name for the agent's metrics


@dataclass(frozen=True)
class FleetOptions:
    name: str
    member: str
    lease: float
    allowed: tuple[int, ...] | None  # --shards in fleet mode: the shards we may own
    session_total: int
    session_remaining: int
    session_reset_after: float


@dataclass
class _Lease:
    epoch: int
    until: float
    slot: WorkerSlot


@dataclass
class FleetSide:
    options: FleetOptions
    shard_count: int
    argv: list[str]
    selector: selectors.BaseSelector
    slots: list[WorkerSlot]
    owner: dict[int, WorkerSlot]  # the supervisor's shard -> slot map, kept up to date here
    aggregator: Aggregator
    rand: Any
    leases: dict[int, _Lease] = field(default_factory=dict)
    handing_off: set[int] = field(default_factory=set)
    view: FleetView | None = None
    proc: subprocess.Popen[bytes] | None = None
    channel: ControlChannel | None = None
    restart_at: float | None = None
    failures: int = 0
    started: float = 0.0
    draining: bool = False
    failover_from: dict[int, float] = field(default_factory=dict)
    generation: int = 0
    #: Reshard callbacks (set by the supervisor): the fleet moved to (generation, shard count);
    #: an operator's request (to); the answer to our lock request (ok, holder).
    on_superseded: Any = None
    on_ask: Any = None
    on_locked: Any = None

    # ------------------------------------------------------------------ the agent process

    def spawn(self) -> None:
        parent, child = socket.socketpair()
        argv = [sys.executable, "-P", "-m", "spectacles_gateway.fleet", "--fd", str(child.fileno())]
        argv += ["--member", self.options.member]
        blocked = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                argv, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, close_fds=True
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            child.close()
        self.started = time.monotonic()
        self.restart_at = None
        self.channel = ControlChannel(parent, self.selector, self._on_message, _nothing)
        o = self.options
        self.channel.send(
            FleetStart(
                member=o.member,
                argv=self.argv,
                shard_count=self.shard_count,
                allowed=list(o.allowed) if o.allowed is not None else None,
                session_total=o.session_total,
                session_remaining=o.session_remaining,
                session_reset_after=o.session_reset_after,
                generation=self.generation,
            )
        )
        if self.draining:
            self.channel.send(Drain())
        log.info("fleet %s: member %s, agent pid %d", o.name, o.member, self.proc.pid)

    def reap(self, now: float) -> bool:
        """Notice the agent's death; True once it exited while draining (the stop may go on)."""
        if self.proc is None or self.proc.poll() is None:
            return False
        code = self.proc.returncode
        if self.channel is not None:
            self.channel.drain()
            self.channel = None
        self.proc = None
        self.aggregator.retire(AGENT_SOURCE)
        if self.draining:
            return True
        if now - self.started > 30.0:
            self.failures = 0
        self.failures += 1
        delay = backoff_delay(self.failures, self.rand(), base=0.5, cap=10.0)
        self.restart_at = now + delay
        log.error("fleet agent exited with %s; restarting it in %.1f s", code, delay)
        return False

    def tick(self, now: float) -> None:
        if self.proc is None and self.restart_at is not None and now >= self.restart_at:
            self.spawn()

    def drain(self) -> None:
        """Stopping: every shard is handed off before the workers stop."""
        self.draining = True
        if self.channel is not None:
            self.channel.send(Drain())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    # ------------------------------------------------------------------ reshard

    def lock_reshard(self) -> bool:
        """Ask for the fleet's reshard lock (the answer comes to ``on_locked``)."""
        if self.channel is None:
            return False
        self.channel.send(LockReshard())
        return True

    def unlock_reshard(self) -> None:
        self._tell_agent(UnlockReshard())

    def adopt_generation(self, generation: int, shard_count: int) -> None:
        """From now on the member runs ``generation``: the old leases are gone with it."""
        self.generation = generation
        self.shard_count = shard_count
        self.leases.clear()
        self.handing_off.clear()
        self.failover_from.clear()
        self.view = None

    def switch(self, generation: int, shard_count: int) -> None:
        """Our reshard's switch: the agent leases every new shard and points the fleet at it."""
        self._tell_agent(Switch(generation, shard_count))

    # ------------------------------------------------------------------ its orders

    def _on_message(self, message: Message | FrameError) -> None:
        if isinstance(message, Own | Lose | HandOff) and message.generation != self.generation:
            return  # about a generation we left (it crossed a switch): its leases went with it
        if isinstance(message, Own):
            self._own(message)
        elif isinstance(message, Leases):
            self._renewed(message.until)
        elif isinstance(message, Lose):
            self._lose(message.shard)
        elif isinstance(message, HandOff):
            self._hand_off(message.shard)
        elif isinstance(message, Superseded):
            if self.on_superseded is not None:
                self.on_superseded(message.generation, message.shard_count)
        elif isinstance(message, ReshardAsk):
            if self.on_ask is not None:
                self.on_ask(message.to)
        elif isinstance(message, Locked):
            if self.on_locked is not None:
                self.on_locked(message.ok, message.holder)
        elif isinstance(message, FleetView):
            self.view = message
            metrics.leases_held.set(len(self.leases))
        elif isinstance(message, Status):
            if message.metrics:
                self.aggregator.update(AGENT_SOURCE, message.metrics)
        else:
            log.error("fleet agent sent an unexpected %s", type(message).__name__)
            metrics.input_dropped.labels("control", "unexpected").inc()

    def _place(self) -> WorkerSlot:
        """The worker with the fewest shards (among those that are not refused for good, of
        the running generation)."""
        ours = [s for s in self.slots if s.generation == self.generation and not s.retiring]
        usable = [s for s in ours if not s.fatal] or ours or self.slots
        return min(usable, key=lambda s: (len(s.shards), s.index))

    def _own(self, own: Own) -> None:
        lease = self.leases.get(own.shard)
        if lease is not None:  # the agent restarted and kept it, or a renewal raced
            lease.epoch, lease.until = own.epoch, own.until
            self._send(lease.slot, Leases({own.shard: own.until}))
            return
        running = self.owner.get(own.shard)
        if running is not None and running.generation == self.generation:
            # Our reshard's switch: the shard runs already; it is leased from now on.
            self.leases[own.shard] = _Lease(own.epoch, own.until, running)
            self._send(running, Assign(own.shard, own.epoch, own.until))
            return
        slot = self._place()
        self.leases[own.shard] = _Lease(own.epoch, own.until, slot)
        slot.add_shard(own.shard)
        self.owner[own.shard] = slot
        if own.how == "failover" and own.expired_at is not None:
            self.failover_from[own.shard] = own.expired_at
        self._send(slot, Assign(own.shard, own.epoch, own.until))

    def _renewed(self, until: dict[int, float]) -> None:
        per_slot: dict[int, dict[int, float]] = {}
        for shard, deadline in until.items():
            lease = self.leases.get(shard)
            if lease is not None:
                lease.until = deadline
                per_slot.setdefault(lease.slot.index, {})[shard] = deadline
        for slot in self.slots:
            if slot.index in per_slot:
                self._send(slot, Leases(per_slot[slot.index]))

    def _lose(self, shard: int) -> None:
        lease = self.leases.pop(shard, None)
        self.handing_off.discard(shard)
        if lease is None:
            return
        self._send(lease.slot, Release(shard, save=False))
        self._forget(shard, lease.slot)

    def _hand_off(self, shard: int) -> None:
        lease = self.leases.get(shard)
        if lease is None:
            self._tell_agent(Released(shard, None, "unknown", self.generation))
            return
        self.handing_off.add(shard)
        if lease.slot.channel is None:  # its worker is down: nothing runs, nothing to save
            self.released(lease.slot, Released(shard, None, "release", self.generation))
        else:
            self._send(lease.slot, Release(shard, save=True))

    def released(self, slot: WorkerSlot, message: Released) -> None:
        """A worker let a shard go: after a handoff, the agent lets its lease go."""
        if message.generation != self.generation:
            return  # a shard of a generation we left: its lease went with it
        lease = self.leases.pop(message.shard, None)
        self.handing_off.discard(message.shard)
        if lease is not None:
            self._forget(message.shard, lease.slot)
        self._tell_agent(
            Released(message.shard, message.session, message.reason, message.generation)
        )

    def _forget(self, shard: int, slot: WorkerSlot) -> None:
        slot.remove_shard(shard)
        if self.owner.get(shard) is slot:
            del self.owner[shard]
        self.failover_from.pop(shard, None)

    # ------------------------------------------------------------------ workers and views

    def worker_started(self, slot: WorkerSlot) -> None:
        """A (re)started worker gets its shards again, under their current leases."""
        for shard, lease in self.leases.items():
            if lease.slot is slot:
                self._send(slot, Assign(shard, lease.epoch, lease.until))

    def shard_ready(self, shard: int, now: float) -> None:
        """The time from the previous owner's lease expiry to this shard's READY/RESUMED."""
        expired_at = self.failover_from.pop(shard, None)
        if expired_at is not None:
            metrics.failover_seconds.observe(max(0.0, now - expired_at))

    def fully_owned(self) -> bool:
        view = self.view
        return view is not None and len(view.owners) >= self.shard_count

    def status(self) -> dict[str, Any]:
        view = self.view
        return {
            "name": self.options.name,
            "member": self.options.member,
            "agent_pid": self.proc.pid if self.proc is not None else None,
            "draining": self.draining,
            "members": []
            if view is None
            else [
                {
                    "member": m.member,
                    "capacity": m.capacity,
                    "shards": m.shards,
                    "last_renewal_ago": m.seen_ago,
                }
                for m in view.members
            ],
            "targets": {} if view is None else view.targets,
            "owners": {}
            if view is None
            else {str(s): {"member": m, "epoch": e} for s, (m, e) in sorted(view.owners.items())},
        }

    def _send(self, slot: WorkerSlot, message: Message) -> None:
        if slot.channel is not None:
            slot.channel.send(message)

    def _tell_agent(self, message: Message) -> None:
        if self.channel is not None:
            self.channel.send(message)


def _nothing() -> None:
    return None
