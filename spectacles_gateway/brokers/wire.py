"""Wire formats shared by every broker (product.md "Outputs" and "Inputs").

Bodies are built from the raw bytes of ``d`` without parsing or re-serialising them.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

__all__ = [
    "MAX_COMMAND_BODY",
    "SENDABLE_OPS",
    "STR_BIN_WIDTHS",
    "Command",
    "CommandError",
    "json_line",
    "msgpack_event_map",
    "msgpack_string",
    "parse_command",
    "parse_packet",
    "target_shard",
    "unwrap_msgpack_string",
]

#: A command body from a broker larger than this is dropped unparsed (a valid one is < 5 KiB).
MAX_COMMAND_BODY = 65536

_pack_u16 = struct.Struct(">H").pack
_pack_u32 = struct.Struct(">I").pack


def msgpack_header(n: int) -> bytes:
    """The msgpack ``str`` header for ``n`` bytes, in the seed's legacy form (no ``str8``)."""
    if n < 32:
        return bytes((0xA0 | n,))
    if n < 65536:
        return b"\xda" + _pack_u16(n)
    return b"\xdb" + _pack_u32(n)


def msgpack_string(data: bytes) -> bytes:
    """``data`` (JSON text) as a msgpack string: what Spectacles consumers ``JSON.parse``."""
    return msgpack_header(len(data)) + data


_event_cache: dict[str, bytes] = {}


def _event_json(event: str) -> bytes:
    encoded = _event_cache.get(event)
    if encoded is None:
        encoded = msgspec.json.encode(event)
        if len(_event_cache) < 4096:
            _event_cache[event] = encoded
    return encoded


def json_line(
    event: str, shard_id: int, seq: int | None, data: bytes, generation: int = 0
) -> bytes:
    """``{"event":..,"shard_id":..,"seq":..,"generation":..,"data":<d>}\n``: one stdio line."""
    return b'{"event":%b,"shard_id":%d,"seq":%b,"generation":%d,"data":%b}\n' % (
        _event_json(event),
        shard_id,
        b"null" if seq is None else b"%d" % seq,
        generation,
        data,
    )


_msgpack_event_key = b"\x82\xa5event"
_msgpack_data_key = b"\xa4data"


def msgpack_event_map(event: str, data: bytes) -> bytes:
    """The seed's stdio record: msgpack map ``{"event": str, "data": str-of-JSON}``."""
    name = event.encode()
    return (
        _msgpack_event_key
        + msgpack_header(len(name))
        + name
        + _msgpack_data_key
        + msgpack_string(data)
    )


class CommandError(ValueError):
    """A command that cannot be sent; ``reason`` is a short fixed label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Command(msgspec.Struct, frozen=True):
    """A command for Discord: the packet to send and where to send it."""

    packet: bytes  # compact JSON ``{"op":..,"d":..}``
    guild_id: int | None = None
    shard_id: int | None = None

    def target(self, shard_count: int) -> int | None:
        """The one shard this command goes to (``shard_id``, else Discord's rule for
        ``guild_id``), or None: every shard."""
        if self.shard_id is not None:
            return self.shard_id
        if self.guild_id is not None:
            return target_shard(self.guild_id, shard_count)
        return None


#: msgpack str8/16/32 and bin8/16/32: their header byte -> the width of the length that follows.
STR_BIN_WIDTHS = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4}


def unwrap_msgpack_string(body: bytes) -> bytes:
    """If ``body`` is a msgpack str or bin, return its payload bytes; otherwise ``body``."""
    if not body:
        return body
    first = body[0]
    if 0xA0 <= first <= 0xBF:
        n, start = first & 0x1F, 1
    elif first in STR_BIN_WIDTHS:
        width = STR_BIN_WIDTHS[first]
        start = 1 + width
        if len(body) < start:
            raise CommandError("not_msgpack", "truncated msgpack string header")
        n = int.from_bytes(body[1:start], "big")
    else:
        return body
    if len(body) != start + n:
        raise CommandError("not_msgpack", f"msgpack string says {n} bytes, has {len(body) - start}")
    return body[start:]


def _snowflake(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise CommandError("wrong_shape", f"{key} must be a snowflake, got {value!r}")
    if isinstance(value, int):
        sid = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        sid = int(value)
    else:
        raise CommandError("wrong_shape", f"{key} must be a snowflake, got {value!r}")
    if not 0 <= sid < 1 << 64:
        raise CommandError("wrong_shape", f"{key} {sid} is not a 64-bit snowflake")
    return sid


#: Opcodes a client may send beside the ones the gateway manages (heartbeat, identify, resume):
#: presence (3), voice state (4), request guild members (8), soundboard sounds (31), channel
#: info (43). Anything else makes Discord close the connection (4001), so it is refused here.
SENDABLE_OPS = frozenset({3, 4, 8, 31, 43})


def parse_packet(packet: Any) -> bytes:
    """Validate ``{"op": int, "d": any}`` and return it as compact JSON."""
    if not isinstance(packet, dict):
        raise CommandError("wrong_shape", "packet must be an object with op and d")
    op = packet.get("op")
    if not isinstance(op, int) or isinstance(op, bool):
        raise CommandError("wrong_shape", f"packet.op must be an integer, got {op!r}")
    if op in (1, 2, 6):
        raise CommandError("forbidden_op", f"op {op} is managed by the gateway itself")
    if op not in SENDABLE_OPS:
        raise CommandError("unknown_op", f"op {op} is not a command a client may send")
    if "d" not in packet:
        raise CommandError("wrong_shape", "packet has no d")
    try:
        return msgspec.json.encode({"op": op, "d": packet["d"]})
    except (msgspec.EncodeError, OverflowError, RecursionError, TypeError, ValueError) as exc:
        raise CommandError("wrong_shape", f"packet.d cannot be sent: {exc}") from None


def parse_command(body: bytes | str) -> Command:
    """Parse a ``SEND`` body: JSON, plain or inside a msgpack str/bin, of the shape
    ``{"guild_id": "<snowflake>", "packet": {"op": int, "d": any}}`` (``guild_id`` optional;
    ours: ``"shard_id": N``). Raises :class:`CommandError` with a reason label."""
    try:
        raw = body.encode() if isinstance(body, str) else unwrap_msgpack_string(body)
        obj = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeError, RecursionError) as exc:
        raise CommandError("not_json", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise CommandError("wrong_shape", "command must be a JSON object")
    if "packet" not in obj:
        raise CommandError("wrong_shape", "command has no packet")
    packet = parse_packet(obj["packet"])
    guild_id = _snowflake(obj["guild_id"], "guild_id") if obj.get("guild_id") is not None else None
    shard_id = None
    if obj.get("shard_id") is not None:
        shard_id = obj["shard_id"]
        if not isinstance(shard_id, int) or isinstance(shard_id, bool) or shard_id < 0:
            raise CommandError(
                "wrong_shape", f"shard_id must be a non-negative integer, got {shard_id!r}"
            )
    return Command(packet, guild_id, shard_id)


def target_shard(guild_id: int, shard_count: int) -> int:
    """Discord's routing rule: ``(guild_id >> 22) % shard_count``."""
    return (guild_id >> 22) % shard_count
