"""Gateway payloads the simulator sends, pre-encoded as UTF-8 JSON bytes.

Hot paths (MESSAGE_CREATE in rate and burst mode, and their regeneration on replay) use
%-format string templates built once per size: no ``json.dumps`` per event. A generated
MESSAGE_CREATE is a pure function of ``(seq, message id, size)`` for a given session, so a
session only has to remember those three numbers to replay it byte for byte.

Rare payloads (HELLO, READY, GUILD_CREATE, replies to commands) use ``json.dumps``.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Sequence
from typing import Any

DISCORD_EPOCH_MS = 1_420_070_400_000
"""Discord's snowflake epoch (2015-01-01T00:00:00Z) in Unix milliseconds."""

DOCUMENTED_INTENTS = 53_608_447
"""Every documented intent bit OR'd together (discord.md §10)."""

PRIVILEGED_INTENTS = 33_026
"""GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT."""

_GUILD_EPOCH_OFFSET_MS = 250_000_000_000  # ~2022-12: when the simulated guilds were "created"
_JOINED_AT = "2024-03-01T12:00:00.000000+00:00"
_FILLER = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. "
)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, like Discord's (no spaces, non-ASCII left as is)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def snowflake_time_ms(snowflake: int) -> int:
    """Unix milliseconds encoded in a snowflake."""
    return (snowflake >> 22) + DISCORD_EPOCH_MS


def iso_timestamp(unix_ms: int) -> str:
    """Discord's timestamp format, e.g. ``2026-08-01T12:34:56.789000+00:00``."""
    dt = datetime.datetime.fromtimestamp(unix_ms / 1000, datetime.UTC)
    return dt.isoformat(timespec="microseconds")


class SnowflakeGenerator:
    """Unique, increasing snowflakes: ``(ms since the Discord epoch at start << 22) + n``.

    The timestamp part advances by one millisecond every 2**22 ids, so ids stay unique
    whatever the event rate, and decode to a plausible creation time.
    """

    __slots__ = ("_base", "_next")

    def __init__(self, now_ms: int | None = None) -> None:
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        self._base = (now_ms - DISCORD_EPOCH_MS) << 22
        self._next = 0

    def take(self, count: int = 1) -> int:
        """Reserve ``count`` consecutive ids and return the first."""
        first = self._base + self._next
        self._next += count
        return first


def guild_ids_for_shard(shard_id: int, num_shards: int, count: int) -> list[int]:
    """``count`` stable guild ids with ``(guild_id >> 22) % num_shards == shard_id``."""
    aligned = _GUILD_EPOCH_OFFSET_MS - _GUILD_EPOCH_OFFSET_MS % max(num_shards, 1)
    ids = []
    for i in range(count):
        ts = aligned + shard_id + i * num_shards
        ids.append((ts << 22) | (1 << 17) | ((i + 1) & 0xFFF))
    return ids


def envelope(op: int, d: bytes = b"null", *, s: int | None = None, t: str | None = None) -> bytes:
    """A full gateway payload with Discord's key order ``t, s, op, d``."""
    t_json = b"null" if t is None else b'"' + t.encode() + b'"'
    s_json = b"null" if s is None else str(s).encode()
    return b'{"t":%s,"s":%s,"op":%d,"d":%s}' % (t_json, s_json, op, d)


def dispatch(event: str, seq: int, d: bytes) -> bytes:
    """An op 0 payload around already encoded ``d``."""
    return b'{"t":"%s","s":%d,"op":0,"d":%s}' % (event.encode(), seq, d)


def trace(name: str, micros: float = 0.0) -> list[str]:
    """Discord's ``_trace``: a list of strings that themselves hold JSON."""
    return [json.dumps([name, {"micros": micros}], separators=(",", ":"))]


def hello(heartbeat_interval_ms: int, trace_name: str) -> bytes:
    """``{"t":null,"s":null,"op":10,"d":{"heartbeat_interval":N,"_trace":[...]}}``."""
    d = {"heartbeat_interval": heartbeat_interval_ms, "_trace": trace(trace_name)}
    return envelope(10, dumps(d))


HEARTBEAT_ACK = envelope(11)
HEARTBEAT_REQUEST = envelope(1)
RECONNECT = envelope(7)
INVALID_SESSION_TRUE = envelope(9, b"true")
INVALID_SESSION_FALSE = envelope(9, b"false")
UNKNOWN_OPCODE = envelope(99, b'{"simulated":true,"reason":"a future opcode"}')
MALFORMED_JSON = b'{"t":"MESSAGE_CREATE","s":1,"op":0,"d":{"id":"1","content":"trunc'


def bot_user(user_id: int) -> dict[str, Any]:
    return {
        "verified": True,
        "username": "spectacles-simulator",
        "mfa_enabled": False,
        "id": str(user_id),
        "global_name": None,
        "flags": 0,
        "email": None,
        "discriminator": "0",
        "bot": True,
        "avatar": None,
    }


def ready(
    *,
    seq: int,
    version: int,
    user_id: int,
    application_id: int,
    session_id: str,
    resume_gateway_url: str,
    shard: tuple[int, int],
    guild_ids: Sequence[int],
    trace_name: str,
) -> bytes:
    d = {
        "v": version,
        "user_settings": {},
        "user": bot_user(user_id),
        "session_type": "normal",
        "session_id": session_id,
        "resume_gateway_url": resume_gateway_url,
        "relationships": [],
        "private_channels": [],
        "presences": [],
        "guilds": [{"unavailable": True, "id": str(g)} for g in guild_ids],
        "guild_join_requests": [],
        "geo_ordered_rtc_regions": ["us-east", "us-central", "atlanta", "newark", "us-south"],
        "auth": {},
        "application": {"id": str(application_id), "flags": 565248},
        "_trace": trace(trace_name, 12345.0),
        "shard": [shard[0], shard[1]],
    }
    return dispatch("READY", seq, dumps(d))


def resumed(seq: int, trace_name: str) -> bytes:
    return dispatch("RESUMED", seq, dumps({"_trace": trace(trace_name, 456.0)}))


def _member(user_id: int, index: int) -> dict[str, Any]:
    return {
        "user": {
            "username": f"member{index}",
            "public_flags": 0,
            "id": str(user_id),
            "global_name": f"Member {index}",
            "discriminator": "0",
            "clan": None,
            "avatar_decoration_data": None,
            "avatar": None,
        },
        "roles": [],
        "premium_since": None,
        "pending": False,
        "nick": None,
        "mute": False,
        "joined_at": _JOINED_AT,
        "flags": 0,
        "deaf": False,
        "communication_disabled_until": None,
        "banner": None,
        "avatar": None,
    }


def guild_create(
    seq: int, *, guild_id: int, index: int, large_threshold: int, min_bytes: int = 0
) -> bytes:
    """GUILD_CREATE for one guild; padded with members until ``d`` is ``min_bytes`` long."""
    channel_id = guild_id + 1
    d: dict[str, Any] = {
        "id": str(guild_id),
        "name": f"Simulated Guild {index}",
        "icon": None,
        "description": None,
        "owner_id": str(guild_id + 2),
        "unavailable": False,
        "large": False,
        "member_count": 1,
        "joined_at": _JOINED_AT,
        "preferred_locale": "en-US",
        "premium_tier": 0,
        "premium_subscription_count": 0,
        "verification_level": 0,
        "explicit_content_filter": 0,
        "default_message_notifications": 0,
        "mfa_level": 0,
        "nsfw_level": 0,
        "system_channel_id": str(channel_id),
        "rules_channel_id": None,
        "afk_channel_id": None,
        "afk_timeout": 300,
        "features": [],
        "roles": [
            {
                "id": str(guild_id),
                "name": "@everyone",
                "permissions": "2248473465835073",
                "position": 0,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "flags": 0,
            }
        ],
        "channels": [
            {
                "id": str(channel_id),
                "type": 0,
                "name": "general",
                "position": 0,
                "parent_id": None,
                "topic": None,
                "nsfw": False,
                "rate_limit_per_user": 0,
                "last_message_id": None,
                "permission_overwrites": [],
                "flags": 0,
            }
        ],
        "threads": [],
        "members": [],
        "presences": [],
        "voice_states": [],
        "emojis": [],
        "stickers": [],
        "soundboard_sounds": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "embedded_activities": [],
        "_simulated": True,
    }
    encoded = dumps(d)
    if min_bytes > len(encoded):
        sample = len(dumps(_member(guild_id + 1_000_000, 999_999))) + 1
        count = (min_bytes - len(encoded)) // sample + 2
        d["members"] = [_member(guild_id + 1000 + i, i) for i in range(count)]
        d["member_count"] = count
        d["large"] = count > large_threshold
        encoded = dumps(d)
    return dispatch("GUILD_CREATE", seq, encoded)


def guild_members_chunk(
    *, seq: int, guild_id: str, nonce: str | None, user_ids: Sequence[str] = ()
) -> bytes:
    d: dict[str, Any] = {
        "guild_id": guild_id,
        "members": [_member(int(u), i) for i, u in enumerate(user_ids) if str(u).isdigit()],
        "chunk_index": 0,
        "chunk_count": 1,
        "not_found": [],
    }
    if nonce is not None:
        d["nonce"] = nonce
    return dispatch("GUILD_MEMBERS_CHUNK", seq, dumps(d))


def rate_limited(*, seq: int, opcode: int, retry_after: float, meta: dict[str, Any]) -> bytes:
    d = {"opcode": opcode, "retry_after": round(retry_after, 3), "meta": meta}
    return dispatch("RATE_LIMITED", seq, dumps(d))


def soundboard_sounds(seq: int, *, guild_id: str) -> bytes:
    return dispatch(
        "SOUNDBOARD_SOUNDS", seq, dumps({"guild_id": guild_id, "soundboard_sounds": []})
    )


def channel_info(*, seq: int, guild_id: str) -> bytes:
    return dispatch("CHANNEL_INFO", seq, dumps({"guild_id": guild_id, "channels": []}))


def future_event(*, seq: int, event_id: int, guild_id: int) -> bytes:
    """A dispatch of a name no client knows yet, with fields no client knows either."""
    d = {
        "id": str(event_id),
        "guild_id": str(guild_id),
        "future_field": {"nested": [1, 2, 3], "flag": True},
        "_unknown": None,
    }
    return dispatch("FUTURE_EVENT", seq, dumps(d))


# --- MESSAGE_CREATE templates ---------------------------------------------------------------

_AUTHORS = 16

_MESSAGE_HEAD = '{"t":"MESSAGE_CREATE","s":%d,"op":0,"d":'
# Fields in the order Discord sends them. Placeholders: timestamp, id, content, channel_id,
# author (a pre-encoded object), guild_id. The content is baked into the per-size template.
_MESSAGE_D = (
    '{"type":0,"tts":false,"timestamp":"%s","pinned":false,"mentions":[],"mention_roles":[],'
    '"mention_everyone":false,"member":{"roles":[],"premium_since":null,"pending":false,'
    '"nick":null,"mute":false,"joined_at":"' + _JOINED_AT + '","flags":0,"deaf":false,'
    '"communication_disabled_until":null,"banner":null,"avatar":null},"id":"%d","flags":0,'
    '"embeds":[],"edited_timestamp":null,"content":"{content}","components":[],'
    '"channel_type":0,"channel_id":"%d","author":%s,"attachments":[],"guild_id":"%d"}'
)
_SAMPLE_ID = 1_300_000_000_000_000_000

_template_cache: dict[int, str] = {}


def _author_json(user_id: int, index: int) -> str:
    return (
        f'{{"username":"user{index}","public_flags":0,"primary_guild":null,"id":"{user_id}",'
        f'"global_name":"User {index}","discriminator":"0","clan":null,'
        '"avatar_decoration_data":null,"avatar":null}'
    )


def message_template(size: int) -> str:
    """The full MESSAGE_CREATE payload template whose ``d`` is about ``size`` bytes."""
    template = _template_cache.get(size)
    if template is None:
        bare = _MESSAGE_D.replace("{content}", "")
        sample = bare % (
            iso_timestamp(snowflake_time_ms(_SAMPLE_ID)),
            _SAMPLE_ID,
            _SAMPLE_ID,
            _author_json(_SAMPLE_ID, 10),
            _SAMPLE_ID,
        )
        room = max(size - len(sample.encode()), 1)
        content = (_FILLER * (room // len(_FILLER) + 1))[:room].replace("%", "%%")
        template = _MESSAGE_HEAD + _MESSAGE_D.replace("{content}", content) + "}"
        _template_cache[size] = template
    return template


class MessageFactory:
    """Encodes MESSAGE_CREATE payloads for one session's guilds."""

    __slots__ = ("_authors", "_channels", "_guilds", "_n", "_ts_cache")

    def __init__(self, guild_ids: Sequence[int]) -> None:
        if not guild_ids:
            raise ValueError("a session needs at least one guild to generate messages")
        self._guilds = list(guild_ids)
        self._channels = [g + 1 for g in self._guilds]
        self._n = len(self._guilds)
        self._authors = [_author_json(self._guilds[0] + 10_000 + i, i) for i in range(_AUTHORS)]
        self._ts_cache: tuple[int, str] = (-1, "")

    @property
    def guild_ids(self) -> list[int]:
        return self._guilds

    def guild_for(self, message_id: int) -> int:
        return self._guilds[message_id % self._n]

    def _timestamp(self, message_id: int) -> str:
        ms = (message_id >> 22) + DISCORD_EPOCH_MS
        cached_ms, cached = self._ts_cache
        if cached_ms != ms:
            cached = iso_timestamp(ms)
            self._ts_cache = (ms, cached)
        return cached

    def encode(self, seq: int, message_id: int, size: int) -> bytes:
        """One full ``{"t":"MESSAGE_CREATE","s":seq,"op":0,"d":{...}}`` payload."""
        i = message_id % self._n
        return self.encode_in(seq, message_id, size, self._guilds[i], self._channels[i])

    def encode_in(
        self, seq: int, message_id: int, size: int, guild_id: int, channel_id: int = 0
    ) -> bytes:
        """The same, in a given guild (and channel: by default the guild's first)."""
        return (
            message_template(size)
            % (
                seq,
                self._timestamp(message_id),
                message_id,
                channel_id or guild_id + 1,
                self._authors[message_id % _AUTHORS],
                guild_id,
            )
        ).encode()
