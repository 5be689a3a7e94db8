"""A worker: one event loop running a group of shards, one broker connection, one store.

The worker wires the pieces, and data of one event flows one way through it: shard runners hand
dispatches up here and we hand them down to the broker; at the end of each socket read the broker
returns what happened (:class:`~.brokers.base.Progress`: events confirmed, pause or resume
reading, commands received) and we apply it: confirmations go down to each runner, commands are
parsed, routed to a shard by Discord's rule and acknowledged once written to the websocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import msgspec

from . import metrics
from .brokers.base import Ack, Broker, Inbound, Progress
from .brokers.wire import CommandError, parse_command, parse_packet, unwrap_msgpack_string
from .control import ShardStatus
from .exitcodes import EX_CONFIG, EX_IOERR, EX_OK
from .gate import LocalIdentifyGate
from .observation import Observation
from .plan import WorkerPlan
from .protocol.closecodes import FATAL_CODES, SHARDING_REQUIRED
from .protocol.events import (
    CommandsDropped,
    CommandsSent,
    Dispatch,
    Event,
    Gap,
    Notice,
    NoticeKind,
)
from .protocol.shard import MAX_PAYLOAD_BYTES, CommandRejected, Session
from .runner import ShardRunner
from .shardset import ShardSet
from .store import MemoryStore, ShardStore
from .transport import IdentifyGateLike

__all__ = ["Worker", "WorkerPlan"]

log = logging.getLogger(__name__)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
#: The control event that tells consumers about events Discord will never send again.
GAP_EVENT = "GATEWAY_GAP"
#: Seconds a retiring shard that is reconnecting gets to resume (and publish the replay).
RETIRE_WAIT = 10.0
#: Events published in one turn of the event loop that make the worker flush its broker at
#: once, at the end of a read, instead of at the end of the turn (one turn of uvloop can read
#: megabytes from one socket: its output need not wait in memory).
FLUSH_EVENTS = 256
#: The broker is flushed at most this often (seconds) while events come one read at a time:
#: a write (a syscall, a wake-up of the reader) per few milliseconds instead of per event.
FLUSH_INTERVAL = 0.005
#: After a flush, a worker that is not busy rests: its loop sleeps this many seconds, and
#: everything its connections received meanwhile is read in the next turn. Events that arrive
#: a few at a time (many shards at a few events per second each, or one shard at a few
#: thousand) then cost one wake-up per REST for all of them, not one or more per event: at
#: 512 shards x 2 events/s about 40 % less CPU per event, at one shard x 8,000 events/s about
#: a third less (benchmarks/bench_peers.py), for at most REST more latency. Busy means that
#: the loop's thread used more than BUSY_SHARE of the time since the previous flush: a busy
#: worker never rests (its reads are big already), nor does a flush that carried no event.
REST = 0.01
BUSY_SHARE = 0.5


class Worker(Observation):
    def __init__(
        self,
        plan: WorkerPlan,
        broker: Broker,
        *,
        store: ShardStore | None = None,
        gate: IdentifyGateLike | None = None,
        keep_sessions: bool | None = None,
        dynamic: bool = False,
        sharding_required_is_fatal: bool = True,
    ) -> None:
        self.plan = plan
        self.broker = broker
        self.store: ShardStore = store or MemoryStore()
        self.gate = gate or LocalIdentifyGate(plan.max_concurrency)
        # Close with a resumable code on shutdown only if someone can resume the session later.
        self.keep_sessions = self.store.persistent if keep_sessions is None else keep_sessions
        #: Fleet mode: shards come and go, and a worker without shards keeps running.
        self.dynamic = dynamic
        self.shards = ShardSet(plan, self, self.gate, self.store, on_done=self._runner_done)
        self.runners = self.shards.runners
        self._stop_requested: asyncio.Event | None = None
        self._fast = False
        self._stop_early = False
        self._publish = broker.publish
        self._published: dict[str, int] = {}
        self._latency_probe: dict[int, tuple[str, int, float]] = {}
        self._latencies: list[float] = []
        self._clock = time.monotonic
        self._wake_scheduled = False
        self._unflushed = 0  # events published since the broker was last flushed
        self._flushed_at = -math.inf  # ... when (the loop's clock)
        #: Seconds the loop sleeps after a flush when not busy (:data:`REST`; 0: never).
        self.rest = REST
        self._sleep = time.sleep
        self._cpu_clock = time.thread_time  # the loop's thread: what "busy" is measured by
        self._cpu_at = 0.0  # ... at the last flush
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: list[asyncio.Task[None]] = []
        self._saved = self.shards.saved
        self._releasing: set[int] = set()
        # Shards that may have changed since the last observation, and since the last save:
        # the periodic work looks at these only, so idle shards cost nothing.
        self._changed: set[int] = set()
        self._unsaved: set[int] = set()
        self._uncounted: set[int] = set()
        self._counted_at = -math.inf
        self._status_changes: dict[int, ShardStatus] = {}
        self._received_series: dict[tuple[str, str, int], Any] = {}
        self._sent_series: dict[tuple[str, int], Any] = {}
        #: How often sessions (with their confirmed seq) are written to the store.
        self.persist_interval = 1.0
        #: Called after each periodic round (the worker process reports to its supervisor).
        self.after_round: Callable[[], None] | None = None
        #: Fleet: called when a shard was let go: (shard, session left behind, reason).
        self.on_released: Callable[[int, Session | None, str], None] | None = None
        self.fatal_code: int | None = None
        self.output_failed = False
        #: With resharding on, a shard closed with 4011 (sharding required) stops alone and
        #: says so in its status (the supervisor reshards); otherwise the worker stops with 78.
        self.sharding_required_is_fatal = sharding_required_is_fatal
        self.sharding_required: set[int] = set()
        #: ``PROMETHEUS_SHARD_SERIES=minimal``: counters of packets, commands, reconnects and
        #: sessions and the ``gateway_ping`` histogram carry this worker's name (``w3``) in
        #: place of the shard's id; per shard only state (``gateway_shards_alive``) and the
        #: last latency (``gateway_shard_latency_ms``). ``None`` (``all``): every series per
        #: shard.
        self.counter_label: str | None = None

    def bind_broker(self) -> None:
        """Let the broker wake us when it has news on its own time."""
        self.broker.set_wakeup(self._wake)

    # ------------------------------------------------------------------ EventHandler

    def publish(self, shard_id: int, dispatch: Dispatch) -> None:
        event, seq, data, session = dispatch
        self._unflushed += 1
        published = self._published
        published[event] = published.get(event, 0) + 1
        if seq is not None and shard_id not in self._latency_probe:
            # One event per shard at a time is timed from here to the broker's confirmation.
            self._latency_probe[shard_id] = (session, seq, self._clock())
        self._publish(shard_id, event, seq, data, session)

    def end_of_batch(self, shard_id: int) -> None:
        # The broker is flushed once per turn of the event loop, after every read of this
        # turn (hundreds of shards reading at once make one write, not one each), and at most
        # every FLUSH_INTERVAL: events that arrive one per wake-up go out a few at a time.
        self._changed.add(shard_id)
        self._unsaved.add(shard_id)
        if self._unflushed >= FLUSH_EVENTS:  # a big read: out with it now
            self._on_wake()
        elif not self._wake_scheduled:
            self._wake_scheduled = True
            loop = self._loop or self._running_loop()
            at = self._flushed_at + FLUSH_INTERVAL
            if loop.time() >= at:
                loop.call_soon(self._on_wake)
            else:  # flushed a moment ago: what comes meanwhile goes out together
                loop.call_at(at, self._on_wake)

    def shard_event(self, runner: ShardRunner, event: Event) -> None:
        self._changed.add(runner.shard_id)
        self._unsaved.add(runner.shard_id)
        kind = type(event)
        if kind is Notice:
            self._notice(runner.shard_id, event)  # type: ignore[arg-type]
        elif kind is CommandsSent:
            for ticket in event.tickets:  # type: ignore[union-attr]
                if callable(ticket):
                    ticket()
        elif kind is Gap:
            self.publish_gap(runner.shard_id, event)  # type: ignore[arg-type]
        elif kind is CommandsDropped:
            dropped: CommandsDropped = event  # type: ignore[assignment]
            metrics.input_dropped.labels(self.broker.name, dropped.reason).inc(len(dropped.tickets))
            for ticket in dropped.tickets:
                if callable(ticket):
                    ticket()

    def publish_gap(self, shard_id: int, gap: Gap) -> None:
        """Tell the consumers, as an ordinary event ``GATEWAY_GAP`` on the same exchange,
        stream or stdout, which events Discord will never send again."""
        offset = time.time() - asyncio.get_running_loop().time()  # core time -> wall time
        body = {
            "shard_id": shard_id,
            "shard_count": self.plan.shard_count,
            "generation": self.plan.generation,
            "reason": gap.reason,
            "old_session": gap.old_session,
            "new_session": gap.new_session,
            "last_seq": gap.last_seq,
            "since": round((gap.since + offset) * 1000),
            "until": round((gap.until + offset) * 1000),
        }
        log.warning(
            "shard %d: gap (%s): session %s… given up after seq %s; consumers are told",
            shard_id,
            gap.reason,
            gap.old_session[:8],
            gap.last_seq,
        )
        metrics.gaps.labels(gap.reason).inc()
        self._publish(shard_id, GAP_EVENT, None, msgspec.json.encode(body), gap.new_session)

    def _notice(self, shard_id: int, notice: Notice) -> None:
        kind = notice.kind
        log.log(_LEVELS[kind.level], "shard %d: %s: %s", shard_id, kind.label, notice.detail)
        shard = str(shard_id)
        counted = self.counter_label or shard
        if kind is NoticeKind.READY:
            metrics.identifies.labels(counted).inc()
            metrics.shards_alive.labels(shard).set(1)
        elif kind is NoticeKind.RESUMED:
            metrics.resumes.labels(counted).inc()
            metrics.shards_alive.labels(shard).set(1)
        elif kind is NoticeKind.DECODE_ERROR or kind is NoticeKind.POISON:
            metrics.decode_errors.labels(counted, "payload").inc()
        if kind.reconnect is not None:
            metrics.reconnects.labels(counted, kind.reconnect).inc()
            metrics.shards_alive.labels(shard).set(0)

    # ------------------------------------------------------------------ broker progress

    def _wake(self) -> None:
        if not self._wake_scheduled:
            self._wake_scheduled = True
            (self._loop or self._running_loop()).call_soon(self._on_wake)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _on_wake(self) -> None:
        self._wake_scheduled = False
        count = self._unflushed
        self._unflushed = 0
        now = (self._loop or self._running_loop()).time()
        cpu = self._cpu_clock()
        idle = cpu - self._cpu_at < BUSY_SHARE * (now - self._flushed_at)
        self._flushed_at = now
        self._cpu_at = cpu
        progress = self.broker.flush()
        if progress is not None:
            self._apply(progress)
        if count and idle and self.rest > 0:
            self._sleep(self.rest)  # blocks the loop on purpose: see REST

    def _apply(self, progress: Progress) -> None:
        runners = self.runners
        probes = self._latency_probe
        changed = self._changed
        unsaved = self._unsaved
        for shard_id, (session, seq) in progress.confirmed.items():
            runner = runners.get(shard_id)
            if runner is not None:
                runner.confirm(session, seq)
                changed.add(shard_id)
                unsaved.add(shard_id)
            probe = probes.get(shard_id)
            if probe is not None and probe[0] == session and probe[1] <= seq:
                del probes[shard_id]
                self._latencies.append(self._clock() - probe[2])
        if progress.paused is not None:
            for runner in runners.values():
                if progress.paused:
                    runner.pause_reading()
                else:
                    runner.resume_reading()
        for inbound in progress.commands:
            self._inbound(inbound)
        if progress.failed is not None:
            log.error("%s broker failed: %s; stopping", self.broker.name, progress.failed)
            self.output_failed = True
            self.request_stop(fast=True)

    # ------------------------------------------------------------------ commands

    def _inbound(self, inbound: Inbound) -> None:
        try:
            if inbound.shard_id is None:
                self.handle_command(inbound.body, inbound.ack)
            else:
                self.handle_shard_command(inbound.shard_id, inbound.body, inbound.ack)
        except Exception as exc:  # a bug of ours: one command must not stop the worker
            log.exception("internal error while handling a command")
            self._reject("internal_error", f"{type(exc).__name__}: {exc}", inbound.ack)

    def handle_command(self, body: bytes, ack: Ack) -> None:
        """A ``SEND`` command body from any broker: parse, route, queue; ack once written."""
        try:
            command = parse_command(body)
        except CommandError as exc:
            self._reject(exc.reason, str(exc), ack)
            return
        target = command.target(self.plan.shard_count)
        if target is not None and target not in self.runners:
            self._forward(target, command.packet, ack)
            return
        runners = [self.runners[target]] if target is not None else list(self.runners.values())
        remaining = [len(runners)]

        def sent() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                ack()

        for runner in runners:
            try:
                runner.send(command.packet, sent)
            except CommandRejected as exc:
                self._reject(exc.reason, str(exc), sent)

    def handle_shard_command(self, shard_id: int, body: bytes, ack: Ack) -> None:
        """A bare packet ``{"op", "d"}`` for one shard (AMQP per-shard queues)."""
        try:
            packet = parse_packet(msgspec.json.decode(unwrap_msgpack_string(body)))
        except CommandError as exc:
            self._reject(exc.reason, str(exc), ack)
            return
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            self._reject("not_json", f"not_json: {exc}", ack)
            return
        runner = self.runners.get(shard_id)
        if runner is None:
            self._forward(shard_id, packet, ack)
            return
        try:
            runner.send(packet, ack)
        except CommandRejected as exc:
            self._reject(exc.reason, str(exc), ack)

    def _forward(self, shard_id: int, packet: bytes, ack: Ack) -> None:
        count = self.plan.shard_count
        if not 0 <= shard_id < count:
            self._reject("unknown_shard", f"shard {shard_id} is outside 0..{count - 1}", ack)
        elif len(packet) > MAX_PAYLOAD_BYTES:
            self._reject("too_large", f"payload of {len(packet)} bytes is over the limit", ack)
        elif not self.broker.forward(shard_id, packet, ack):
            self._reject("unknown_shard", f"shard {shard_id} does not run in this worker", ack)

    def _reject(self, reason: str, detail: str, ack: Callable[[], None]) -> None:
        log.warning("rejected a command: %s", detail)
        metrics.input_dropped.labels(self.broker.name, reason).inc()
        ack()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, install_signals: bool = True) -> int:
        """Run until stopped by a signal or :meth:`request_stop`; return the exit code."""
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        if self._stop_early:
            self._stop_requested.set()
        self.bind_broker()
        await self.store.start()
        if install_signals:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop, False)
            loop.add_signal_handler(signal.SIGINT, self.request_stop, True)
        metrics.total_shards.set(len(self.plan.shard_ids))
        for shard_id in self.plan.shard_ids:
            await self.shards.add(shard_id)
        self._changed.update(self.runners)  # the first report shows every shard
        # After the runners exist: a command that arrives at once finds its shard (and is
        # queued until the shard is connected) instead of being handed on to itself.
        await self.broker.start()
        for runner in list(self.runners.values()):
            self.shards.start(runner)
        self._background = [loop.create_task(self._periodic())]
        if not self.runners and not self.dynamic:
            self._stop_requested.set()
        try:
            await self._stop_requested.wait()
        finally:
            await self._shutdown()
            if install_signals:
                loop.remove_signal_handler(signal.SIGTERM)
                loop.remove_signal_handler(signal.SIGINT)
        if self.fatal_code is not None or (self.sharding_required and not self.runners_alive()):
            return EX_CONFIG
        return EX_IOERR if self.output_failed else EX_OK

    def _runner_done(self, runner: ShardRunner, code: int | None) -> None:
        self._changed.add(runner.shard_id)
        if code == SHARDING_REQUIRED and not self.sharding_required_is_fatal:
            log.warning(
                "shard %d: Discord wants more shards (4011): it stays closed until the reshard",
                runner.shard_id,
            )
            self.sharding_required.add(runner.shard_id)
        elif code in FATAL_CODES:
            self.fatal_code = code
            self.request_stop()
            return
        stopping = self._stop_requested is not None and self._stop_requested.is_set()
        if not stopping and not self.dynamic and all(t.done() for t in self.shards.tasks.values()):
            self.request_stop()

    # ------------------------------------------------------------------ reshard

    def start_publishing(self) -> None:
        """The switch of a reshard: every shard publishes from its next message on."""
        self.plan = msgspec.structs.replace(self.plan, standby=False)
        self.shards.plan = self.plan
        for runner in self.runners.values():
            runner.core.start_publishing()
            self._changed.add(runner.shard_id)
        log.info(
            "generation %d: publishing from now on (%d shards)",
            self.plan.generation,
            len(self.runners),
        )

    def cover(self, shard_count: int, shards: frozenset[int]) -> None:
        """In standby: publish what these shards of the running generation no longer can."""
        self.plan = msgspec.structs.replace(self.plan, cover=shards, cover_count=shard_count)
        self.shards.plan = self.plan
        for runner in self.runners.values():
            runner.core.cover(shard_count, shards)
        if shards:
            log.info(
                "standby: publishing the guilds of shards %s of %d meanwhile (refused for good)",
                sorted(shards),
                shard_count,
            )

    async def retire(self, reason: str = "reshard", *, wait: float = RETIRE_WAIT) -> None:
        """This generation is over: consumers are told where each shard's events stopped
        (``GATEWAY_GAP``; the new generation carries them on), every shard closes with 1000
        and its stored session is forgotten, then the worker exits.

        A publishing shard in the middle of a reconnect is given up to ``wait`` seconds to
        resume first: the replay holds events the new generation did not publish."""
        loop = asyncio.get_running_loop()
        for _ in range(math.ceil(wait / 0.05)):  # polls the shards' phases, bounded
            if not self._reconnecting():
                break
            await asyncio.sleep(0.05)
        now = loop.time()
        for shard_id, runner in self.runners.items():
            gap = runner.core.take_gap(reason, now)
            if gap is not None:
                self.publish_gap(shard_id, gap)
        log.info(
            "generation %d retired (%s): closing %d shards with 1000",
            self.plan.generation,
            reason,
            len(self.runners),
        )
        self.keep_sessions = False
        self.request_stop()

    def _reconnecting(self) -> bool:
        """A publishing shard is between connections (it will resume and replay)."""
        for shard, task in self.shards.tasks.items():
            runner = self.runners.get(shard)
            if runner is None or task.done():
                continue
            stats = runner.stats()
            if stats.publishing and not stats.ready and stats.fatal_code is None:
                return True
        return False

    def runners_alive(self) -> bool:
        return any(s not in self.sharding_required for s in self.runners)

    # ------------------------------------------------------------------ fleet

    async def assign(self, shard_id: int, *, epoch: int, until: float) -> None:
        """Run ``shard_id`` (owned under lease ``epoch``, publishing until ``until``)."""
        runner = self.runners.get(shard_id)
        if runner is not None and not runner.expired:
            runner.lease_until = until
            self.shards.epochs[shard_id] = epoch
            return
        if runner is not None:  # expired, being let go: wait for that first
            await self.release(shard_id, save=False, reason="expired")
        runner = await self.shards.add(shard_id, epoch=epoch, until=until)
        self._changed.add(shard_id)
        self.broker.track(shard_id, running=True)
        self.shards.start(runner)

    async def release(self, shard_id: int, *, save: bool, reason: str = "release") -> None:
        """Stop ``shard_id`` resumably and forget it; with ``save``, its final confirmed
        session is written first (a handoff)."""
        if shard_id in self._releasing:
            return
        self._releasing.add(shard_id)
        try:
            session = await self.shards.release(shard_id, save=save, confirmed=self._on_wake)
        finally:
            self._releasing.discard(shard_id)
        self.broker.track(shard_id, running=False)
        self._changed.discard(shard_id)
        self._unsaved.discard(shard_id)
        self._latency_probe.pop(shard_id, None)
        log.info("shard %d: let go (%s)", shard_id, reason)
        if self.on_released is not None:
            self.on_released(shard_id, session, reason)

    def lease_expired(self, runner: ShardRunner) -> None:
        log.warning(
            "shard %d: its lease ran out before it was renewed: publishing nothing more",
            runner.shard_id,
        )
        metrics.lease_losses.labels("expired").inc()
        task = asyncio.get_running_loop().create_task(
            self.release(runner.shard_id, save=False, reason="expired")
        )
        self._background.append(task)

    def request_stop(self, fast: bool = False) -> None:
        """Stop: gracefully, or ``fast`` (a second request is always fast)."""
        if self._stop_requested is None:  # before run(): run() stops as soon as it starts
            self._stop_early = True
            self._fast = self._fast or fast
            return
        if self._stop_requested.is_set():
            fast = True
        self._fast = self._fast or fast
        log.info("stopping (%s)", "fast" if self._fast else "graceful")
        self._stop_requested.set()

    async def _shutdown(self) -> None:
        timeout = 1.0 if self._fast else self.plan.shutdown_timeout
        await self.shards.stop_all(keep_session=self.keep_sessions, wait=timeout)
        for background in self._background:
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
        await self.broker.aclose()  # flushes: the last confirmations advance the seqs
        progress = self.broker.take_progress()
        if progress is not None:
            self._apply(progress)
        self.observe(final=True)
        await self.persist_sessions(final=True)
        await self.store.aclose()
        close_gate = getattr(self.gate, "aclose", None)
        if close_gate is not None:
            await close_gate()

    async def persist_sessions(self, *, final: bool = False) -> None:
        """Write every shard's session whose confirmed seq (or anything else) changed; only
        shards that saw activity since the last round are looked at."""
        if final:
            self._unsaved.update(self.runners)
        unsaved, self._unsaved = self._unsaved, set()
        for shard_id in unsaved:
            runner = self.runners.get(shard_id)
            if runner is None:
                continue
            session = runner.session()
            if final and not self.keep_sessions:
                session = None
            if session == self._saved.get(shard_id):
                continue
            try:
                epoch = self.shards.epochs.get(shard_id, 0)
                await self.store.save(shard_id, self.plan.shard_count, session, epoch=epoch)
            except Exception as exc:
                log.warning("shard %d: could not save its session (%s); retrying", shard_id, exc)
                self._unsaved.add(shard_id)
                continue
            self._saved[shard_id] = session

    async def _periodic(self) -> None:
        """Once a second (one wake-up for everything periodic): metrics and statuses of the
        shards that changed, their sessions to the store, then the owner's report."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.persist_interval)
            try:
                self.shards.check_leases(loop.time())
                self.observe()
                await self.persist_sessions()
                if self.after_round is not None:
                    self.after_round()
            except Exception:  # a bug of ours: the next round must still come
                log.exception("internal error in the periodic round")
