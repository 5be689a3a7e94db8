"""The AMQP broker's connection to RabbitMQ: connect, declare, reconnect, blocked, close.

Where pika runs: on the worker's own event loop (uvloop in production), through
:class:`~.amqp_pika.PikaConnection`. A dedicated pika thread (a ``SelectConnection`` fed through
a deque and ``add_callback_threadsafe``, confirms handed back with ``call_soon_threadsafe``) was
measured against it with the same frames and bookkeeping (``benchmarks/bench_amqp.py
--placement``): 6.5 against 5.1–5.3 µs of CPU per message, at the same rate (RabbitMQ is the
bottleneck at 40–50k msg/s). The GIL serialises the two threads anyway, so the thread only adds
the hand-off and its wake-ups to the same Python work.

Set-up on every connection, in order: the publish channel (confirm mode, returns), the exchange
``<group>`` (``direct``, durable, not auto-delete, not internal, no arguments: what
``@spectacles/brokers`` (amqplib's ``assertExchange(group, "direct")``) and the Go libraries
declare, so either side may declare it first), the command channel (prefetch), then each command
queue, durable, bound to the exchange and consumed with manual acks. Then the handler hears
:meth:`LinkHandler.link_up`.

Outages: when the connection is lost (RabbitMQ restarted, network, a channel error, a consumer
cancelled because its queue was deleted) the handler hears :meth:`LinkHandler.link_down` and the
link reconnects with backoff (``backoff_delay``: 0.25–0.5 s, doubling up to 10 s) and sets
everything up again; a bug of ours that ends that connect loop is logged and the loop started
again a second later. Connection blocked by RabbitMQ (memory or disk alarm): :attr:`AmqpLink.
blocked` until it is unblocked (:meth:`LinkHandler.on_unblocked`).

pika's own logger is raised to CRITICAL at :meth:`AmqpLink.start` unless this package logs at
DEBUG: it logs every lost connection at ERROR with a traceback, which we report once ourselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pika

from ..protocol.backoff import backoff_delay
from ..redact import redact_url
from .amqp_frames import DEFAULT_FRAME_MAX
from .amqp_pika import OnConfirm, PikaConnection

__all__ = [
    "AmqpLink",
    "ChannelGone",
    "CommandQueue",
    "LinkHandler",
    "QueueRefused",
    "describe",
]

log = logging.getLogger(__name__)


class ChannelGone(ConnectionError):
    """A channel or the connection closed while we waited for a reply."""


class QueueRefused(ChannelGone):
    """RabbitMQ refused to declare or bind a queue; the connection is still open."""


class LinkHandler(Protocol):
    """What the link tells its owner (the broker)."""

    def link_up(self, conn: PikaConnection, channel: int, frame_max: int) -> None:
        """Set up and ready: ``channel`` is the publish channel's number."""

    def link_down(self, reason: object, was_ready: bool) -> None:
        """The connection is gone (``was_ready``: it had been set up)."""

    def on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        """A ``basic.ack`` (``ok``) or ``basic.nack`` on the publish channel."""

    def on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """A ``basic.return``: a mandatory message no queue was bound for."""

    def on_unblocked(self) -> None:
        """RabbitMQ takes messages again."""


@dataclass(frozen=True, slots=True)
class CommandQueue:
    """A durable queue bound to the exchange with ``routing_key``, consumed by ``on_message``
    (pika's ``(channel, method, properties, body)`` callback)."""

    name: str
    routing_key: str
    on_message: Callable[[Any, Any, Any, bytes], None]


def call(
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


def fail_all(waiters: set[asyncio.Future[Any]], reason: object) -> None:
    for future in list(waiters):
        if not future.done():
            future.set_exception(ChannelGone(str(reason)))
    waiters.clear()


def describe(reason: object) -> str:
    """A short, password-free description of a pika error or close reason."""
    text = (
        f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    )
    return redact_url(text) if "://" in text else text


class AmqpLink:
    """One RabbitMQ connection at a time, set up and kept up for ``handler``."""

    def __init__(
        self,
        url: str,
        *,
        group: str,
        queues: Sequence[CommandQueue],
        handler: LinkHandler,
        prefetch: int = 100,
        reconnect_base: float = 0.5,
        reconnect_cap: float = 10.0,
    ) -> None:
        self.url = url
        self.group = group
        self.queues = list(queues)
        self.handler = handler
        self.prefetch = prefetch
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.conn: PikaConnection | None = None
        #: Open and set up (channels, exchange, queues, consumers).
        self.ready = False
        #: RabbitMQ blocked publishing (a resource alarm).
        self.blocked = False
        #: :meth:`close` began: no reconnecting.
        self.closing = False
        self._pub: Any = None
        self._sub: Any = None
        self._side: Any = None
        self._waiters: set[asyncio.Future[Any]] = set()
        self._side_waiters: set[asyncio.Future[Any]] = set()
        self._first_ready: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._consuming: set[str] = set()  # command queues consumed on this connection
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, wait: float) -> bool:
        """Start connecting (and reconnecting); True once set up within ``wait`` seconds."""
        loop = asyncio.get_running_loop()
        if not log.isEnabledFor(logging.DEBUG):
            # pika logs every lost connection at ERROR with a traceback; we log it once, here.
            logging.getLogger("pika").setLevel(logging.CRITICAL)
        self._first_ready = loop.create_future()
        self._start_task()
        try:
            await asyncio.wait_for(asyncio.shield(self._first_ready), wait)
        except TimeoutError:
            return False
        return True

    @property
    def command_channel(self) -> Any:
        """The channel the command queues are consumed on (None: not connected)."""
        return self._sub

    def owns(self, channel: Any) -> bool:
        """``channel`` is this connection's open command channel (its deliveries can be acked)."""
        return channel is self._sub and bool(channel.is_open)

    async def close(self) -> None:
        """Close the connection (dropping the socket if RabbitMQ does not answer) and stop."""
        self.closing = True
        conn = self.conn
        closed = self._closed
        if conn is not None and not conn.is_closed and not conn.is_closing:
            with contextlib.suppress(Exception):
                conn.close()
        if closed is not None and conn is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), 2.0)
            if not closed.done():  # no answer to connection.close: drop the socket
                with contextlib.suppress(Exception):
                    conn.drop(ConnectionError("no reply to connection.close"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(closed), 1.0)
        task = self._task
        if task is not None and not task.done():  # (a failed one was reported already)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.ready = False

    # ------------------------------------------------------------------ command queues

    async def _consume(self, sub: Any, queue: CommandQueue) -> None:
        """Consume ``queue`` on the command channel, tagged with its name (to cancel it)."""
        if queue.name in self._consuming:
            return
        self._consuming.add(queue.name)
        try:
            await call(
                self._waiters,
                sub.basic_consume,
                queue.name,
                queue.on_message,
                auto_ack=False,
                consumer_tag=queue.name,
            )
        except BaseException:
            self._consuming.discard(queue.name)
            raise

    def add_queue(self, queue: CommandQueue) -> None:
        """Consume one more command queue, now and after every reconnect (fleet: a shard came)."""
        if any(q.name == queue.name for q in self.queues):
            return
        self.queues.append(queue)
        if self.ready and self._sub is not None:
            sub = self._sub

            async def setup() -> None:
                try:
                    await call(self._waiters, sub.queue_declare, queue.name, durable=True)
                    await call(
                        self._waiters,
                        sub.queue_bind,
                        queue.name,
                        self.group,
                        routing_key=queue.routing_key,
                    )
                    if queue in self.queues and self._sub is sub:
                        await self._consume(sub, queue)
                except ChannelGone:
                    return  # the connection went: its set-up consumes the queue again

            self._spawn(setup())

    def remove_queue(self, name: str) -> None:
        """Stop consuming ``name`` (fleet: the shard went elsewhere); what was delivered and
        not acked goes back to the queue when the channel closes."""
        self.queues = [q for q in self.queues if q.name != name]
        if name in self._consuming:
            self._consuming.discard(name)
            sub = self._sub
            if sub is not None and sub.is_open:
                with contextlib.suppress(Exception):
                    sub.basic_cancel(consumer_tag=name)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ side channel

    async def declare_queue(self, queue: str, routing_key: str) -> None:
        """Declare ``queue`` (durable) and bind it with ``routing_key``, on a channel of its own
        so that a refusal closes only that channel. Raises :class:`QueueRefused` when RabbitMQ
        refuses, :class:`ChannelGone` when the connection is not (or no longer) set up."""
        conn = self.conn
        if conn is None or not self.ready:
            raise ChannelGone("not connected")
        waiters = self._side_waiters
        try:
            if self._side is None or not self._side.is_open:
                side = await call(waiters, conn.channel, callback_name="on_open_callback")
                side.add_on_close_callback(self._on_side_closed)
                self._side = side
            await call(waiters, self._side.queue_declare, queue, durable=True)
            await call(waiters, self._side.queue_bind, queue, self.group, routing_key=routing_key)
        except ChannelGone as exc:
            if self.conn is conn and conn.is_open:
                raise QueueRefused(str(exc)) from None
            raise
        if self.conn is not conn:
            raise ChannelGone("the connection changed")

    def _on_side_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is self._side:
            self._side = None
        fail_all(self._side_waiters, reason)

    # ------------------------------------------------------------------ lifecycle

    def _start_task(self) -> None:
        if self.closing:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="amqp-connection")
        self._task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """The connect loop ends only at :meth:`close`; if a bug of ours ends it sooner, say so
        and start it again (a second later), so that the broker reconnects."""
        if self.closing or task.cancelled():
            return
        error = task.exception()
        log.error(
            "the RabbitMQ connection task failed (%s); starting it again",
            describe(error),
            exc_info=error,
        )
        asyncio.get_running_loop().call_later(1.0, self._start_task)
        try:
            self._abandon()
        except Exception:
            log.exception("cannot drop the RabbitMQ connection that was being set up")

    def _closing_now(self) -> bool:
        return self.closing  # (a method: mypy would take the loop's check for still true)

    async def _run(self) -> None:
        attempt = 0
        while not self.closing:
            if attempt:
                delay = backoff_delay(
                    attempt, random.random(), base=self.reconnect_base, cap=self.reconnect_cap
                )
                await asyncio.sleep(delay)
                if self._closing_now():
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
                    describe(exc),
                )
                self._abandon()
                continue
            attempt = 1
            await closed

    async def _connect(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[PikaConnection] = loop.create_future()
        closed: asyncio.Future[None] = loop.create_future()
        self._closed = closed

        def on_open(conn: PikaConnection) -> None:
            if not opened.done():
                opened.set_result(conn)

        def on_open_error(conn: PikaConnection, exc: BaseException) -> None:
            if not opened.done():
                opened.set_exception(ChannelGone(describe(exc)))
            if not closed.done():
                closed.set_result(None)

        def on_close(conn: PikaConnection, reason: BaseException) -> None:
            try:
                if conn is self.conn:
                    self._lost(reason)
            finally:  # whatever happens, the connect loop goes on
                if not closed.done():
                    closed.set_result(None)

        conn = PikaConnection(
            pika.URLParameters(self.url),
            loop=loop,
            on_open=on_open,
            on_open_error=on_open_error,
            on_close=on_close,
        )
        self.conn = conn
        await opened
        conn.add_on_connection_blocked_callback(self._on_blocked)
        conn.add_on_connection_unblocked_callback(self._on_unblocked)
        handler = self.handler
        waiters = self._waiters
        pub = await call(waiters, conn.channel, callback_name="on_open_callback")
        self._pub = pub
        pub.add_on_close_callback(self._on_channel_closed)
        pub.add_on_return_callback(handler.on_return)
        await call(waiters, pub.confirm_delivery, _slow_confirms(handler.on_confirm))
        await call(
            waiters,
            pub.exchange_declare,
            exchange=self.group,
            exchange_type="direct",
            durable=True,
            auto_delete=False,
            internal=False,
            arguments=None,
        )
        sub = await call(waiters, conn.channel, callback_name="on_open_callback")
        self._sub = sub
        sub.add_on_close_callback(self._on_channel_closed)
        sub.add_on_cancel_callback(self._on_cancelled)
        await call(waiters, sub.basic_qos, prefetch_count=self.prefetch)
        for queue in list(self.queues):
            await call(waiters, sub.queue_declare, queue.name, durable=True)
            await call(
                waiters, sub.queue_bind, queue.name, self.group, routing_key=queue.routing_key
            )
        for queue in list(self.queues):
            await self._consume(sub, queue)
        conn.route_confirms(pub.channel_number, handler.on_confirm)
        self.ready = True
        handler.link_up(conn, pub.channel_number, _frame_max(conn))
        if self._first_ready is not None and not self._first_ready.done():
            self._first_ready.set_result(None)
        return closed

    def _lost(self, reason: object) -> None:
        was_ready = self.ready
        self.ready = False
        self._consuming.clear()
        self.blocked = False
        self.conn = None
        self._pub = self._sub = self._side = None
        fail_all(self._waiters, reason)
        fail_all(self._side_waiters, reason)
        self.handler.link_down(reason, was_ready)

    def _abandon(self) -> None:
        conn = self.conn
        if conn is not None and not conn.is_closed and not conn.is_closing:
            with contextlib.suppress(Exception):
                conn.close()
        if conn is not None and self.ready is False:
            self._lost("setup failed")

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel not in (self._pub, self._sub):
            return
        fail_all(self._waiters, reason)
        conn = self.conn
        if self.closing or conn is None or not conn.is_open:
            return  # the connection is going: its own callback reports it
        if self.ready:  # during set-up, the connect loop reports the failure
            log.warning(
                "RabbitMQ closed channel %s: %s; reconnecting",
                channel.channel_number,
                describe(reason),
            )
        conn.close(200, "a channel was closed; reconnecting")

    def _on_cancelled(self, frame: Any) -> None:
        if self.closing:
            return
        log.warning("RabbitMQ cancelled our command consumer (queue deleted?); reconnecting")
        conn = self.conn
        if conn is not None and conn.is_open:
            conn.close(200, "consumer cancelled; reconnecting")

    def _on_blocked(self, conn: Any, frame: Any) -> None:
        self.blocked = True
        reason = getattr(frame.method, "reason", "")
        log.warning("RabbitMQ blocked publishing (%s): events wait in the buffer", reason)

    def _on_unblocked(self, conn: Any, frame: Any) -> None:
        self.blocked = False
        log.info("RabbitMQ unblocked publishing")
        self.handler.on_unblocked()


def _slow_confirms(confirmed: OnConfirm) -> Callable[[Any], None]:
    """pika's confirm callback (for the confirms that do not take the fast path)."""
    ack = pika.spec.Basic.Ack

    def on_confirm_frame(frame: Any) -> None:
        method = frame.method
        confirmed(method.delivery_tag, bool(method.multiple), type(method) is ack)

    return on_confirm_frame


def _frame_max(conn: PikaConnection) -> int:
    """The negotiated frame size (pika keeps it in the connection's parameters)."""
    return int(getattr(conn.params, "frame_max", DEFAULT_FRAME_MAX) or DEFAULT_FRAME_MAX)
