"""Gateway payload envelope: read ``op``, ``s`` and ``t``, keep ``d`` as raw JSON bytes."""

from __future__ import annotations

import enum
from typing import Final

import msgspec

__all__ = [
    "DECODE_ERRORS",
    "Envelope",
    "GuildRef",
    "Opcode",
    "ReadyInfo",
    "decode_envelope",
    "decode_guild",
    "decode_guild_of",
    "decode_ready",
    "hello_interval",
]

#: What a malformed message from the gateway can raise while we decode it.
DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError)


class Opcode(enum.IntEnum):
    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    PRESENCE_UPDATE = 3
    VOICE_STATE_UPDATE = 4
    RESUME = 6
    RECONNECT = 7
    REQUEST_GUILD_MEMBERS = 8
    INVALID_SESSION = 9
    HELLO = 10
    HEARTBEAT_ACK = 11
    REQUEST_SOUNDBOARD_SOUNDS = 31
    REQUEST_CHANNEL_INFO = 43


class Envelope(msgspec.Struct, gc=False):
    """``{"op", "d", "s", "t"}``. Missing keys are tolerated; unknown keys are ignored.

    ``d`` is a :class:`msgspec.Raw`: the exact bytes of the JSON value, never parsed or
    re-serialised, so it can be forwarded as it came.
    """

    op: int
    d: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    s: int | None = None
    t: str | None = None


class GuildRef(msgspec.Struct, gc=False):
    """A guild's id, from READY's list or a GUILD_CREATE/GUILD_DELETE (the rest is skipped)."""

    id: str


class GuildOf(msgspec.Struct, gc=False):
    """Which guild an event is about: ``guild_id``, or ``id`` for the GUILD_* events."""

    guild_id: str | None = None
    id: str | None = None


class ReadyInfo(msgspec.Struct, gc=False):
    session_id: str
    resume_gateway_url: str | None = None
    guilds: list[GuildRef] = []


class HelloInfo(msgspec.Struct, gc=False):
    heartbeat_interval: float


_envelope_decoder = msgspec.json.Decoder(Envelope)
_ready_decoder = msgspec.json.Decoder(ReadyInfo)
_hello_decoder = msgspec.json.Decoder(HelloInfo)
_guild_decoder = msgspec.json.Decoder(GuildRef)
_guild_of_decoder = msgspec.json.Decoder(GuildOf)
_bool_decoder = msgspec.json.Decoder(bool | None)

decode_envelope = _envelope_decoder.decode
decode_ready = _ready_decoder.decode
decode_hello = _hello_decoder.decode
decode_guild = _guild_decoder.decode
decode_guild_of = _guild_of_decoder.decode
decode_bool = _bool_decoder.decode


def hello_interval(d: msgspec.Raw, allowed: tuple[float, float]) -> tuple[float | None, str]:
    """HELLO's heartbeat interval in seconds, kept within ``allowed`` (low, high), and what was
    wrong with it: (None, why) when there is none to use, (interval, why) when it was clamped,
    (interval, "") when it was fine."""
    try:
        interval = float(decode_hello(d).heartbeat_interval) / 1000.0
    except DECODE_ERRORS as exc:
        return None, f"HELLO without a heartbeat interval: {exc}"
    if not interval > 0:  # also NaN
        return None, f"HELLO with heartbeat interval {interval}"
    low, high = allowed
    if low <= interval <= high:
        return interval, ""
    clamped = min(max(interval, low), high)
    return clamped, (
        f"HELLO's heartbeat interval {interval:g} s is outside {low:g}..{high:g} s; "
        f"using {clamped:g} s"
    )
