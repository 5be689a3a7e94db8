"""The thin asyncio layer around :class:`~spectacles_gateway.protocol.shard.ShardProtocol`.

Each connection is an :class:`asyncio.Protocol` that feeds ``websockets``' sans-I/O client
straight from ``data_received`` (no per-message task, queue or future: the library's own asyncio
connection costs as much per message as the rest of our pipeline), decompresses with a context
that lives exactly as long as the connection, hands every message to the shard core, and then
carries out the core's events in one loop (:meth:`GatewayConnection.pump`). The
:class:`~.runner.ShardRunner` owns the reconnect loop around it.

What flows up to the worker (:class:`EventHandler`): dispatches, one "end of batch" per read, and
the core's other events (notices, commands sent or dropped). What the worker asks of a runner
goes down through its methods (:meth:`ShardRunner.confirm`, :meth:`~ShardRunner.send`,
:meth:`~ShardRunner.stats`, ...); nothing outside reaches into the core.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, cast

from websockets.client import ClientProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.uri import parse_uri

from .compression import DecompressError, Decompressor, MessageTooLarge
from .protocol.events import (
    CloseRequest,
    Dispatch,
    Event,
    IdentifySent,
    SendData,
)

if TYPE_CHECKING:
    from .runner import ShardRunner

__all__ = ["EventHandler", "GatewayConnection", "IdentifyGateLike"]

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
