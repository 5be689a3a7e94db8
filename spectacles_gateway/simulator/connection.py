"""One websocket connection of the simulator: its stream compressor and the framing of what
the server writes.

Outgoing data never goes through ``websockets``' send path: each gateway message is compressed
with the connection's stream compressor, framed here (server frames are unmasked) and written
with one ``transport.write`` per batch. Everything that writes runs synchronously on the event
loop, so the compressed stream can never be reordered.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import zstandard
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.ledger import ConnectionRecord

if TYPE_CHECKING:
    from spectacles_gateway.simulator.sessions import Session

ZSTD_WINDOW_LOG: Final = 18
_ZSTD_FLUSH_BLOCK = zstandard.COMPRESSOBJ_FLUSH_BLOCK
# A zstd block header announcing the reserved block type (3): "Corrupted block detected".
_CORRUPT_ZSTD = b"\x06\x00\x00" + b"\xde\xad\xbe\xef"
# A deflate block of the reserved type (BTYPE=11): "invalid block type"; ends like a flush.
_CORRUPT_ZLIB = b"\x07\xde\xad\x00\x00\xff\xff"
_CORRUPT_RAW = b"\xff\xfe\x00\xde\xad\xbe\xef not a gateway message"


def new_zstd_compressor(level: int = 3) -> Any:
    """A zstd stream compressor configured like Discord's.

    256 KiB window (frame header ``28 b5 2f fd 00 40``), no content size, no checksum. Call
    ``compress(msg)`` then ``flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)`` per message and never
    end the frame.
    """
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=ZSTD_WINDOW_LOG, write_content_size=False, write_checksum=False
    )
    return zstandard.ZstdCompressor(compression_params=params).compressobj()


ZSTD, ZLIB, PAYLOAD_ZLIB, PLAIN = range(4)


@dataclass(frozen=True, slots=True)
class Streamed:
    """A gateway message too big to hold in memory: ``head``, then the chunks ``body()``
    yields, then ``tail``, compressed chunk by chunk as they come, and sent in ``fragments``
    websocket frames (1 = a single frame)."""

    head: bytes
    body: Callable[[], Iterator[bytes]]
    tail: bytes
    fragments: int = 1

    def chunks(self) -> Iterator[bytes]:
        yield self.head
        yield from self.body()
        yield self.tail


Payload = bytes | Streamed
"""What :meth:`Conn.write` takes: one gateway message's JSON bytes, or a :class:`Streamed`."""


def _ws_header(first_byte: int, length: int) -> bytes:
    if length < 126:
        return bytes((first_byte, length))
    if length < 65536:
        return struct.pack("!BBH", first_byte, 126, length)
    return struct.pack("!BBQ", first_byte, 127, length)


class Conn:
    """One websocket connection: its compressor, framing and protocol state."""

    def __init__(
        self,
        conn_id: int,
        ws: ServerConnection,
        record: ConnectionRecord,
        config: SimulatorConfig,
    ) -> None:
        self.id = conn_id
        self.ws = ws
        self.transport: asyncio.WriteTransport = ws.transport
        self.record = record
        self.shard_id: int | None = None
        self.session: Session | None = None
        self.owned_session: Session | None = None
        self.closing = False
        self.dropped = False
        self.withhold_acks = False
        self.recv_times: deque[float] = deque()
        self.hb_timer: asyncio.TimerHandle | None = None
        self.zlib_split_over = config.zlib_split_over
        self.fragment_over = config.ws_fragment_over
        self.messages_sent = 0
        self.bytes_sent = 0
        self.compressor: Any = None
        if record.compression == "zstd-stream":
            self.mode = ZSTD
            self.compressor = new_zstd_compressor(config.zstd_level)
        elif record.compression == "zlib-stream":
            self.mode = ZLIB
            self.compressor = zlib.compressobj()
        else:
            self.mode = PLAIN

    @property
    def writable(self) -> bool:
        return (
            not self.closing
            and self.ws.protocol.state is State.OPEN
            and not self.transport.is_closing()
        )

    def _frame_into(
        self, buf: bytearray, opcode: int, data: bytes | bytearray, fragments: int = 1
    ) -> None:
        """Append one websocket message; in ``fragments`` frames (or 2 over ``fragment_over``)."""
        n = len(data)
        if fragments <= 1 and self.fragment_over and n > self.fragment_over:
            fragments = 2
        if fragments <= 1 or n < 2:
            buf += _ws_header(0x80 | opcode, n)
            buf += data
        else:
            view = memoryview(data)
            count = min(fragments, n)
            size, bigger = divmod(n, count)  # the first ``bigger`` frames get one byte more
            start = 0
            for index in range(count):
                end = start + size + (index < bigger)
                first = opcode if index == 0 else 0  # then continuation frames
                buf += _ws_header((0x80 if end == n else 0) | first, end - start)
                buf += view[start:end]
                start = end
        self.messages_sent += 1

    def encode_into(self, buf: bytearray, payload: Payload) -> None:
        """Append one gateway message, compressed and framed, to ``buf``."""
        if isinstance(payload, Streamed):
            self._encode_streamed(buf, payload)
            return
        mode = self.mode
        if mode == ZSTD:
            c = self.compressor
            out = c.compress(payload) + c.flush(_ZSTD_FLUSH_BLOCK)
            if self.fragment_over:
                self._frame_into(buf, 0x2, out)
            else:
                n = len(out)
                buf += bytes((0x82, n)) if n < 126 else _ws_header(0x82, n)
                buf += out
                self.messages_sent += 1
        elif mode == ZLIB:
            c = self.compressor
            out = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
            if self.zlib_split_over and len(out) > self.zlib_split_over:
                half = len(out) // 2
                while out[:half].endswith(b"\x00\x00\xff\xff"):
                    half += 1
                self._frame_into(buf, 0x2, out[:half])
                self._frame_into(buf, 0x2, out[half:])
            else:
                self._frame_into(buf, 0x2, out)
        elif mode == PAYLOAD_ZLIB:
            self._frame_into(buf, 0x2, zlib.compress(payload))
        else:
            self._frame_into(buf, 0x1, payload)

    def _encode_streamed(self, buf: bytearray, payload: Streamed) -> None:
        mode = self.mode
        if mode in (ZSTD, ZLIB):
            c = self.compressor
            out = bytearray()
            for chunk in payload.chunks():
                out += c.compress(chunk)
            out += c.flush(_ZSTD_FLUSH_BLOCK if mode == ZSTD else zlib.Z_SYNC_FLUSH)
            self._frame_into(buf, 0x2, out, payload.fragments)
        elif mode == PAYLOAD_ZLIB:
            c = zlib.compressobj()
            out = bytearray()
            for chunk in payload.chunks():
                out += c.compress(chunk)
            out += c.flush()
            self._frame_into(buf, 0x2, out, payload.fragments)
        else:
            self._frame_into(buf, 0x1, b"".join(payload.chunks()), payload.fragments)

    def write(self, payloads: Iterable[Payload]) -> bool:
        """Compress, frame and write gateway messages in one ``transport.write``."""
        if not self.writable:
            return False
        buf = bytearray()
        encode = self.encode_into
        for payload in payloads:
            encode(buf, payload)
        if buf:
            self.bytes_sent += len(buf)
            self.transport.write(buf)
        return True

    def write_corrupt(self) -> bool:
        if not self.writable:
            return False
        data = {ZSTD: _CORRUPT_ZSTD, ZLIB: _CORRUPT_ZLIB}.get(self.mode, _CORRUPT_RAW)
        buf = bytearray()
        self._frame_into(buf, 0x2, data)
        self.transport.write(buf)
        return True
