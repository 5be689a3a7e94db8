"""A worker: one event loop running a group of shards, one broker connection, one store.

The worker wires the pieces: shard runners deliver dispatches here, we hand them to the broker;
the broker's confirmations advance each shard's confirmed seq; commands from the broker are
parsed, routed to a shard by Discord's rule and acknowledged once written to the websocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import metrics
from .brokers.base import Broker
from .brokers.wire import (
    CommandError,
    parse_command,
    parse_packet,
    target_shard,
    unwrap_msgpack_string,
)
from .exitcodes import EX_CONFIG, EX_IOERR
from .gate import LocalIdentifyGate
from .protocol.closecodes import FATAL_CODES
from .protocol.shard import MAX_PAYLOAD_BYTES, CommandRejected, Notice, Session, ShardConfig
from .store import MemoryStore, ShardStore
from .transport import IdentifyGateLike, ShardRunner

__all__ = ["EX_CONFIG", "Worker", "WorkerPlan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs to run its shards (built by the supervisor)."""

    shard_ids: tuple[int, ...]
    shard_count: int
    token: str = field(repr=False)
    intents: int
    gateway_url: str
    events: frozenset[str] | None = None  # None: every dispatch
    version: int = 10
    compress: str | None = "zstd-stream"
    large_threshold: int = 250
    presence: Mapping[str, Any] | None = None
    hello_timeout: float = 20.0
    open_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    max_concurrency: int = 1
    worker_id: int = 0
    send_limit: int = 120  # per connection per send_period (Discord: 120 per 60 s)
    send_period: float = 60.0

    def shard_config(self, shard_id: int) -> ShardConfig:
        return ShardConfig(
            shard_id=shard_id,
            shard_count=self.shard_count,
            token=self.token,
            intents=self.intents,
            gateway_url=self.gateway_url,
            version=self.version,
            compress=self.compress,
            large_threshold=self.large_threshold,
            presence=self.presence,
            events=self.events,
            hello_timeout=self.hello_timeout,
            send_limit=self.send_limit,
            send_period=self.send_period,
        )


_NOTICE_LEVELS = {
    "ready": logging.INFO,
    "resumed": logging.INFO,
    "reconnect_requested": logging.INFO,
    "invalid_session": logging.INFO,
    "closed": logging.INFO,
    "heartbeat_request": logging.DEBUG,
    "unknown_opcode": logging.DEBUG,
    "unexpected_hello": logging.WARNING,
    "zombie": logging.WARNING,
    "hello_timeout": logging.WARNING,
    "decode_error": logging.WARNING,
    "connect_failed": logging.WARNING,
}
_RECONNECT_REASONS = {
    "reconnect_requested": "op7",
    "invalid_session": "op9",
    "zombie": "zombie",
    "hello_timeout": "hello_timeout",
    "decode_error": "decode_error",
    "closed": "server_close",
    "connect_failed": "connect_failed",
}


class Worker:
    def __init__(
        self,
        plan: WorkerPlan,
        broker: Broker,
        *,
        store: ShardStore | None = None,
        gate: IdentifyGateLike | None = None,
        keep_sessions: bool | None = None,
    ) -> None:
        self.plan = plan
        self.broker = broker
        self.store: ShardStore = store or MemoryStore()
        self.gate = gate or LocalIdentifyGate(plan.max_concurrency)
        # Close with a resumable code on shutdown only if someone can resume the session later.
        self.keep_sessions = self.store.persistent if keep_sessions is None else keep_sessions
        self.runners: dict[int, ShardRunner] = {}
        self._stop_requested: asyncio.Event | None = None
        self._fast = False
        self._stop_early = False
        self._published: dict[str, int] = {}
        self._latency_probe: dict[int, tuple[str, int, float]] = {}
        self._latencies: list[float] = []
        self._reported: dict[int, tuple[int, int, dict[int, int]]] = {}
        self._clock = time.monotonic
        self._metrics_task: asyncio.Task[None] | None = None
        self._persist_task: asyncio.Task[None] | None = None
        self._saved: dict[int, Session | None] = {}
        #: How often sessions (with their confirmed seq) are written to the store.
        self.persist_interval = 1.0
        self.fatal_code: int | None = None
        self.output_failed = False

    # ------------------------------------------------------------------ EventHandler

    def publish(
        self, shard_id: int, event: str, seq: int | None, data: bytes, session: str
    ) -> None:
        published = self._published
        published[event] = published.get(event, 0) + 1
        if seq is not None and shard_id not in self._latency_probe:
            # One event per shard at a time is timed from here to the broker's confirmation.
            self._latency_probe[shard_id] = (session, seq, self._clock())
        self.broker.publish(shard_id, event, seq, data, session)

    def end_of_batch(self) -> None:
        self.broker.flush()

    def shard_notice(self, runner: ShardRunner, notice: Notice) -> None:
        kind = notice.kind
        shard_id = runner.shard_id
        log.log(
            _NOTICE_LEVELS.get(kind, logging.INFO),
            "shard %d: %s: %s",
            shard_id,
            kind.replace("_", " "),
            notice.detail,
        )
        shard = str(shard_id)
        if kind == "ready":
            metrics.identifies.labels(shard).inc()
            metrics.shards_alive.labels(shard).set(1)
        elif kind == "resumed":
            metrics.resumes.labels(shard).inc()
            metrics.shards_alive.labels(shard).set(1)
        elif kind == "decode_error":
            metrics.decode_errors.labels(shard, "payload").inc()
        reason = _RECONNECT_REASONS.get(kind)
        if reason is not None:
            metrics.reconnects.labels(shard, reason).inc()
            metrics.shards_alive.labels(shard).set(0)

    # ------------------------------------------------------------------ broker callbacks

    def _confirm(self, shard_id: int, session: str, seq: int) -> None:
        runner = self.runners.get(shard_id)
        if runner is not None:
            runner.core.confirm(seq, session)
        probe = self._latency_probe.get(shard_id)
        if probe is not None and probe[0] == session and probe[1] <= seq:
            del self._latency_probe[shard_id]
            self._latencies.append(self._clock() - probe[2])

    def _pause(self) -> None:
        for runner in self.runners.values():
            runner.pause_reading()

    def _resume(self) -> None:
        for runner in self.runners.values():
            runner.resume_reading()

    def handle_command(self, body: bytes, ack: Callable[[], None]) -> None:
        """A ``SEND`` command body from any broker: parse, route, queue; ack once written."""
        try:
            command = parse_command(body)
        except CommandError as exc:
            self._reject(exc.reason, str(exc), ack)
            return
        if command.shard_id is not None:
            targets = [command.shard_id]
        elif command.guild_id is not None:
            targets = [target_shard(command.guild_id, self.plan.shard_count)]
        else:
            targets = sorted(self.runners)
        if len(targets) == 1 and targets[0] not in self.runners:
            self._forward(targets[0], command.packet, ack)
            return
        runners = [self.runners[shard_id] for shard_id in targets]
        remaining = [len(runners)]

        def sent() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                ack()

        for runner in runners:
            try:
                runner.send(command.packet, sent)
            except CommandRejected as exc:
                self._reject("too_large", str(exc), ack)
                return

    def handle_shard_command(self, shard_id: int, body: bytes, ack: Callable[[], None]) -> None:
        """A bare packet ``{"op", "d"}`` for one shard (AMQP per-shard queues)."""
        try:
            packet = parse_packet(msgspec.json.decode(unwrap_msgpack_string(body)))
        except CommandError as exc:
            self._reject(exc.reason, str(exc), ack)
            return
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            self._reject("not_json", f"not_json: {exc}", ack)
            return
        runner = self.runners.get(shard_id)
        if runner is None:
            self._forward(shard_id, packet, ack)
            return
        try:
            runner.send(packet, ack)
        except CommandRejected as exc:
            self._reject("too_large", str(exc), ack)

    def _forward(self, shard_id: int, packet: bytes, ack: Callable[[], None]) -> None:
        count = self.plan.shard_count
        if not 0 <= shard_id < count:
            self._reject("unknown_shard", f"shard {shard_id} is outside 0..{count - 1}", ack)
        elif len(packet) > MAX_PAYLOAD_BYTES:
            self._reject("too_large", f"payload of {len(packet)} bytes is over the limit", ack)
        elif not self.broker.forward(shard_id, packet, ack):
            self._reject("unknown_shard", f"shard {shard_id} does not run in this worker", ack)

    def _broker_failed(self, reason: str) -> None:
        log.error("%s broker failed: %s; stopping", self.broker.name, reason)
        self.output_failed = True
        self.request_stop(fast=True)

    def _reject(self, reason: str, detail: str, ack: Callable[[], None]) -> None:
        log.warning("rejected a command: %s", detail)
        metrics.input_dropped.labels(self.broker.name, reason).inc()
        ack()

    def _commands_sent(self, tickets: list[object]) -> None:
        for ticket in tickets:
            if callable(ticket):
                ticket()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, install_signals: bool = True) -> int:
        """Run until stopped by a signal or :meth:`request_stop`; return the exit code."""
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        if self._stop_early:
            self._stop_requested.set()
        self.broker.bind(
            confirm=self._confirm,
            pause=self._pause,
            resume=self._resume,
            commands=self.handle_command,
            shard_commands=self.handle_shard_command,
            fail=self._broker_failed,
        )
        await self.store.start()
        if install_signals:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop, False)
            loop.add_signal_handler(signal.SIGINT, self.request_stop, True)
        metrics.total_shards.set(len(self.plan.shard_ids))
        for shard_id in self.plan.shard_ids:
            session = await self.store.load(shard_id, self.plan.shard_count)
            self._saved[shard_id] = session
            if session is not None:
                log.info(
                    "shard %d: stored session %s… at seq %s: will resume",
                    shard_id,
                    session.session_id[:8],
                    session.seq,
                )
            runner = ShardRunner(
                self.plan.shard_config(shard_id),
                self,
                self.gate,
                session=session,
                open_timeout=self.plan.open_timeout,
                on_commands_sent=self._commands_sent,
            )
            self.runners[shard_id] = runner
            metrics.shards_alive.labels(str(shard_id)).set(0)
        # After the runners exist: a command that arrives at once finds its shard (and is
        # queued until the shard is connected) instead of being handed on to itself.
        await self.broker.start()
        tasks = {runner.start(): runner for runner in self.runners.values()}
        self._metrics_task = loop.create_task(self._metrics_loop())
        self._persist_task = loop.create_task(self._persist_loop())
        stop_wait = loop.create_task(self._stop_requested.wait())
        pending: set[asyncio.Future[Any]] = {*tasks, stop_wait}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    break
                for task in done:
                    code = task.result() if not task.cancelled() else None
                    if code in FATAL_CODES:
                        self.fatal_code = code
                if self.fatal_code is not None or not any(t in pending for t in tasks):
                    break
        finally:
            stop_wait.cancel()
            await self._shutdown(list(tasks))
            if install_signals:
                loop.remove_signal_handler(signal.SIGTERM)
                loop.remove_signal_handler(signal.SIGINT)
        if self.fatal_code is not None:
            return EX_CONFIG
        return EX_IOERR if self.output_failed else 0

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

    async def _shutdown(self, tasks: list[asyncio.Task[int | None]]) -> None:
        for runner in self.runners.values():
            runner.stop(keep_session=self.keep_sessions)
        timeout = 1.0 if self._fast else self.plan.shutdown_timeout
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        for background in (self._metrics_task, self._persist_task):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
        self._flush_metrics()
        await self.broker.aclose()  # flushes: the last confirmations advance the seqs
        await self.persist_sessions(final=True)
        await self.store.aclose()
        close_gate = getattr(self.gate, "aclose", None)
        if close_gate is not None:
            await close_gate()

    async def persist_sessions(self, *, final: bool = False) -> None:
        """Write every shard's session whose confirmed seq (or anything else) changed."""
        for shard_id, runner in self.runners.items():
            session = runner.core.session()
            if final and not self.keep_sessions:
                session = None
            if session == self._saved.get(shard_id):
                continue
            try:
                await self.store.save(shard_id, self.plan.shard_count, session)
            except Exception as exc:
                log.warning("shard %d: could not save the session (%s); will retry", shard_id, exc)
                continue
            self._saved[shard_id] = session

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(self.persist_interval)
            await self.persist_sessions()

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        if self._published:
            for event, count in self._published.items():
                metrics.events_published.labels(event).inc(count)
            self._published.clear()
        if self._latencies:
            histogram = metrics.publish_latency.labels(self.broker.name)
            for seconds in self._latencies:
                histogram.observe(seconds)
            self._latencies.clear()
        confirmed = 0
        for shard_id, runner in self.runners.items():
            core = runner.core
            shard = str(shard_id)
            last_confirmed, last_commands, last_sent = self._reported.get(shard_id, (0, 0, {}))
            confirmed += core.confirmed_events - last_confirmed
            if core.commands_sent > last_commands:
                metrics.commands_sent.labels(shard).inc(core.commands_sent - last_commands)
            for op, count in core.packets_sent.items():
                if count > last_sent.get(op, 0):
                    metrics.packets_sent.labels("", str(op), shard).inc(
                        count - last_sent.get(op, 0)
                    )
            self._reported[shard_id] = (
                core.confirmed_events,
                core.commands_sent,
                dict(core.packets_sent),
            )
            if core.packets_received:
                metrics.flush_shard_counts(shard_id, core.packets_received)
            if core.latency is not None:
                metrics.ping.labels(shard).observe(core.latency * 1000.0)
                core.latency = None
        if confirmed:
            metrics.events_confirmed.labels(self.broker.name).inc(confirmed)
