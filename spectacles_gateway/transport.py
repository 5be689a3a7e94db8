"""The thin asyncio layer around :class:`~spectacles_gateway.protocol.shard.ShardProtocol`.

Each connection is an :class:`asyncio.Protocol` that feeds ``websockets``' sans-I/O client
straight from ``data_received`` (no per-message task, queue or future: the library's own asyncio
connection costs as much per message as the rest of our pipeline), decompresses with a context
that lives exactly as long as the connection, hands every message to the shard core, and then
carries out the core's events in one loop (:meth:`GatewayConnection.pump`). The
:class:`ShardRunner` owns the reconnect loop: it asks the core where and when to connect, takes
the identify gate when the connection will identify, and reports how each connection ended.

What flows up to the worker (:class:`EventHandler`): dispatches, one "end of batch" per read, and
the core's other events (notices, commands sent or dropped). What the worker asks of a runner
goes down through its methods (:meth:`ShardRunner.confirm`, :meth:`~ShardRunner.send`,
:meth:`~ShardRunner.stats`, ...); nothing outside reaches into the core.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidURI, PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.uri import parse_uri

from .compression import DecompressError, Decompressor, MessageTooLarge, make_decompressor
from .plan import DEFAULT_MAX_MESSAGE
from .protocol.closecodes import CloseAction, describe_close
from .protocol.events import (
    CloseRequest,
    Dispatch,
    Event,
    IdentifySent,
    SendData,
    ShardStats,
)
from .protocol.shard import Phase, ShardConfig, ShardProtocol

if TYPE_CHECKING:
    from .protocol.shard import Session

__all__ = ["EventHandler", "GatewayConnection", "IdentifyGateLike", "ShardRunner"]

log = logging.getLogger(__name__)

WsEvent = Request | Response | Frame

_OP_TEXT = Opcode.TEXT
_OP_BINARY = Opcode.BINARY
_OPEN = State.OPEN
#: How long we wait for the server's half of a closing handshake before dropping TCP.
CLOSE_TIMEOUT = 2.0
USER_AGENT = "DiscordBot (https://github.com/spec-tacles, 0.1) spectacles-gateway"


class EventHandler(Protocol):
    """Where a runner delivers what its shard produced (the worker implements it)."""

    def publish(self, shard_id: int, dispatch: Dispatch) -> None:
        """A dispatch that passed the filter."""

    def end_of_batch(self, shard_id: int) -> None:
        """All messages of one read (or of one timer) were handed over: a good moment to flush
        buffers; the shard's state may have changed."""

    def shard_event(self, runner: ShardRunner, event: Event) -> None:
        """Any other event of the core: a notice, commands sent or dropped."""

    def lease_expired(self, runner: ShardRunner) -> None:
        """Fleet: the shard's lease deadline passed; it publishes nothing more and closes."""


class IdentifyGateLike(Protocol):
    async def acquire(self, shard_id: int) -> object: ...

    def release(self, permit: object, sent_at: float | None) -> None: ...


class GatewayConnection(asyncio.Protocol):
    """One websocket connection of one shard."""

    def __init__(
        self, runner: ShardRunner, url: str, decompressor: Decompressor, *, identify: bool
    ) -> None:
        self.runner = runner
        self.identify = identify
        self.core = runner.core
        self.shard_id = runner.shard_id
        self.handler = runner.handler
        self.loop = runner.loop
        # No extensions (no permessage-deflate); websockets bounds every message, fragments
        # included, and fails the connection with 1009 (resumable) beyond it.
        self.ws = ClientProtocol(parse_uri(url), max_size=runner.max_message_size)
        self.request = self.ws.connect()
        self.request.headers["User-Agent"] = USER_AGENT
        self.decompressor = decompressor
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[int | None] = self.loop.create_future()
        self.is_open = False
        self.closing = False
        #: Bytes read but not yet handed on: the start of a frame (or, before the handshake
        #: completed, of the HTTP response). See :meth:`data_received`.
        self._pending = bytearray()
        #: Whole frames are split here (False: everything goes through websockets' parser,
        #: which then owns the stream for good).
        self._split = True
        self._max_size = runner.max_message_size
        self._fragments: bytearray | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.runner.paused:
            self.transport.pause_reading()
        self.ws.send_request(self.request)
        self._write_ws()

    def data_received(self, data: bytes) -> None:
        """Hand what was read to the core, then :meth:`pump`.

        The common case costs few calls: while the connection is open, whole unfragmented
        data frames are split here and their payloads go straight to the decompressor; any
        other frame (ping, close, a fragment, reserved bits, a masked frame) is handed whole to
        websockets' parser, which answers it and keeps its checks. Every byte websockets
        sees starts at a frame boundary, so its parser and ours never disagree. Before the
        handshake completed, websockets is given exactly the HTTP response; a frame larger than
        the message limit, or any state but open, gives the rest of the stream to websockets
        for good."""
        try:
            if self._split:
                self._split_frames(data)
            else:
                self._receive(data)
            ws = self.ws
            if not self.closing and isinstance(ws.parser_exc, PayloadTooBig):
                self.closing = True  # websockets already failed the connection with 1009
                self.core.message_failed(f"gateway message too large: {ws.parser_exc}")
            self.pump()
        except Exception as exc:  # a bug of ours: never let it kill the loop or spin
            log.exception("shard %d: internal error while handling gateway data", self.shard_id)
            self.core.message_failed(f"internal error: {type(exc).__name__}: {exc}")
            self.pump()

    def _receive(self, data: bytes | bytearray) -> None:
        """Through websockets' parser."""
        ws = self.ws
        ws.receive_data(data)
        events = ws.events_received()
        if events:
            if not self.is_open:
                events = self._handshake(events)
            if events:
                self._frames(events)

    def _give_up_splitting(self, buf: bytes | bytearray, pos: int) -> None:
        self._split = False
        self._pending = bytearray()
        if pos < len(buf):
            self._receive(buf[pos:])

    def _split_frames(self, data: bytes) -> None:
        pending = self._pending
        if pending:
            pending += data
            buf: bytes | bytearray = pending
        else:
            buf = data
        if not self.is_open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:  # not an HTTP response we know: websockets says why
                    self._give_up_splitting(buf, 0)
                elif not pending:
                    pending += data
                return
            end += 4
            self._receive(buf[:end])
            if self.ws.state is not _OPEN:  # refused, or a body follows: websockets decides
                self._give_up_splitting(buf, end)
                return
            buf = buf[end:]
            self._pending = pending = bytearray()
        ws = self.ws
        n = len(buf)
        pos = 0
        now = self.loop.time()
        while n - pos >= 2:
            head1 = buf[pos]
            head2 = buf[pos + 1]
            length = head2 & 0x7F
            start = pos + 2
            if length == 126:
                start = pos + 4
                if start > n:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
            elif length == 127:
                start = pos + 10
                if start > n:
                    break
                length = int.from_bytes(buf[pos + 2 : start], "big")
            if length > self._max_size or head2 & 0x80:
                self._give_up_splitting(buf, pos)  # websockets fails the connection
                return
            end = start + length
            if end > n:
                break
            opcode = head1 & 0x0F
            if head1 & 0xF0 == 0x80 and 0 < opcode < 3 and ws.current_size is None:
                # FIN, no reserved bits, a whole text or binary message: the common case.
                self._message(bytes(buf[start:end]) if pending else buf[start:end], now)
            else:
                self._receive(buf[pos:end])
                if ws.state is not _OPEN:
                    self._give_up_splitting(buf, end)
                    return
                now = self.loop.time()
            pos = end
        if pending:
            del pending[:pos]
        elif pos < n:
            self._pending = bytearray(buf[pos:] if pos else buf)

    def eof_received(self) -> bool | None:
        if self._pending:
            self._give_up_splitting(self._pending, 0)
        self.ws.receive_eof()
        self._write_ws()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        rcvd = self.ws.close_rcvd
        code = rcvd.code if rcvd is not None else None
        if not self.opened.done():
            self.opened.set_exception(
                ConnectionError(f"connection lost during the handshake: {exc or 'EOF'}")
            )
        if not self.closed.done():
            self.closed.set_result(code)

    # ---------------------------------------------------------------- websocket events

    def _handshake(self, events: list[WsEvent]) -> list[WsEvent]:
        first = events[0]
        if isinstance(first, Response):
            exc = self.ws.handshake_exc
            if exc is not None:
                if not self.opened.done():
                    self.opened.set_exception(exc)
                return []
            self.is_open = True
            # Tell the core before any frame of this read (HELLO often shares the packet).
            self.core.connection_opened(self.loop.time(), identify_permitted=self.identify)
            if not self.opened.done():
                self.opened.set_result(None)
            return events[1:]
        return events

    def _frames(self, events: list[WsEvent]) -> None:
        now = self.loop.time()
        for frame in events:
            assert isinstance(frame, Frame)
            opcode = frame.opcode
            if opcode is _OP_BINARY or opcode is _OP_TEXT:
                if frame.fin:
                    self._message(frame.data, now)
                else:
                    self._fragments = bytearray(frame.data)
            elif self._fragments is not None and opcode is Opcode.CONT:
                # websockets bounds the whole message (max_size), so this buffer is bounded.
                self._fragments += frame.data
                if frame.fin:
                    data = bytes(self._fragments)
                    self._fragments = None
                    self._message(data, now)
            # Ping, pong and close frames are answered by the websockets protocol itself.

    def _message(self, data: bytes | bytearray | memoryview, now: float) -> None:
        if self.closing:
            return  # the connection is being dropped: what follows will be replayed on resume
        try:
            payload = self.decompressor.feed(bytes(data) if type(data) is not bytes else data)
        except MessageTooLarge as exc:
            self.core.message_failed(f"gateway message too large: {exc}")
            return
        except DecompressError as exc:
            self.core.message_failed(f"corrupt compressed data from the gateway: {exc}")
            return
        if payload is not None:
            self.core.receive(payload, now)

    # ---------------------------------------------------------------- the core's events

    def pump(self) -> None:
        """Carry out what the core asks for after any input, in order; then set the timer."""
        ws = self.ws
        runner = self.runner
        handler = self.handler
        shard_id = self.shard_id
        lease = runner.lease_until
        if lease is not None and self.loop.time() > lease:
            runner.expire()  # fleet: past the lease, nothing more is published
        expired = runner.expired
        for event in self.core.events_received():
            kind = type(event)  # exact types, not isinstance: this loop runs for every event
            if kind is Dispatch:
                if not expired:
                    handler.publish(shard_id, event)  # type: ignore[arg-type]
            elif kind is SendData:
                if ws.state is _OPEN:
                    ws.send_text(event[0])  # type: ignore[arg-type]
            elif kind is CloseRequest:
                self._close(*event)
            elif kind is IdentifySent:
                runner.identify_sent(event[0])  # type: ignore[arg-type]
            else:
                handler.shard_event(runner, event)
        if ws.writes or self.closing or not self.is_open:
            # (Open, nothing to send: nothing for the close timer either; websockets queues
            # a frame for every change that makes it expect the TCP connection to close.)
            self._write_ws()
        handler.end_of_batch(shard_id)
        deadline = self.core.next_deadline()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = deadline
            if deadline is not None and self.transport is not None:
                self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        # The loop's clock can read a hair before the deadline when its timer fires (timers
        # have millisecond resolution): the deadline has come, or the core would ask again at
        # once, and again, until the clock caught up.
        at = self._timer_at
        self._timer = None
        self._timer_at = None
        now = self.loop.time()
        self.core.tick(now if at is None or now >= at else at)
        self.pump()

    def _write_ws(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()
        if self._close_timer is None and self.ws.close_expected():
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT, self.abort)

    def _close(self, code: int, reason: str) -> None:
        self.closing = True
        if self.ws.state is _OPEN:
            self.ws.send_close(code, reason)
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake."""
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


_FATAL_HINTS = {
    4004: "the bot token is invalid or was reset",
    4010: "a shard id is not below the shard count",
    4011: "this bot needs more shards (raise the shard count or use 0 to ask Discord)",
    4012: "the gateway version is not supported",
    4013: "the intents contain an invalid bit",
    4014: "a privileged intent is not enabled for this bot in the developer portal",
}


def _ssl_context(url: str) -> ssl.SSLContext | None:
    if urlsplit(url).scheme == "wss":
        return ssl.create_default_context()
    return None


class ShardRunner:
    """Keeps one shard connected: the reconnect loop around the core."""

    def __init__(
        self,
        config: ShardConfig,
        handler: EventHandler,
        gate: IdentifyGateLike,
        *,
        session: Session | None = None,
        open_timeout: float = 10.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
        loop: asyncio.AbstractEventLoop | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.core = ShardProtocol(config, rand=rand, session=session)
        self.shard_id = config.shard_id
        self.handler = handler
        self.gate = gate
        self.open_timeout = open_timeout
        self.max_message_size = max_message_size
        self.loop = loop or asyncio.get_running_loop()
        self.connection: GatewayConnection | None = None
        self.paused = False
        self.task: asyncio.Task[int | None] | None = None
        self._permit: object | None = None
        self._stopping = False
        self.connects = 0
        #: Fleet: publish nothing after this time (the loop's clock); None: no lease.
        self.lease_until: float | None = None
        self.expired = False

    # ---------------------------------------------------------------- what the worker asks

    def start(self) -> asyncio.Task[int | None]:
        self.task = self.loop.create_task(self.run(), name=f"shard-{self.shard_id}")
        return self.task

    def stop(self, *, keep_session: bool) -> None:
        """Close the shard: 1000 unless ``keep_session``; :attr:`task` ends when it is closed."""
        if self._stopping:
            return
        self._stopping = True
        self.core.stop(keep_session=keep_session)
        conn = self.connection
        if conn is not None and not conn.closed.done():
            conn.pump()
        else:
            self._report()
            if self.task is not None and not self.task.done():
                self.task.cancel()

    def send(self, payload: bytes, ticket: object = None) -> None:
        """Queue a command (raises CommandRejected when it can never be sent)."""
        self.core.queue_command(payload, self.loop.time(), ticket)
        conn = self.connection
        if conn is not None:
            conn.pump()
        else:
            self._report()

    def confirm(self, session_id: str, seq: int) -> None:
        """The broker has every dispatch of ``session_id`` up to ``seq``."""
        self.core.confirm(seq, session_id)

    def stats(self) -> ShardStats:
        return self.core.stats()

    def session(self) -> Session | None:
        return self.core.session()

    def expire(self) -> None:
        """The lease deadline passed: drop what arrives, close resumably (the next owner
        resumes), and tell the worker. Called by :meth:`GatewayConnection.pump`, which then
        carries out the close."""
        if self.expired:
            return
        self.expired = True
        self._stopping = True
        self.core.stop(keep_session=True)
        self.handler.lease_expired(self)

    def check_lease(self, now: float) -> None:
        """Close the shard if its lease deadline has passed (for shards that are quiet: a
        busy one notices at its next read)."""
        if self.expired or self.lease_until is None or now <= self.lease_until:
            return
        conn = self.connection
        if conn is not None and not conn.closed.done():
            conn.pump()
        else:
            self.expire()
            self._report()
            if self.task is not None and not self.task.done():
                self.task.cancel()

    def identify_sent(self, sent_at: float) -> None:
        permit, self._permit = self._permit, None
        if permit is not None:
            self.gate.release(permit, sent_at)

    def pause_reading(self) -> None:
        self.paused = True
        if self.connection is not None:
            self.connection.pause_reading()

    def resume_reading(self) -> None:
        self.paused = False
        if self.connection is not None:
            self.connection.resume_reading()

    @property
    def ready(self) -> bool:
        return self.core.phase is Phase.READY

    # ---------------------------------------------------------------- the loop

    async def run(self) -> int | None:
        """Connect, reconnect, until stopped (returns None) or a fatal close (returns its code)."""
        core = self.core
        loop = self.loop
        try:
            while True:
                plan = core.plan_connect(loop.time())
                if plan is None:
                    break
                delay = plan.at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if plan.identify:
                    self._permit = await self.gate.acquire(self.shard_id)
                try:
                    await self._connect_once(plan.url, plan.identify)
                finally:
                    permit, self._permit = self._permit, None
                    if permit is not None:
                        self.gate.release(permit, None)
                if core.phase is Phase.STOPPED:
                    break
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            conn = self.connection
            if conn is not None:
                conn.abort()
        return core.fatal_code

    async def _connect_once(self, url: str, identify: bool) -> None:
        core = self.core
        loop = self.loop
        try:
            conn = GatewayConnection(
                self,
                url,
                make_decompressor(core.config.compress, self.max_message_size),
                identify=identify,
            )
        except InvalidURI as exc:
            core.connect_failed(loop.time(), f"invalid gateway URL: {exc}")
            self._report()
            return
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        self.connects += 1
        try:
            async with asyncio.timeout(self.open_timeout):
                await loop.create_connection(
                    lambda: conn,
                    parts.hostname or "",
                    port,
                    ssl=_ssl_context(url),
                )
                await conn.opened
        except (OSError, TimeoutError, InvalidHandshake, ConnectionError) as exc:
            conn.abort()
            core.connect_failed(loop.time(), f"{type(exc).__name__}: {exc}")
            self._report()
            return
        self.connection = conn
        conn.pump()
        try:
            code = await conn.closed
        finally:
            self.connection = None
        action = core.connection_closed(loop.time(), code)
        self._report()
        if action is CloseAction.FATAL:
            log.error(
                "shard %d: Discord refused the session for good (%s): %s; not reconnecting",
                self.shard_id,
                describe_close(code),
                _FATAL_HINTS.get(code or 0, "check the configuration"),
            )

    def _report(self) -> None:
        """The core's events while no connection is open: only notices and command tickets
        can be among them (nothing to send, nothing to close)."""
        handler = self.handler
        for event in self.core.events_received():
            if type(event) not in (SendData, CloseRequest, IdentifySent):
                handler.shard_event(self, event)
        handler.end_of_batch(self.shard_id)  # the shard's state changed (closed, failed, ...)
