"""Stdio records: the framing of JSON-lines and msgpack streams, and commands read from stdin.

Pure code shared by the supervisor (which owns the real stdin and stdout) and the worker's stdio
broker (which writes the records): no asyncio, no I/O. The supervisor reads stdin through a
:class:`RecordSplitter` and turns each record into a command with :func:`parse_stdin_record`; it
relays worker output in whole records found by :func:`whole_records_end`.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from .brokers.wire import STR_BIN_WIDTHS, Command, CommandError, parse_command

__all__ = [
    "MAX_RECORD",
    "Dropped",
    "RecordSplitter",
    "msgpack_object_end",
    "parse_stdin_record",
    "whole_records_end",
]

#: A stdin record longer than this is dropped (commands are at most 4 KiB once sent).
MAX_RECORD = 1 << 20

_EXT_WIDTHS = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_FIXED = {
    0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8
}  # fmt: skip


def msgpack_object_end(buf: bytes | bytearray, pos: int) -> int | None:
    """End offset of the msgpack object starting at ``pos``; None if ``buf`` holds only part of
    it. Raises ValueError on a byte that starts no msgpack object (0xc1)."""
    end = _scan(buf, pos)
    return end if end is not None and end <= len(buf) else None


def _scan(buf: bytes | bytearray, pos: int) -> int | None:
    """Like :func:`msgpack_object_end`, but an object cut inside a payload returns the offset
    where it will end (beyond ``len(buf)``); None only when it is cut inside a header."""
    n = len(buf)
    todo = 1
    while todo:
        if pos >= n:
            return None
        b = buf[pos]
        todo -= 1
        pos += 1
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            continue
        if 0x80 <= b <= 0x8F:
            todo += 2 * (b & 0x0F)
        elif 0x90 <= b <= 0x9F:
            todo += b & 0x0F
        elif 0xA0 <= b <= 0xBF:
            pos += b & 0x1F
        elif b in STR_BIN_WIDTHS:
            width = STR_BIN_WIDTHS[b]
            if pos + width > n:
                return None
            pos += width + int.from_bytes(buf[pos : pos + width], "big")
        elif b in _EXT_WIDTHS:
            width = _EXT_WIDTHS[b]
            if pos + width > n:
                return None
            pos += width + 1 + int.from_bytes(buf[pos : pos + width], "big")
        elif b in _FIXED:
            pos += _FIXED[b]
        elif 0xD4 <= b <= 0xD8:
            pos += 1 + (1, 2, 4, 8, 16)[b - 0xD4]
        elif b in (0xDC, 0xDD, 0xDE, 0xDF):
            width = 2 if b in (0xDC, 0xDE) else 4
            if pos + width > n:
                return None
            count = int.from_bytes(buf[pos : pos + width], "big")
            pos += width
            todo += count * (2 if b in (0xDE, 0xDF) else 1)
        else:
            raise ValueError(f"byte 0x{b:02x} starts no msgpack object")
    return pos


def whole_records_end(buf: bytes | bytearray, fmt: str) -> int:
    """Length of the whole records at the start of ``buf`` (``fmt``: ``json`` or
    ``msgpack``). Garbage in a msgpack stream (our own workers' output) counts as whole."""
    if fmt == "json":
        return buf.rfind(b"\n") + 1
    pos = 0
    n = len(buf)
    while pos < n:
        try:
            end = msgpack_object_end(buf, pos)
        except ValueError:
            return n
        if end is None:
            break
        pos = end
    return pos


class Dropped(NamedTuple):
    """Input that was not a record: ``reason`` is a metric label, ``detail`` for the log."""

    reason: str
    detail: str


class RecordSplitter:
    """Splits a byte stream into whole records, bounded by ``max_record`` bytes each.

    JSON: one record per line (blank lines skipped); a line over the bound is dropped up to its
    newline. msgpack: back-to-back objects; one that declares more than the bound, or a byte
    that starts no object, drops what is buffered (a msgpack stream cannot be resynchronised).
    An incomplete record is not scanned again until enough bytes arrived to finish it.
    """

    def __init__(self, fmt: str, max_record: int = MAX_RECORD) -> None:
        if fmt not in ("json", "msgpack"):
            raise ValueError(f"unknown record format {fmt!r}")
        self.format = fmt
        self.max_record = max_record
        self._buf = bytearray()
        self._skipping = False  # inside the tail of an oversized JSON line
        self._need = 0  # msgpack: bytes the incomplete record at the front needs in all

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | Dropped]:
        self._buf += data
        return self._lines() if self.format == "json" else self._objects()

    def _lines(self) -> list[bytes | Dropped]:
        buf = self._buf
        out: list[bytes | Dropped] = []
        start = 0
        while True:
            newline = buf.find(b"\n", start)
            if newline < 0:
                break
            if self._skipping:
                self._skipping = False
            elif newline - start > self.max_record:
                out.append(Dropped("too_large", f"command line over {self.max_record} bytes"))
            elif buf[start:newline].strip():
                out.append(bytes(buf[start:newline]))
            start = newline + 1
        del buf[:start]
        if len(buf) > self.max_record:
            if not self._skipping:
                out.append(Dropped("too_large", f"command line over {self.max_record} bytes"))
            self._skipping = True
            buf.clear()
        return out

    def _objects(self) -> list[bytes | Dropped]:
        buf = self._buf
        out: list[bytes | Dropped] = []
        if len(buf) < self._need:
            return out
        pos = 0
        n = len(buf)
        while pos < n:
            try:
                end = _scan(buf, pos)
            except ValueError as exc:
                out.append(Dropped("not_msgpack", f"stdin is not a msgpack stream ({exc})"))
                pos = n
                break
            if end is None or end > n:  # incomplete
                size = (end if end is not None else n) - pos
                if size > self.max_record:
                    out.append(Dropped("too_large", f"msgpack record over {self.max_record} bytes"))
                    pos = n
                else:
                    self._need = end - pos if end is not None else 0
                break
            if end - pos > self.max_record:
                out.append(Dropped("too_large", f"msgpack record over {self.max_record} bytes"))
            else:
                out.append(bytes(buf[pos:end]))
            pos = end
        del buf[:pos]
        if pos == n:
            self._need = 0
        return out


_decode_json = msgspec.json.decode
_decode_msgpack = msgspec.msgpack.decode
_encode_json = msgspec.json.encode


def parse_stdin_record(record: bytes, fmt: str) -> Command:
    """A stdin record ``{"event": "SEND", "data": <command>}`` as a command; ``data`` is the
    command object itself, or a string (or msgpack bin) holding its JSON. Raises
    :class:`CommandError` with a reason label."""
    try:
        obj = _decode_json(record) if fmt == "json" else _decode_msgpack(record)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        label = "not_json" if fmt == "json" else "not_msgpack"
        raise CommandError(label, f"stdin record is not {fmt} ({exc}): {record[:80]!r}") from None
    if not isinstance(obj, dict):
        raise CommandError("wrong_shape", "a stdin record must be a map with event and data")
    event = obj.get("event")
    if event != "SEND":
        raise CommandError("unknown_event", f"stdin record with event {event!r}; only SEND is read")
    data = obj.get("data")
    if isinstance(data, dict):
        return parse_command(_encode_json(data))
    if isinstance(data, str | bytes):
        return parse_command(data)
    raise CommandError("wrong_shape", "SEND record without a data object")
