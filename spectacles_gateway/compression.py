"""Transport decompression, one context per connection (discord.md §3), bounded.

``zstd-stream``: the connection is one zstd frame that never ends; the server flushes a block per
message, so a streaming decompressor turns each websocket message into exactly one JSON document.
``zlib-stream``: one inflater per connection; a gateway message may span several websocket
messages and is complete when the buffered bytes end with ``00 00 ff ff``.

Every context stops at ``max_size`` bytes of output (a few KiB of zstd can expand to gigabytes):
decompression is asked for at most ``max_size + 1`` bytes, so no message ever costs more than
that, and a message over it raises :class:`MessageTooLarge`. The zstd window is capped as well
(Discord's is 256 KiB), so a hostile frame header cannot make a connection reserve 128 MiB.

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
        try:
            out: bytes = self._obj.decompress(data, self._max + 1)
        except zstd.ZstdError as exc:
            raise DecompressError(f"zstd: {exc}") from exc
        if len(out) > self._max:
            raise MessageTooLarge(f"a gateway message is over {self._max} bytes decompressed")
        return out


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
        try:
            out = self._obj.decompress(chunk, self._max + 1)
        except zlib.error as exc:
            raise DecompressError(f"zlib: {exc}") from exc
        if len(out) > self._max:
            raise MessageTooLarge(f"a gateway message is over {self._max} bytes decompressed")
        return out


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
