"""Gateway payload envelope: read ``op``, ``s`` and ``t``, keep ``d`` as raw JSON bytes."""

from __future__ import annotations

import enum

import msgspec

__all__ = [
    "Envelope",
    "GuildRef",
    "Opcode",
    "ReadyInfo",
    "decode_envelope",
    "decode_guild",
    "decode_guild_of",
    "decode_ready",
]


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
