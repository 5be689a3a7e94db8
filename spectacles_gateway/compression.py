"""Transport decompression, one context per connection (discord.md §3), bounded.

``zstd-stream``: the connection is one zstd frame that never ends; the server flushes a block per
message, so a streaming decompressor turns each websocket message into exactly one JSON document.
``zlib-stream``: one inflater per connection; a gateway message may span several websocket
messages and is complete when the buffered bytes end with ``00 00 ff ff``.

Every context stops at ``max_size`` bytes of output (a few KiB of zstd can expand to gigabytes):
output is asked for in pieces of :data:`CHUNK` bytes and counted, so a message over the limit
raises :class:`MessageTooLarge` having cost at most ``max_size`` plus one piece, and a message
within it at most twice its size (the pieces and the joined message). The zstd window is capped
as well (Discord's is 256 KiB), so a hostile frame header cannot make a connection reserve
128 MiB.

zstd comes from the standard library's ``compression.zstd`` (Python 3.14) or its backport: unlike
``zstandard``'s stream objects, it can stop at a given output length.
"""

from __future__ import annotations

import zlib
from typing import Protocol

from .plan import DEFAULT_MAX_MESSAGE

try:  # Python 3.14+
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

__all__ = [
    "DecompressError",
    "Decompressor",
    "MessageTooLarge",
    "make_decompressor",
]

_ZLIB_SUFFIX = b"\x00\x00\xff\xff"
#: log2 of the largest zstd window accepted: 4 MiB (Discord's stream uses 256 KiB).
ZSTD_WINDOW_LOG_MAX = 22
#: Decompressed output is asked for in pieces of this size at most.
CHUNK = 1 << 20


class DecompressError(Exception):
    """The compressed stream is corrupt; the connection must be dropped (and resumed)."""


class MessageTooLarge(DecompressError):
    """A message is larger than the configured maximum (checked before it is all in memory)."""


class Decompressor(Protocol):
    def feed(self, data: bytes) -> bytes | None:
        """Feed one websocket message; return a complete gateway message or None (need more)."""


class ZstdStream:
    __slots__ = ("_max", "_obj")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self._obj = zstd.ZstdDecompressor(
            options={zstd.DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG_MAX}
        )
        self._max = max_size

    def feed(self, data: bytes) -> bytes | None:
        obj = self._obj
        try:
            out: bytes = obj.decompress(data, CHUNK)
            if obj.needs_input:  # all of it (nearly every message is well under CHUNK)
                return out
            # A large message, in pieces: one big request would make the decompressor grow
            # its output buffer to twice the limit before the size could be checked.
            parts = [out]
            total = len(out)
            limit = self._max
            while not obj.needs_input:
                piece = obj.decompress(b"", CHUNK)
                if not piece:
                    break
                total += len(piece)
                if total > limit:
                    raise MessageTooLarge(f"a gateway message is over {limit} bytes decompressed")
                parts.append(piece)
        except zstd.ZstdError as exc:
            raise DecompressError(f"zstd: {exc}") from exc
        return b"".join(parts)


class ZlibStream:
    __slots__ = ("_buffer", "_max", "_obj")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self._obj = zlib.decompressobj()
        self._buffer = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> bytes | None:
        buffer = self._buffer
        if not buffer and data[-4:] == _ZLIB_SUFFIX:
            chunk: bytes | bytearray = data
        else:
            buffer += data
            if len(buffer) > self._max:
                raise MessageTooLarge(f"a gateway message is over {self._max} bytes compressed")
            if buffer[-4:] != _ZLIB_SUFFIX:
                return None
            chunk = bytes(buffer)
            buffer.clear()
        obj = self._obj
        limit = self._max
        try:
            out = obj.decompress(chunk, CHUNK)
            if not obj.unconsumed_tail:
                return out
            parts = [out]  # a large message, in pieces (see ZstdStream.feed)
            total = len(out)
            while obj.unconsumed_tail:
                piece = obj.decompress(obj.unconsumed_tail, CHUNK)
                total += len(piece)
                if total > limit:
                    raise MessageTooLarge(f"a gateway message is over {limit} bytes decompressed")
                parts.append(piece)
        except zlib.error as exc:
            raise DecompressError(f"zlib: {exc}") from exc
        return b"".join(parts)


class Identity:
    __slots__ = ()

    def feed(self, data: bytes) -> bytes | None:
        return data


def make_decompressor(compress: str | None, max_size: int = DEFAULT_MAX_MESSAGE) -> Decompressor:
    """A fresh context for a new connection: ``zstd-stream``, ``zlib-stream`` or none."""
    if compress == "zstd-stream":
        return ZstdStream(max_size)
    if compress == "zlib-stream":
        return ZlibStream(max_size)
    if compress in (None, "", "none"):
        return Identity()
    raise ValueError(f"unknown transport compression {compress!r}")
