"""Transport decompression, one context per connection (discord.md §3).

``zstd-stream``: the connection is one zstd frame that never ends; the server flushes a block per
message, so a streaming decompressor turns each websocket message into exactly one JSON document.
``zlib-stream``: one inflater per connection; a gateway message may span several websocket
messages and is complete when the buffered bytes end with ``00 00 ff ff``.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import zstandard

__all__ = ["DecompressError", "Decompressor", "make_decompressor"]

_ZLIB_SUFFIX = b"\x00\x00\xff\xff"


class DecompressError(Exception):
    """The compressed stream is corrupt; the connection must be dropped (and resumed)."""


class Decompressor(Protocol):
    def feed(self, data: bytes) -> bytes | None:
        """Feed one websocket message; return a complete gateway message or None (need more)."""


class ZstdStream:
    __slots__ = ("_obj",)

    def __init__(self) -> None:
        self._obj = zstandard.ZstdDecompressor().decompressobj()

    def feed(self, data: bytes) -> bytes | None:
        try:
            return self._obj.decompress(data)
        except zstandard.ZstdError as exc:
            raise DecompressError(f"zstd: {exc}") from exc


class ZlibStream:
    __slots__ = ("_buffer", "_obj")

    def __init__(self) -> None:
        self._obj = zlib.decompressobj()
        self._buffer = bytearray()

    def feed(self, data: bytes) -> bytes | None:
        buffer = self._buffer
        if not buffer and data[-4:] == _ZLIB_SUFFIX:
            chunk: bytes | bytearray = data
        else:
            buffer += data
            if buffer[-4:] != _ZLIB_SUFFIX:
                return None
            chunk = bytes(buffer)
            buffer.clear()
        try:
            return self._obj.decompress(chunk)
        except zlib.error as exc:
            raise DecompressError(f"zlib: {exc}") from exc


class Identity:
    __slots__ = ()

    def feed(self, data: bytes) -> bytes | None:
        return data


def make_decompressor(compress: str | None) -> Decompressor:
    """A fresh context for a new connection: ``zstd-stream``, ``zlib-stream`` or none."""
    if compress == "zstd-stream":
        return ZstdStream()
    if compress == "zlib-stream":
        return ZlibStream()
    if compress in (None, "", "none"):
        return Identity()
    raise ValueError(f"unknown transport compression {compress!r}")
