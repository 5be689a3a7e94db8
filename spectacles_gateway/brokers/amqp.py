"""The AMQP (RabbitMQ) broker: Spectacles-compatible output, publisher confirms, commands in.

Where pika runs: on the worker's own event loop (uvloop in production), through
``pika.adapters.asyncio_connection.AsyncioConnection``. A dedicated pika thread (a
``SelectConnection`` fed through a deque and ``add_callback_threadsafe``, confirms handed back
with ``call_soon_threadsafe``) was measured against it with the same frames and bookkeeping
(``benchmarks/bench_amqp.py --placement``): 6.5 against 5.1–5.3 µs of CPU per message, at the
same rate (RabbitMQ is the bottleneck at 40–50k msg/s). The GIL serialises the two threads
anyway, so the thread only adds the hand-off and its wake-ups to the same Python work.

Output (product.md "Outputs"):

- Exchange ``<group>``, ``direct``, durable, not auto-delete, not internal, no arguments: what
  ``@spectacles/brokers`` (amqplib's ``assertExchange(group, "direct")``) and the Go libraries
  declare, so either side may declare it first.
- Routing key: the event name. Body: the msgpack string of the raw JSON of ``d`` (or the JSON
  itself with ``broker.format = "json"``). Properties: ``expiration`` (``message_timeout`` in
  ms), ``headers`` ``{"shard_id", "seq"}``, ``message_id`` ``<session id>:<seq>`` (the same for
  an event replayed after a RESUME, so consumers can drop duplicates), ``timestamp`` (seconds),
  delivery mode 2 with ``amqp.persistent``. Published with ``mandatory``.
- The frames of each message are built once (:mod:`.amqp_frames`) and a whole batch of messages
  goes out in one write, bypassing pika's per-publish marshalling; pika still runs the
  connection, the channels, heartbeats, returns, consumers and flow control.

No loss (publisher confirms):

- Every message gets the channel's next delivery tag. ``basic.ack`` (``multiple`` or single,
  in any order) settles messages; a shard's confirmed seq only advances over the unbroken run
  of settled messages of that shard, in publish order, so ``confirm(shard, session, seq)`` always
  means "everything of that shard up to ``seq`` is with RabbitMQ".
- ``basic.nack`` (a queue could not take the message, e.g. a full ``reject-publish`` queue):
  the message is published again after a short backoff (``backoff_delay``, 0.1–0.2 s doubling up
  to 2.5–5 s while nacks go on), for as long as it takes, and
  counted in ``gateway_publish_failures_total{reason="nacked"}``. Its shard's confirmed seq
  waits for it, and the buffer bound turns a lasting refusal into back-pressure, never loss.
- ``basic.return`` (no queue is bound for that event, so nobody subscribed to it): RabbitMQ
  drops it and we count it in ``gateway_publish_failures_total{reason="unroutable"}`` with one
  warning per event name per minute; its ``basic.ack`` follows and settles it. Not retried:
  there is nobody to deliver it to.
- Buffer: at most ``broker.buffer`` events waiting or unconfirmed; at that point the worker is
  asked to ``pause()`` reading its sockets, and ``resume()`` once the count fell to half.
  One socket read may overshoot the bound by the events it already holds.

Outages: when the connection is lost (RabbitMQ restarted, network, a channel error) every
message not yet confirmed is kept, in publish order; the broker reconnects with backoff
(``backoff_delay``: 0.25–0.5 s, doubling up to 10 s), declares everything again and publishes
them again (the same message ids) before anything newer. Connection blocked by RabbitMQ (memory
or disk alarm): nothing is written until it is unblocked; events wait in the buffer.
``connected`` is True only while the connection is open and set up.

Inputs:

- ``<group>:SEND`` (durable, bound with ``SEND``): bodies go to ``commands(body, ack)``.
- ``<group>:<shard id>`` for every shard this worker runs (durable, bound with the shard id as
  a decimal string, as the Go gateway did; publishers may also use the default exchange with
  the queue name): bare packets go to ``shard_commands(shard_id, body, ack)``.
- Manual acks, prefetch ``amqp.prefetch``; ``ack()`` is idempotent and a no-op after the
  channel went away (RabbitMQ then redelivers the command). Bodies over 64 KiB are dropped
  before parsing (``gateway_input_dropped_total{source="amqp",reason="too_large"}``); the
  worker logs, counts and acks every other malformed command.
- :meth:`AmqpBroker.forward` hands a packet to another worker's shard: the queue
  ``<group>:<shard>`` is declared (durable, on a channel of its own so that a refusal cannot
  stop the events) and bound, then the packet is published to it through the default exchange
  (the compact JSON, persistent when configured); the command is acked once RabbitMQ confirmed
  the copy. A queue that cannot be declared drops those commands with a warning
  (``reason="forward_failed"``).

pika's own logger is raised to CRITICAL at :meth:`AmqpBroker.start` unless this module logs at
DEBUG: it logs every lost connection at ERROR with a traceback, which we report once ourselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pika
from pika import spec
from pika.adapters.asyncio_connection import AsyncioConnection

from .. import metrics
from ..protocol.backoff import backoff_delay
from ..redact import redact_url
from .amqp_frames import DEFAULT_FRAME_MAX, FrameBuilder, message_body
from .base import Broker, Progress

if TYPE_CHECKING:
    from ..config import Settings
    from ..plan import WorkerPlan

__all__ = ["MAX_COMMAND_BODY", "AmqpBroker", "ConfirmTracker"]

log = logging.getLogger(__name__)

#: A command body larger than this is dropped without being parsed (a valid one is < 5 KiB).
MAX_COMMAND_BODY = 65536
#: Queued messages that are not events of a shard (forwarded commands) use this shard key.
FORWARD = -1

_PENDING, _INFLIGHT, _ACKED = 0, 1, 2


class _Msg:
    """One message until RabbitMQ confirmed it."""

    __slots__ = ("ack", "frames", "order", "route", "seq", "session", "shard", "state", "tag")

    def __init__(
        self, shard: int, seq: int | None, session: str, route: str, frames: bytes
    ) -> None:
        self.order = 0
        self.shard = shard
        self.seq = seq
        self.session = session
        self.route = route
        self.frames = frames
        self.state = _PENDING
        self.tag = 0
        self.ack: Callable[[], None] | None = None


class ConfirmTracker:
    """Publisher-confirm bookkeeping, without I/O: which messages are waiting, which are out
    with which delivery tag, and what each shard may confirm.

    Call :meth:`add` for each new message, :meth:`take_pending` to write what waits (it assigns
    the delivery tags), :meth:`settle` for each ``basic.ack``/``basic.nack``, :meth:`retry` to
    queue nacked messages again and :meth:`reset` when the channel is gone.
    """

    def __init__(self, confirm: Callable[[int, str, int], None]) -> None:
        self.confirm = confirm
        self.pending: deque[_Msg] = deque()
        self.inflight: deque[tuple[int, _Msg]] = deque()
        self.by_shard: dict[int, deque[_Msg]] = {}
        self.nacked: list[_Msg] = []
        self.tag = 0
        self.order = 0
        #: Messages added and not yet confirmed (waiting, out, or nacked).
        self.unconfirmed = 0
        #: Messages confirmed so far.
        self.confirmed = 0

    def add(
        self,
        shard: int,
        seq: int | None,
        session: str,
        route: str,
        frames: bytes,
        *,
        ack: Callable[[], None] | None = None,
        waiting: bool = True,
    ) -> _Msg:
        """A new message; ``waiting=False``: held back (the caller queues it later)."""
        self.order += 1
        msg = _Msg(shard, seq, session, route, frames)
        msg.order = self.order
        msg.ack = ack
        if waiting:
            self.pending.append(msg)
        if shard != FORWARD:
            queue = self.by_shard.get(shard)
            if queue is None:
                queue = self.by_shard[shard] = deque()
            queue.append(msg)
        self.unconfirmed += 1
        return msg

    def take_pending(self) -> list[bytes]:
        """The frames of every waiting message, in order; they are now out with new tags."""
        pending = self.pending
        if not pending:
            return []
        tag = self.tag
        append = self.inflight.append
        chunks = []
        for msg in pending:
            tag += 1
            msg.tag = tag
            msg.state = _INFLIGHT
            append((tag, msg))
            chunks.append(msg.frames)
        pending.clear()
        self.tag = tag
        return chunks

    def settle(self, tag: int, multiple: bool, ok: bool) -> list[_Msg]:
        """Apply one ``basic.ack`` (``ok``) or ``basic.nack``; confirm what each shard may
        confirm now; return the forwarded commands that were acked (their ``ack`` is due) and,
        for a nack, nothing (the nacked messages wait in :attr:`nacked` for :meth:`retry`)."""
        inflight = self.inflight
        if not inflight:
            return []
        settled: list[_Msg] = []
        if multiple:
            while inflight and inflight[0][0] <= tag:
                t, msg = inflight.popleft()
                if msg.tag == t and msg.state == _INFLIGHT:
                    settled.append(msg)
        else:
            index = tag - inflight[0][0]
            if 0 <= index < len(inflight):
                t, msg = inflight[index]
                if msg.tag == t and msg.state == _INFLIGHT:
                    settled.append(msg)
        if not settled:
            return []
        if not ok:
            for msg in settled:
                msg.state = _PENDING
                msg.tag = 0
            self.nacked.extend(settled)
            self._drop_settled_heads()
            return []
        shards: set[int] = set()
        forwarded: list[_Msg] = []
        for msg in settled:
            msg.state = _ACKED
            if msg.shard == FORWARD:
                forwarded.append(msg)
            else:
                shards.add(msg.shard)
        self._drop_settled_heads()
        done = len(forwarded)
        confirm = self.confirm
        for shard in shards:
            queue = self.by_shard[shard]
            last: _Msg | None = None
            while queue and queue[0].state == _ACKED:
                msg = queue.popleft()
                done += 1
                if msg.seq is not None:
                    if last is not None and last.session != msg.session:
                        confirm(shard, last.session, last.seq)  # type: ignore[arg-type]
                    last = msg
            if last is not None:
                confirm(shard, last.session, last.seq)  # type: ignore[arg-type]
            if not queue:
                del self.by_shard[shard]
        self.unconfirmed -= done
        self.confirmed += done
        return forwarded

    def _drop_settled_heads(self) -> None:
        inflight = self.inflight
        while inflight:
            t, msg = inflight[0]
            if msg.tag == t and msg.state == _INFLIGHT:
                return
            inflight.popleft()

    def retry(self) -> int:
        """Queue the nacked messages again, before anything newer; returns how many."""
        nacked = self.nacked
        if not nacked:
            return 0
        count = len(nacked)
        self._requeue(nacked)
        self.nacked = []
        return count

    def reset(self) -> int:
        """The channel is gone: every message out or nacked waits again, in publish order, and
        delivery tags start over. Returns how many messages were out."""
        out = [msg for t, msg in self.inflight if msg.tag == t and msg.state == _INFLIGHT]
        self.inflight.clear()
        self._requeue([*out, *self.nacked])
        self.nacked = []
        self.tag = 0
        return len(out)

    def _requeue(self, msgs: Iterable[_Msg]) -> None:
        again = list(msgs)
        for msg in again:
            msg.state = _PENDING
            msg.tag = 0
        self.pending = deque(sorted([*again, *self.pending], key=_order))

    def unsettled(self) -> list[_Msg]:
        """Every message not yet confirmed, in publish order (waiting, out or nacked)."""
        out = [msg for t, msg in self.inflight if msg.tag == t and msg.state == _INFLIGHT]
        return sorted([*out, *self.nacked, *self.pending], key=_order)


def _order(msg: _Msg) -> int:
    return msg.order


class _ChannelGone(ConnectionError):
    """A channel or the connection closed while we waited for a reply."""


class _Connection(AsyncioConnection):  # type: ignore[misc]
    """pika's asyncio connection with a fast path for ``basic.ack``/``basic.nack`` frames.

    Under load RabbitMQ sends thousands of confirm frames per second; pika decodes each through
    its generic frame, method and callback-manager machinery (and copies its whole input buffer
    once per frame). The complete confirm frames of the publish channel at the start of each
    read are decoded here (21 fixed bytes each) and handed straight to ``on_confirm``; everything
    else, including a confirm after any other frame in the same read, goes through pika as
    usual. Measured: about 0.5 µs of CPU less per published message (~10 % of the publisher).
    """

    fast_channel = 0
    on_confirm: Callable[[int, bool, bool], None] | None = None

    def _on_data_available(self, data_in: bytes) -> None:
        on_confirm = self.on_confirm
        if on_confirm is None or self._frame_buffer:
            super()._on_data_available(data_in)
            return
        pos = 0
        end = len(data_in)
        channel = self.fast_channel
        while end - pos >= 21:
            if (
                data_in[pos] != 1
                or data_in[pos + 20] != 0xCE
                or data_in[pos + 3 : pos + 9] != b"\x00\x00\x00\x0d\x00\x3c"
                or (data_in[pos + 1] << 8 | data_in[pos + 2]) != channel
            ):
                break
            method = data_in[pos + 10]
            if data_in[pos + 9] != 0 or method not in (80, 120):
                break
            tag = int.from_bytes(data_in[pos + 11 : pos + 19], "big")
            bits = data_in[pos + 19]
            pos += 21
            self.frames_received += 1
            self.bytes_received += 21
            on_confirm(tag, bool(bits & 1), method == 80)
        if pos < end:
            super()._on_data_available(data_in[pos:] if pos else data_in)


def _call(
    waiters: set[asyncio.Future[Any]],
    method: Callable[..., object],
    *args: object,
    callback_name: str = "callback",
    **kwargs: object,
) -> asyncio.Future[Any]:
    """Start the pika RPC ``method(*args, **kwargs)`` with a completion callback; the returned
    future gets what pika hands that callback (the reply frame, or the new channel).
    ``waiters`` holds the future until it is done so that a closing channel can fail it."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    waiters.add(future)

    def done(reply: object = None) -> None:
        if not future.done():
            future.set_result(reply)

    future.add_done_callback(waiters.discard)
    method(*args, **{callback_name: done}, **kwargs)
    return future


def _fail(waiters: set[asyncio.Future[Any]], reason: object) -> None:
    for future in list(waiters):
        if not future.done():
            future.set_exception(_ChannelGone(str(reason)))
    waiters.clear()


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
    ) -> None:
        super().__init__()
        self.url = url
        self.group = group
        self.shard_ids = tuple(shard_ids)
        self.persistent = persistent
        self.prefetch = prefetch
        self.limit = buffer
        self.low_water = buffer // 2
        self.connect_wait = connect_wait
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.shutdown_wait = shutdown_wait
        self.builder = FrameBuilder(
            exchange=group,
            expiration_ms=max(0, round(message_timeout * 1000)),
            persistent=persistent,
            fmt=fmt,
        )
        self.tracker = ConfirmTracker(self._confirm_shard)
        self.paused = False
        self.blocked = False
        self.reconnects = 0
        self.published = 0
        #: Times the buffer filled up and the shards were asked to stop reading.
        self.pauses = 0
        self._pause_noted = -1e9
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: _Connection | None = None
        self._pub: Any = None
        self._sub: Any = None
        self._fwd: Any = None
        self._ready = False
        self._closing = False
        self._ever_ready = False
        self._first_ready: asyncio.Future[None] | None = None
        self._conn_closed: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Future[Any]] = set()
        self._fwd_waiters: set[asyncio.Future[Any]] = set()
        self._declared: set[int] = set()
        self._declaring: dict[int, list[_Msg]] = {}
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
        )

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
        if tracker.pending and self._ready and not self.blocked:
            chunks = tracker.take_pending()
            conn = self._conn
            assert conn is not None
            data = b"".join(chunks)
            self.published += len(chunks)
            conn.bytes_sent += len(data)
            conn.frames_sent += 3 * len(chunks)
            conn._adapter_emit_data(data)
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
                    "connected" if self._ready and not self.blocked else "RabbitMQ unavailable",
                    self.pauses,
                )
            metrics.broker_buffered.set(tracker.unconfirmed)
            self._flow(True)

    def forward(self, shard_id: int, packet: bytes, ack: Callable[[], None]) -> bool:
        if self._closing:
            return False
        route = f"{self.group}:{shard_id}"
        frames = self.builder.command(route, packet)
        declared = shard_id in self._declared
        msg = self.tracker.add(FORWARD, None, "", route, frames, ack=ack, waiting=declared)
        if not declared:
            # Held back until its queue exists (its owner may never have started yet).
            waiting = self._declaring.setdefault(shard_id, [])
            waiting.append(msg)
            if len(waiting) == 1 and self._ready:
                asyncio.get_running_loop().create_task(self._declare_forward(shard_id))
            return True
        self._send()
        return True

    # ------------------------------------------------------------------ confirms

    def _confirm_shard(self, shard_id: int, session: str, seq: int) -> None:
        self._confirmed(shard_id, session, seq)

    def _on_confirm_frame(self, frame: Any) -> None:
        method = frame.method
        self._on_confirm(method.delivery_tag, bool(method.multiple), type(method) is spec.Basic.Ack)

    def _on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
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

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
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

    # ------------------------------------------------------------------ input

    def _consumer(self, shard_id: int | None) -> Callable[..., None]:
        """The message handler of ``<group>:SEND`` (``shard_id`` None) or ``<group>:<shard>``."""
        queue = f"{self.group}:{'SEND' if shard_id is None else shard_id}"

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            ack = self._acker(ch, method.delivery_tag)
            if len(body) > MAX_COMMAND_BODY:
                log.warning(
                    "rejected a command: too_large: a body of %d bytes in %s", len(body), queue
                )
                metrics.input_dropped.labels(self.name, "too_large").inc()
                ack()
                return
            self._command(body, ack, shard_id)
            self._wake()

        return on_message

    def _acker(self, channel: Any, tag: int) -> Callable[[], None]:
        done = False

        def ack() -> None:
            nonlocal done
            if done:
                return
            done = True
            if channel is self._sub and channel.is_open:
                channel.basic_ack(tag)

        return ack

    # ------------------------------------------------------------------ connection

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        if not log.isEnabledFor(logging.DEBUG):
            # pika logs every lost connection at ERROR with a traceback; we log it once, here.
            logging.getLogger("pika").setLevel(logging.CRITICAL)
        self._first_ready = loop.create_future()
        self._task = loop.create_task(self._run(), name="amqp-connection")
        self._metrics_task = loop.create_task(self._metrics_loop(), name="amqp-metrics")
        try:
            await asyncio.wait_for(asyncio.shield(self._first_ready), self.connect_wait)
        except TimeoutError:
            log.warning(
                "RabbitMQ at %s is not reachable yet; events wait in the buffer until it is",
                redact_url(self.url),
            )

    def _stopping(self) -> bool:
        return self._closing

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            if attempt:
                delay = backoff_delay(
                    attempt, random.random(), base=self.reconnect_base, cap=self.reconnect_cap
                )
                await asyncio.sleep(delay)
                if self._stopping():
                    return
            try:
                closed = await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                log.warning(
                    "cannot connect to RabbitMQ at %s (attempt %d): %s",
                    redact_url(self.url),
                    attempt,
                    _describe(exc),
                )
                self._abandon()
                continue
            attempt = 1
            await closed

    async def _connect(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[_Connection] = loop.create_future()
        closed: asyncio.Future[None] = loop.create_future()
        self._conn_closed = closed
        params = pika.URLParameters(self.url)

        def on_open(conn: _Connection) -> None:
            if not opened.done():
                opened.set_result(conn)

        def on_open_error(conn: _Connection, exc: BaseException) -> None:
            if not opened.done():
                opened.set_exception(_ChannelGone(_describe(exc)))
            if not closed.done():
                closed.set_result(None)

        def on_close(conn: _Connection, reason: BaseException) -> None:
            if conn is self._conn:
                self._lost(reason)
            if not closed.done():
                closed.set_result(None)

        conn = _Connection(
            params,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=on_close,
            custom_ioloop=loop,
        )
        self._conn = conn
        await opened
        conn.add_on_connection_blocked_callback(self._on_blocked)
        conn.add_on_connection_unblocked_callback(self._on_unblocked)
        waiters = self._waiters
        pub = await _call(waiters, conn.channel, callback_name="on_open_callback")
        self._pub = pub
        pub.add_on_close_callback(self._on_channel_closed)
        pub.add_on_return_callback(self._on_return)
        await _call(waiters, pub.confirm_delivery, self._on_confirm_frame)
        await _call(
            waiters,
            pub.exchange_declare,
            exchange=self.group,
            exchange_type="direct",
            durable=True,
            auto_delete=False,
            internal=False,
            arguments=None,
        )
        sub = await _call(waiters, conn.channel, callback_name="on_open_callback")
        self._sub = sub
        sub.add_on_close_callback(self._on_channel_closed)
        sub.add_on_cancel_callback(self._on_cancelled)
        await _call(waiters, sub.basic_qos, prefetch_count=self.prefetch)
        queues: list[tuple[str, str, int | None]] = [(f"{self.group}:SEND", "SEND", None)]
        queues += [(f"{self.group}:{i}", str(i), i) for i in self.shard_ids]
        for queue, key, _ in queues:
            await _call(waiters, sub.queue_declare, queue, durable=True)
            await _call(waiters, sub.queue_bind, queue, self.group, routing_key=key)
        for queue, _, shard_id in queues:
            consumer = self._consumer(shard_id)
            await _call(waiters, sub.basic_consume, queue, consumer, auto_ack=False)
        self._online(conn, pub)
        return closed

    def _online(self, conn: _Connection, pub: Any) -> None:
        frame_max = int(getattr(conn.params, "frame_max", DEFAULT_FRAME_MAX) or DEFAULT_FRAME_MAX)
        if self.builder.signature != (pub.channel_number, frame_max):
            self._rebuild(pub.channel_number, frame_max)
        conn.fast_channel = pub.channel_number
        conn.on_confirm = self._on_confirm
        tracker = self.tracker
        waiting = len(tracker.pending) + len(tracker.nacked)
        self._ready = True
        self.connected = True
        metrics.broker_connected.set(1)
        if self._ever_ready:
            self.reconnects += 1
            metrics.broker_reconnects.labels(self.name).inc()
            log.info(
                "reconnected to RabbitMQ; publishing %d events that were not confirmed", waiting
            )
        else:
            log.info("connected to RabbitMQ at %s, exchange %r", redact_url(self.url), self.group)
        self._ever_ready = True
        if self._first_ready is not None and not self._first_ready.done():
            self._first_ready.set_result(None)
        self.tracker.retry()
        for shard_id in list(self._declaring):
            asyncio.get_running_loop().create_task(self._declare_forward(shard_id))
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
        )
        msgs = self.tracker.unsettled()
        msgs += [msg for waiting in self._declaring.values() for msg in waiting]
        for msg in msgs:
            if msg.shard == FORWARD:
                msg.frames = self.builder.command(msg.route, message_body(msg.frames))
            else:
                data = old.event_data(msg.frames)
                msg.frames = self.builder.event(msg.route, msg.shard, msg.seq, msg.session, data)

    def _lost(self, reason: object) -> None:
        was_ready = self._ready
        self._ready = False
        self.connected = False
        self.blocked = False
        self._conn = None
        self._pub = self._sub = self._fwd = None
        self._declared.clear()
        metrics.broker_connected.set(0)
        _fail(self._waiters, reason)
        _fail(self._fwd_waiters, reason)
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        out = self.tracker.reset()
        if was_ready and not self._closing:
            log.warning(
                "lost the connection to RabbitMQ (%s); %d events wait for the next one "
                "(%d were not confirmed)",
                _describe(reason),
                self.tracker.unconfirmed,
                out,
            )

    def _abandon(self) -> None:
        conn = self._conn
        if conn is not None and not conn.is_closed and not conn.is_closing:
            with contextlib.suppress(Exception):
                conn.close()
        if conn is not None and self._ready is False:
            self._lost("setup failed")

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel not in (self._pub, self._sub):
            return
        _fail(self._waiters, reason)
        conn = self._conn
        if self._closing or conn is None or not conn.is_open:
            return  # the connection is going: its own callback reports it
        if self._ready:  # during set-up, the connect loop reports the failure
            log.warning(
                "RabbitMQ closed channel %s: %s; reconnecting",
                channel.channel_number,
                _describe(reason),
            )
        conn.close(200, "a channel was closed; reconnecting")

    def _on_cancelled(self, frame: Any) -> None:
        if self._closing:
            return
        log.warning("RabbitMQ cancelled our command consumer (queue deleted?); reconnecting")
        conn = self._conn
        if conn is not None and conn.is_open:
            conn.close(200, "consumer cancelled; reconnecting")

    def _on_blocked(self, conn: Any, frame: Any) -> None:
        self.blocked = True
        reason = getattr(frame.method, "reason", "")
        log.warning("RabbitMQ blocked publishing (%s): events wait in the buffer", reason)

    def _on_unblocked(self, conn: Any, frame: Any) -> None:
        self.blocked = False
        log.info("RabbitMQ unblocked publishing")
        self._send()

    async def _declare_forward(self, shard_id: int) -> None:
        """Declare and bind ``<group>:<shard>`` on a channel of its own (a refusal closes only
        that channel), then release the commands waiting for it."""
        queue = f"{self.group}:{shard_id}"
        conn = self._conn
        try:
            if conn is None or not self._ready:
                return
            if self._fwd is None or not self._fwd.is_open:
                fwd = await _call(self._fwd_waiters, conn.channel, callback_name="on_open_callback")
                fwd.add_on_close_callback(self._on_forward_channel_closed)
                self._fwd = fwd
            fwd = self._fwd
            await _call(self._fwd_waiters, fwd.queue_declare, queue, durable=True)
            await _call(
                self._fwd_waiters, fwd.queue_bind, queue, self.group, routing_key=str(shard_id)
            )
        except _ChannelGone as exc:
            if self._conn is conn and conn is not None and conn.is_open:
                # The queue cannot be declared as we need it: drop these commands, loudly.
                for msg in self._declaring.pop(shard_id, []):
                    log.warning(
                        "rejected a command for shard %d: cannot declare %s (%s)",
                        shard_id,
                        queue,
                        exc,
                    )
                    metrics.input_dropped.labels(self.name, "forward_failed").inc()
                    self.tracker.unconfirmed -= 1
                    if msg.ack is not None:
                        msg.ack()
                self._maybe_resume()
                self._wake()
            return  # connection lost: _online declares again
        if self._conn is not conn:
            return
        self._declared.add(shard_id)
        waiting = self._declaring.pop(shard_id, [])
        self.tracker.pending.extend(waiting)
        self._send()

    def _on_forward_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is self._fwd:
            self._fwd = None
        _fail(self._fwd_waiters, reason)

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        tracker = self.tracker
        metrics.broker_buffered.set(tracker.unconfirmed)
        # events_published / events_confirmed are counted by the worker for every broker.

    async def aclose(self) -> None:
        self._send()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_wait
        # Wait for the last confirmations: they advance the sessions' confirmed seqs.
        while self.tracker.unconfirmed and self._ready and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._closing = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        conn = self._conn
        closed = self._conn_closed
        if conn is not None and not conn.is_closed and not conn.is_closing:
            with contextlib.suppress(Exception):
                conn.close()
        if closed is not None and conn is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), 2.0)
            if not closed.done():  # no answer to connection.close: drop the socket
                with contextlib.suppress(Exception):
                    conn._terminate_stream(ConnectionError("no reply to connection.close"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(closed), 1.0)
        for task in (self._task, self._metrics_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.tracker.unconfirmed:
            log.warning(
                "stopping with %d events not confirmed by RabbitMQ: they are replayed on resume",
                self.tracker.unconfirmed,
            )
        self._flush_metrics()
        self._ready = False
        self.connected = False
        metrics.broker_connected.set(0)


def _describe(reason: object) -> str:
    """A short, password-free description of a pika error or close reason."""
    text = (
        f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    )
    return redact_url(text) if "://" in text else text
