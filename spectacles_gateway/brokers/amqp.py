"""The AMQP (RabbitMQ) broker: Spectacles-compatible output, publisher confirms, commands in.

The broker is split by job:

- :mod:`.amqp_frames`: the ``basic.publish`` frames of each message, built once;
- :mod:`.amqp_confirms`: publisher-confirm bookkeeping (what each shard may confirm);
- :mod:`.amqp_link`: the connection (set-up, reconnects with backoff, blocked, close);
- :mod:`.amqp_commands`: the command consumers (each delivery in its own boundary) and the
  packets handed on to other workers' shards;
- :mod:`.amqp_pika`: every use of pika's private API, in one class;
- here: publishing, confirms, back-pressure, and the wiring.

Output (product.md "Outputs"):

- Exchange ``<group>`` (declared as :mod:`.amqp_link` says). Routing key: the event name.
  Body: the msgpack string of the raw JSON of ``d`` (or the JSON itself with
  ``broker.format = "json"``). Properties: ``expiration`` (``message_timeout`` in ms),
  ``headers`` ``{"shard_id", "seq"}``, ``message_id`` ``<session id>:<seq>`` (the same for an
  event replayed after a RESUME, so consumers can drop duplicates), ``timestamp`` (seconds),
  delivery mode 2 with ``amqp.persistent``. Published with ``mandatory``.
- The frames of each message are built once and a whole batch of messages goes out in one
  write, bypassing pika's per-publish marshalling; pika still runs the connection, the
  channels, heartbeats, returns, consumers and flow control.

No loss (publisher confirms, :mod:`.amqp_confirms`): a shard's confirmed seq only advances over
the unbroken run of messages of that shard that RabbitMQ confirmed, in publish order.

- ``basic.nack`` (a queue could not take the message, e.g. a full ``reject-publish`` queue):
  the message is published again after a short backoff (``backoff_delay``, 0.1–0.2 s doubling
  up to 2.5–5 s while nacks go on), for as long as it takes, and counted in
  ``gateway_publish_failures_total{reason="nacked"}``. Its shard's confirmed seq waits for it,
  and the buffer bound turns a lasting refusal into back-pressure, never loss.
- ``basic.return`` (no queue is bound for that event, so nobody subscribed to it): RabbitMQ
  drops it and we count it in ``gateway_publish_failures_total{reason="unroutable"}`` with one
  warning per event name per minute; its ``basic.ack`` follows and settles it. Not retried:
  there is nobody to deliver it to.
- Buffer: at most ``broker.buffer`` events waiting or unconfirmed; at that point the worker is
  asked to pause reading its sockets, and to resume once the count fell to half. One socket
  read may overshoot the bound by the events it already holds.
- Outages: every message not yet confirmed is kept, in publish order, and published again (the
  same message ids) on the next connection before anything newer. While RabbitMQ blocks
  publishing (a resource alarm), nothing is written; events wait in the buffer. ``connected``
  is True only while the connection is open and set up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..protocol.backoff import backoff_delay
from ..redact import redact_url
from .amqp_commands import CommandIntake, Forwarder
from .amqp_confirms import FORWARD, ConfirmTracker
from .amqp_frames import FrameBuilder, message_body
from .amqp_link import AmqpLink, describe
from .amqp_pika import PikaConnection
from .base import Ack, Broker, Progress

if TYPE_CHECKING:
    from ..config import Settings
    from ..plan import WorkerPlan

__all__ = ["FORWARD", "AmqpBroker", "ConfirmTracker"]

log = logging.getLogger(__name__)


class AmqpBroker(Broker):
    name = "amqp"

    def __init__(
        self,
        url: str = "amqp://guest:guest@localhost:5672/%2F",
        *,
        group: str = "gateway",
        shard_ids: Iterable[int] = (),
        message_timeout: float = 120.0,
        fmt: str = "msgpack",
        persistent: bool = False,
        prefetch: int = 100,
        buffer: int = 10000,
        connect_wait: float = 5.0,
        reconnect_base: float = 0.5,
        reconnect_cap: float = 10.0,
        shutdown_wait: float = 5.0,
        generation: int = 0,
    ) -> None:
        super().__init__()
        self.url = url
        self.group = group
        self.shard_ids = tuple(shard_ids)
        self.persistent = persistent
        self.limit = buffer
        self.low_water = buffer // 2
        self.connect_wait = connect_wait
        self.shutdown_wait = shutdown_wait
        self.builder = FrameBuilder(
            exchange=group,
            expiration_ms=max(0, round(message_timeout * 1000)),
            persistent=persistent,
            fmt=fmt,
            generation=generation,
        )
        self.tracker = ConfirmTracker(self._confirmed)
        self.intake = CommandIntake(group, self._take_command, self._owns)
        self.link = AmqpLink(
            url,
            group=group,
            queues=self.intake.queues(self.shard_ids),
            handler=self,
            prefetch=prefetch,
            reconnect_base=reconnect_base,
            reconnect_cap=reconnect_cap,
        )
        self.forwarder = Forwarder(group, self.link, self.tracker, self._progressed)
        self.paused = False
        self.reconnects = 0
        self.published = 0
        #: Times the buffer filled up and the shards were asked to stop reading.
        self.pauses = 0
        self._pause_noted = -1e9
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: PikaConnection | None = None
        self._ever_connected = False
        self._metrics_task: asyncio.Task[None] | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._nack_streak = 0
        self._returned: dict[str, tuple[float, int]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, plan: WorkerPlan) -> AmqpBroker:
        return cls(
            settings.amqp.url,
            group=settings.broker.group,
            shard_ids=plan.shard_ids,
            message_timeout=settings.broker.message_timeout,
            fmt=settings.broker.format,
            persistent=settings.amqp.persistent,
            prefetch=settings.amqp.prefetch,
            buffer=settings.broker.buffer,
            generation=plan.generation,
        )

    def track(self, shard_id: int, *, running: bool) -> None:
        """Fleet: consume ``<group>:<shard>`` while this worker runs the shard."""
        if running:
            (queue,) = self.intake.queues((shard_id,))[1:]
            self.link.add_queue(queue)
        else:
            self.link.remove_queue(f"{self.group}:{shard_id}")

    @property
    def blocked(self) -> bool:
        """RabbitMQ blocked publishing (a resource alarm): events wait in the buffer."""
        return self.link.blocked

    # ------------------------------------------------------------------ output

    def publish(
        self, shard_id: int, event: str, seq: int | None, data: bytes, session: str
    ) -> None:
        frames = self.builder.event(event, shard_id, seq, session, data)
        self.tracker.add(shard_id, seq, session, event, frames)

    def flush(self) -> Progress | None:
        self._send()
        return self.take_progress()

    def _send(self) -> None:
        """Write the frames of every message waiting; pause the shards when the buffer is full."""
        tracker = self.tracker
        conn = self._conn
        if tracker.pending and conn is not None and not self.link.blocked:
            chunks = tracker.take_pending()
            self.published += len(chunks)
            conn.write(b"".join(chunks), 3 * len(chunks))
        if not self.paused and tracker.unconfirmed >= self.limit:
            self.paused = True
            self.pauses += 1
            now = time.monotonic()
            if now - self._pause_noted >= 60.0:  # a burst can fill it many times a second
                self._pause_noted = now
                log.warning(
                    "broker buffer full (%d events waiting for RabbitMQ, %s): shards stop "
                    "reading until it drains (noted once a minute; %d times so far)",
                    tracker.unconfirmed,
                    "connected"
                    if conn is not None and not self.link.blocked
                    else "RabbitMQ unavailable",
                    self.pauses,
                )
            metrics.broker_buffered.set(tracker.unconfirmed)
            self._flow(True)

    def forward(self, shard_id: int, packet: bytes, ack: Ack) -> bool:
        if self.link.closing:
            return False
        forwarder = self.forwarder
        route = forwarder.route(shard_id)
        frames = self.builder.command(route, packet)
        declared = forwarder.declared(shard_id)
        msg = self.tracker.add(FORWARD, None, "", route, frames, ack=ack, waiting=declared)
        if declared:
            self._send()
        else:  # held back until its queue exists (its owner may never have started yet)
            forwarder.hold(shard_id, msg)
        return True

    def _progressed(self) -> None:
        """Messages were released or dropped outside a flush: write, and report."""
        self._send()
        self._maybe_resume()
        self._wake()

    # ------------------------------------------------------------------ confirms (LinkHandler)

    def on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        tracker = self.tracker
        if ok:
            forwarded = tracker.settle(tag, multiple, ok)
            self._nack_streak = 0
            for msg in forwarded:
                if msg.ack is not None:
                    msg.ack()
        else:
            before = len(tracker.nacked)
            tracker.settle(tag, multiple, ok)
            refused = len(tracker.nacked) - before
            if refused:
                metrics.publish_failures.labels("nacked").inc(refused)
            if tracker.nacked and self._retry_handle is None:
                self._nack_streak += 1
                delay = backoff_delay(self._nack_streak, random.random(), base=0.2, cap=5.0)
                log.warning(
                    "RabbitMQ refused %d messages (basic.nack); publishing them again in %.2f s",
                    len(tracker.nacked),
                    delay,
                )
                assert self._loop is not None
                self._retry_handle = self._loop.call_later(delay, self._retry_nacked)
        self._maybe_resume()
        self._wake()

    def _maybe_resume(self) -> None:
        unconfirmed = self.tracker.unconfirmed
        if self.paused and unconfirmed <= self.low_water:
            self.paused = False
            log.debug("broker buffer drained (%d events waiting)", unconfirmed)
            metrics.broker_buffered.set(unconfirmed)
            self._flow(False)

    def _retry_nacked(self) -> None:
        self._retry_handle = None
        self.tracker.retry()
        self._send()

    def on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        key = method.routing_key
        metrics.publish_failures.labels("unroutable").inc()
        now = time.monotonic()
        last, count = self._returned.get(key, (0.0, 0))
        if now - last >= 60.0:
            log.warning(
                "RabbitMQ returned %d %s message(s) of exchange %r: no queue is bound for it "
                "(%s); nobody subscribed to it, so it is dropped",
                count + 1,
                key,
                method.exchange,
                method.reply_text,
            )
            self._returned[key] = (now, 0)
        else:
            self._returned[key] = (last, count + 1)

    # ------------------------------------------------------------------ commands in

    def _take_command(self, body: bytes, ack: Ack, shard_id: int | None) -> None:
        self._command(body, ack, shard_id)
        self._wake()

    def _owns(self, channel: Any) -> bool:
        return self.link.owns(channel)

    # ------------------------------------------------------------------ the link (LinkHandler)

    def link_up(self, conn: PikaConnection, channel: int, frame_max: int) -> None:
        if self.builder.signature != (channel, frame_max):
            self._rebuild(channel, frame_max)
        tracker = self.tracker
        waiting = len(tracker.pending) + len(tracker.nacked)
        self._conn = conn
        self.connected = True
        metrics.broker_connected.set(1)
        if self._ever_connected:
            self.reconnects += 1
            metrics.broker_reconnects.labels(self.name).inc()
            log.info(
                "reconnected to RabbitMQ; publishing %d events that were not confirmed", waiting
            )
        else:
            log.info("connected to RabbitMQ at %s, exchange %r", redact_url(self.url), self.group)
        self._ever_connected = True
        tracker.retry()
        self.forwarder.link_up()
        self._send()

    def _rebuild(self, channel: int, frame_max: int) -> None:
        old = self.builder
        self.builder = FrameBuilder(
            exchange=old.exchange,
            expiration_ms=old.expiration_ms,
            channel=channel,
            frame_max=frame_max,
            persistent=old.persistent,
            fmt=old.fmt,
            mandatory=old.mandatory,
            generation=old.generation,
        )
        for msg in [*self.tracker.unsettled(), *self.forwarder.held()]:
            if msg.shard == FORWARD:
                msg.frames = self.builder.command(msg.route, message_body(msg.frames))
            else:
                data = old.event_data(msg.frames)
                msg.frames = self.builder.event(msg.route, msg.shard, msg.seq, msg.session, data)

    def link_down(self, reason: object, was_ready: bool) -> None:
        self._conn = None
        self.connected = False
        metrics.broker_connected.set(0)
        self.forwarder.link_down()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        out = self.tracker.reset()
        if was_ready and not self.link.closing:
            log.warning(
                "lost the connection to RabbitMQ (%s); %d events wait for the next one "
                "(%d were not confirmed)",
                describe(reason),
                self.tracker.unconfirmed,
                out,
            )

    def on_unblocked(self) -> None:
        self._send()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._metrics_task = loop.create_task(self._metrics_loop(), name="amqp-metrics")
        if not await self.link.start(self.connect_wait):
            log.warning(
                "RabbitMQ at %s is not reachable yet; events wait in the buffer until it is",
                redact_url(self.url),
            )

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        metrics.broker_buffered.set(self.tracker.unconfirmed)
        # events_published / events_confirmed are counted by the worker for every broker.

    async def aclose(self) -> None:
        self._send()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_wait
        # Wait for the last confirmations: they advance the sessions' confirmed seqs.
        while self.tracker.unconfirmed and self.link.ready and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self.link.closing = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        await self.link.close()
        if self._metrics_task is not None:
            self._metrics_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics_task
        if self.tracker.unconfirmed:
            log.warning(
                "stopping with %d events not confirmed by RabbitMQ: they are replayed on resume",
                self.tracker.unconfirmed,
            )
        self._flush_metrics()
        self._conn = None
        self.connected = False
        metrics.broker_connected.set(0)
