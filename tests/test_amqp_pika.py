"""The pika behaviour the AMQP broker relies on, pinned in one place.

:class:`~spectacles_gateway.brokers.amqp_pika.PikaConnection` is the only code that touches
pika's private API. Each test here names one thing it relies on and checks it against the
installed pika (and, where it matters, a real RabbitMQ), so that a pika upgrade that changes one
of them fails here, by name, rather than as lost confirms or a silent stall somewhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pika
import pytest
from pika import frame, spec
from pika.adapters.asyncio_connection import AsyncioConnection

from spectacles_gateway.brokers.amqp_frames import FrameBuilder
from spectacles_gateway.brokers.amqp_link import call
from spectacles_gateway.brokers.amqp_pika import CONFIRM_FRAME_SIZE, PikaConnection

from .gwtest import t
from .support.brokers import AMQP_URL

ACK = frame.Method(1, spec.Basic.Ack(delivery_tag=5, multiple=True)).marshal()
NACK = frame.Method(1, spec.Basic.Nack(delivery_tag=6, multiple=False)).marshal()
HEARTBEAT = frame.Heartbeat().marshal()


class Recording(PikaConnection):
    """Records every read pika's transport hands to ``_on_data_available``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reads: list[bytes] = []
        super().__init__(*args, **kwargs)

    def _on_data_available(self, data_in: bytes) -> None:
        self.reads.append(bytes(data_in))
        super()._on_data_available(data_in)


@contextlib.asynccontextmanager
async def connection(
    cls: type[PikaConnection] = PikaConnection,
) -> AsyncIterator[tuple[Any, asyncio.Future[BaseException]]]:
    """An open connection to the real RabbitMQ, and a future for its close reason."""
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[None] = loop.create_future()
    closed: asyncio.Future[BaseException] = loop.create_future()

    def on_close(conn: PikaConnection, reason: BaseException) -> None:
        if not closed.done():
            closed.set_result(reason)

    conn = cls(
        pika.URLParameters(AMQP_URL),
        loop=loop,
        on_open=lambda c: opened.set_result(None),
        on_open_error=lambda c, exc: opened.set_exception(exc),
        on_close=on_close,
    )
    await asyncio.wait_for(opened, t(10))
    try:
        yield conn, closed
    finally:
        if conn.is_open:
            conn.close()
        await asyncio.wait_for(closed, t(10))


def test_the_adapter_is_pikas_asyncio_connection_with_the_private_members_we_use() -> None:
    assert issubclass(PikaConnection, AsyncioConnection)
    for name in ("_adapter_emit_data", "_on_data_available", "_terminate_stream"):
        assert callable(getattr(AsyncioConnection, name, None)), f"pika lost {name}"
    assert len(ACK) == len(NACK) == CONFIRM_FRAME_SIZE


def test_confirm_frames_take_the_fast_path_and_anything_else_goes_to_pika(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[int, bool, bool]] = []
    handed: list[bytes] = []
    monkeypatch.setattr(
        pika.connection.Connection,
        "_on_data_available",
        lambda self, data: handed.append(data),
    )
    conn = PikaConnection.__new__(PikaConnection)
    conn._frame_buffer = b""
    conn.frames_received = conn.bytes_received = 0
    conn.route_confirms(1, lambda tag, multiple, ok: seen.append((tag, multiple, ok)))
    other = frame.Method(2, spec.Basic.Ack(delivery_tag=1)).marshal()  # another channel
    conn._on_data_available(ACK + NACK + HEARTBEAT + ACK)
    assert seen == [(5, True, True), (6, False, False)]
    assert handed == [HEARTBEAT + ACK]
    conn._on_data_available(other + ACK)
    assert handed[-1] == other + ACK
    conn._on_data_available(ACK[:10])  # a partial frame: pika buffers it
    assert handed[-1] == ACK[:10]
    assert conn.frames_received == 2 and conn.bytes_received == 42
    conn.route_confirms(1, None)  # no route: everything goes to pika
    conn._on_data_available(ACK)
    assert handed[-1] == ACK and len(seen) == 2


async def test_pikas_transport_hands_every_read_to_on_data_available() -> None:
    async with connection(Recording) as (conn, _):
        # The handshake came through the hook: connection.start is the first frame of all.
        first = conn.reads[0]
        assert first[0] == 1 and first[1:3] == b"\x00\x00"  # a method frame on channel 0
        assert first[7:11] == b"\x00\x0a\x00\x0a"  # class 10 (connection), method 10 (start)
        assert sum(map(len, conn.reads)) == conn.bytes_received


async def test_a_partial_frame_waits_in_pikas_frame_buffer() -> None:
    async with connection() as (conn, _):
        seen: list[int] = []
        conn.route_confirms(1, lambda tag, multiple, ok: seen.append(tag))
        conn._on_data_available(HEARTBEAT[:3])
        assert conn._frame_buffer == HEARTBEAT[:3]
        conn._on_data_available(HEARTBEAT[3:] + ACK)  # a heartbeat first: all of it to pika
        assert conn._frame_buffer == b""
        assert seen == []  # (channel 1 is not open: pika ignores the frame)
        conn._on_data_available(ACK)
        assert seen == [5]
        # A confirm split between two reads: pika keeps its start, the fast path the rest.
        received = conn.bytes_received
        conn._on_data_available(ACK + ACK[:10])
        assert conn._frame_buffer == ACK[:10] and seen == [5, 5]
        conn._on_data_available(ACK[10:] + NACK)
        assert conn._frame_buffer == b"" and seen == [5, 5, 5, 6]
        assert conn.bytes_received == received + 3 * CONFIRM_FRAME_SIZE


def test_a_confirm_split_between_two_reads_takes_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pika's own parser (which copies its whole buffer once per frame) sees none of it."""
    seen: list[tuple[int, bool, bool]] = []
    handed: list[bytes] = []

    def pika_buffers(self: PikaConnection, data: bytes) -> None:
        handed.append(data)
        self._frame_buffer += data  # what pika does with a partial frame

    monkeypatch.setattr(pika.connection.Connection, "_on_data_available", pika_buffers)
    conn = PikaConnection.__new__(PikaConnection)
    conn._frame_buffer = b""
    conn.frames_received = conn.bytes_received = 0
    conn.route_confirms(1, lambda tag, multiple, ok: seen.append((tag, multiple, ok)))
    conn._on_data_available(ACK + NACK[:7])
    assert handed == [NACK[:7]] and seen == [(5, True, True)]
    conn._on_data_available(NACK[7:] + ACK)
    assert handed == [NACK[:7]]
    assert seen == [(5, True, True), (6, False, False), (5, True, True)]
    assert conn._frame_buffer == b""
    assert conn.frames_received == 3 and conn.bytes_received == 3 * CONFIRM_FRAME_SIZE


async def test_a_raw_write_goes_out_and_its_confirm_takes_the_fast_path() -> None:
    queue = f"test-pika-{uuid.uuid4().hex[:12]}"
    async with connection() as (conn, _):
        waiters: set[asyncio.Future[Any]] = set()
        channel = await call(waiters, conn.channel, callback_name="on_open_callback")
        slow: list[object] = []
        await call(waiters, channel.confirm_delivery, slow.append)
        await call(waiters, channel.queue_declare, queue, auto_delete=True)
        fast: asyncio.Future[tuple[int, bool, bool]] = asyncio.get_running_loop().create_future()
        conn.route_confirms(channel.channel_number, lambda *args: fast.set_result(args))
        builder = FrameBuilder(exchange="", expiration_ms=60000, channel=channel.channel_number)
        frames = builder.command(queue, b'{"op":3,"d":{}}')
        sent, count = conn.bytes_sent, conn.frames_sent
        conn.write(frames, 3)
        # pika's heartbeat checker reads these counters to tell an idle link from a busy one.
        assert conn.bytes_sent == sent + len(frames) and conn.frames_sent == count + 3
        assert await asyncio.wait_for(fast, t(5)) == (1, False, True)
        assert slow == []
        reply = await call(waiters, channel.queue_declare, queue, passive=True)
        assert reply.method.message_count == 1


async def test_confirms_read_on_the_fast_path_count_as_life_for_pikas_heartbeat_checker() -> None:
    async with connection() as (conn, _):
        checker = conn._heartbeat_checker
        assert checker is not None, "RabbitMQ negotiates heartbeats by default"
        checker._update_counters()
        assert not checker._has_received_data
        conn.route_confirms(1, lambda tag, multiple, ok: None)
        conn._on_data_available(ACK)
        assert checker._has_received_data


async def test_drop_closes_the_socket_and_reports_the_error() -> None:
    async with connection() as (conn, closed):
        fd = os.dup(conn.fileno())
        with socket.socket(fileno=fd) as sock:
            assert sock.getpeername()[1] == pika.URLParameters(AMQP_URL).port
        conn.drop(ConnectionResetError("dropped by the test"))
        reason = await asyncio.wait_for(closed, t(5))
        assert isinstance(reason, ConnectionResetError)
        assert conn.is_closed
