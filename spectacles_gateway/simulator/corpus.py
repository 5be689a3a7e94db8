"""The realistic traffic profile: a busy bot's mix of dispatches, generated from a seed.

A :class:`Corpus` is a pool of payload templates built once from ``random.Random(seed)``:
MESSAGE_CREATE with varied text, mentions, embeds, attachments and replies; TYPING_START;
PRESENCE_UPDATE; GUILD_MEMBER_UPDATE; MESSAGE_REACTION_ADD; MESSAGE_UPDATE; and now and then a
large GUILD_CREATE. Text comes from a vocabulary of made-up words with a Zipf-like frequency,
common chat words, numbers, emoji and links, so it compresses a few to one like real traffic,
not forty to one like a repeated filler. Each template leaves the per-event fields open (seq,
the event's id, guild, channel, timestamps, a nonce), so an event is a pure function of
``(seq, id, template, guild)``: a session only remembers those to replay it byte for byte.

Every generated event carries its unique snowflake in ``d.id`` (an extra field for the types
that have none on Discord), so consumers and the ledger can match events by id.
"""

from __future__ import annotations

import functools
import random
import zlib
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final

import zstandard

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.connection import new_zstd_compressor

# Per-event fields, as markers in the template's JSON and as %-format keys.
_MARKERS: Final = (
    ('"@@S@@"', "%(s)d"),
    ('"@@ID@@"', '"%(id)d"'),
    ('"@@G@@"', '"%(g)d"'),
    ('"@@C@@"', '"%(c)d"'),
    ('"@@TS@@"', '"%(ts)s"'),
    ('"@@N@@"', '"%(n)d"'),
    ('"@@TSU@@"', "%(tsu)d"),
)
S, ID, G, C, TS, N, TSU = (m[0].strip('"') for m in _MARKERS)

INTENT_OF: Final = {
    "MESSAGE_CREATE": 1 << 9,
    "MESSAGE_UPDATE": 1 << 9,
    "TYPING_START": 1 << 11,
    "PRESENCE_UPDATE": 1 << 8,
    "GUILD_MEMBER_UPDATE": 1 << 1,
    "MESSAGE_REACTION_ADD": 1 << 10,
    "GUILD_CREATE": 1 << 0,
}
"""The intent a session needs to receive each generated event type (discord.md §10)."""

MIX: Final = (
    ("MESSAGE_CREATE", 0.34),
    ("TYPING_START", 0.20),
    ("PRESENCE_UPDATE", 0.20),
    ("MESSAGE_REACTION_ADD", 0.10),
    ("GUILD_MEMBER_UPDATE", 0.08),
    ("MESSAGE_UPDATE", 0.0795),
    ("GUILD_CREATE", 0.0005),
)
"""Event types of the realistic profile and their share of the traffic."""

_COMMON_WORDS = (
    "the a i you it to is and of that in lol for this my on me be so not have just no yes "
    "what do but with can like was are if we get ok its they at all im dont lmao one out up "
    "now how good know when time about there your then see gg bro thanks pls wait game server "
    "bot role channel anyone here today tomorrow why who again really new"
)
_COMMON = tuple(_COMMON_WORDS.split(" "))
_EMOJI = ("😂", "🔥", "👍", "❤️", "😭", "🎉", "👀", "💀", "✨", "🙏", "😅", "🤔", "😎", "🥲", "👋")
_STATUSES = ("online", "idle", "dnd", "online", "online")
_GAMES = ("Minecraft", "League of Legends", "Valorant", "Fortnite", "Counter-Strike 2",
          "Rocket League", "Genshin Impact", "Roblox", "Apex Legends", "Overwatch 2",
          "Terraria", "Stardew Valley", "Visual Studio Code", "Dota 2", "osu!")  # fmt: skip
_DOMAINS = ("youtube.com", "github.com", "twitter.com", "reddit.com", "imgur.com",
            "tenor.com", "wikipedia.org", "twitch.tv", "steamcommunity.com")  # fmt: skip


def _zipf_weights(n: int, s: float = 1.07) -> list[float]:
    return list(accumulate(1.0 / (k**s) for k in range(1, n + 1)))


class _World:
    """The made-up people, words and guild furniture that templates draw from."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        syllables = [c + v for c in "bcdfghjklmnprstvwyz" for v in ("a", "e", "i", "o", "u", "y")]
        words = {
            "".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
            for _ in range(6000)
        }
        self.words = sorted(words)
        rng.shuffle(self.words)
        self.word_cum = _zipf_weights(len(self.words))
        self.users = [self._user() for _ in range(600)]
        self.roles = [self.snowflake() for _ in range(40)]
        self.emoji = [(self.word(), self.snowflake()) for _ in range(60)]

    def snowflake(self, year_from: int = 2016) -> int:
        ms = self.rng.randrange((year_from - 2015) * 31_536_000_000, 11 * 31_536_000_000)
        return (ms << 22) | self.rng.getrandbits(22)

    def word(self) -> str:
        return self.words[bisect_right(self.word_cum, self.rng.random() * self.word_cum[-1])]

    def _user(self) -> dict[str, Any]:
        rng = self.rng
        name = self.word() + rng.choice(("", "", "_", ".", str(rng.randrange(100))))
        name += rng.choice(("", "", self.word()[:4], str(rng.randrange(10_000))))
        avatar = f"{rng.getrandbits(128):032x}" if rng.random() < 0.8 else None
        return {
            "username": name[:32],
            "public_flags": rng.choice((0, 0, 0, 64, 128, 256, 4194304)),
            "id": str(self.snowflake()),
            "global_name": name.title()[:32] if rng.random() < 0.7 else None,
            "discriminator": "0",
            "clan": None,
            "avatar_decoration_data": None,
            "avatar": avatar,
        }

    def user(self) -> dict[str, Any]:
        return self.users[int(len(self.users) * self.rng.random() ** 2)]  # some talk more

    def text(self, mentions: list[dict[str, Any]]) -> str:
        rng = self.rng
        length = min(int(rng.lognormvariate(2.1, 0.9)) + 1, 350)
        out: list[str] = []
        for _ in range(length):
            roll = rng.random()
            if roll < 0.45:
                out.append(rng.choice(_COMMON))
            elif roll < 0.90:
                out.append(self.word())
            elif roll < 0.94:
                out.append(rng.choice(_EMOJI))
            elif roll < 0.96:
                name, emoji_id = rng.choice(self.emoji)
                out.append(f"<:{name}:{emoji_id}>")
            elif roll < 0.98:
                out.append(str(rng.randrange(10_000)))
            else:
                out.append(f"https://{rng.choice(_DOMAINS)}/{self.word()}/{rng.getrandbits(40):x}")
        for user in mentions:
            out.insert(rng.randrange(len(out) + 1), f"<@{user['id']}>")
        text = " ".join(out)
        if rng.random() < 0.3:
            text = text.capitalize() + rng.choice((".", "!", "?", "!!", "...", ""))
        if rng.random() < 0.05:
            text = "\n".join(text[i : i + 80] for i in range(0, len(text), 80))
        return text

    def member(self, user: dict[str, Any] | None = None) -> dict[str, Any]:
        rng = self.rng
        member: dict[str, Any] = {
            "roles": [str(r) for r in rng.sample(self.roles, rng.choice((0, 1, 1, 2, 3, 5)))],
            "premium_since": None,
            "pending": False,
            "nick": self.word().title() if rng.random() < 0.2 else None,
            "mute": False,
            "joined_at": events.iso_timestamp(events.snowflake_time_ms(self.snowflake())),
            "flags": 0,
            "deaf": False,
            "communication_disabled_until": None,
            "banner": None,
            "avatar": None,
        }
        if user is not None:
            member["user"] = user
        return member


def _message(world: _World, *, update: bool = False) -> dict[str, Any]:
    rng = world.rng
    mentions = [world.user() for _ in range(rng.choice((0,) * 8 + (1, 1, 2)))]
    d: dict[str, Any] = {
        "type": 0,
        "tts": False,
        "timestamp": TS,
        "pinned": False,
        "mentions": [{**m, "member": world.member()} for m in mentions],
        "mention_roles": [],
        "mention_everyone": False,
        "member": world.member(),
        "id": ID,
        "flags": 0,
        "embeds": [],
        "edited_timestamp": TS if update else None,
        "content": world.text(mentions),
        "components": [],
        "channel_type": 0,
        "channel_id": C,
        "author": world.user(),
        "attachments": [],
        "guild_id": G,
    }
    if not update:
        d["nonce"] = N
    if rng.random() < 0.10:
        d["type"] = 19
        d["message_reference"] = {"type": 0, "channel_id": C, "message_id": str(world.snowflake())}
        d["referenced_message"] = {k: v for k, v in _message(world).items() if k != "nonce"}
        d["referenced_message"]["id"] = str(world.snowflake())
        d["referenced_message"]["timestamp"] = events.iso_timestamp(1_700_000_000_000)
    if rng.random() < 0.10:
        d["embeds"].append(_embed(world))
    if rng.random() < 0.05:
        name = world.word() + rng.choice((".png", ".jpg", ".gif", ".mp4", ".txt"))
        file_id = world.snowflake()
        d["attachments"].append(
            {
                "id": str(file_id),
                "filename": name,
                "size": rng.randrange(1_000, 8_000_000),
                "url": f"https://cdn.discordapp.com/attachments/{file_id}/{name}",
                "proxy_url": f"https://media.discordapp.net/attachments/{file_id}/{name}",
                "width": rng.randrange(200, 4000),
                "height": rng.randrange(200, 4000),
                "content_type": "image/png",
            }
        )
    return d


def _embed(world: _World) -> dict[str, Any]:
    rng = world.rng
    url = f"https://{rng.choice(_DOMAINS)}/{world.word()}/{rng.getrandbits(48):x}"
    return {
        "type": rng.choice(("link", "video", "article", "rich")),
        "url": url,
        "title": world.text([])[:120],
        "description": world.text([])[:400],
        "color": rng.getrandbits(24),
        "provider": {"name": url.split("/")[2].split(".", 1)[0].title()},
        "thumbnail": {
            "url": url + "/thumb.jpg",
            "proxy_url": f"https://images-ext-1.discordapp.net/external/{rng.getrandbits(160):x}",
            "width": 1280,
            "height": 720,
        },
    }


def _typing(world: _World) -> dict[str, Any]:
    user = world.user()
    return {
        "user_id": user["id"],
        "timestamp": TSU,
        "member": world.member(user),
        "channel_id": C,
        "guild_id": G,
        "id": ID,
    }


def _presence(world: _World) -> dict[str, Any]:
    rng = world.rng
    status = rng.choice(_STATUSES)
    activities: list[dict[str, Any]] = []
    if rng.random() < 0.5:
        game = rng.choice(_GAMES)
        activities.append(
            {
                "type": 0,
                "name": game,
                "id": f"{rng.getrandbits(64):x}",
                "created_at": 1_700_000_000_000 + rng.randrange(10**9),
                "timestamps": {"start": 1_700_000_000_000 + rng.randrange(10**9)},
                "application_id": str(world.snowflake()),
                "details": world.text([])[:60] if rng.random() < 0.5 else None,
            }
        )
    if rng.random() < 0.2:
        activities.append(
            {
                "type": 2,
                "name": "Spotify",
                "id": "spotify:1",
                "details": world.text([])[:50],
                "state": world.word().title() + "; " + world.word().title(),
                "sync_id": f"{rng.getrandbits(110):x}",
                "party": {"id": f"spotify:{world.user()['id']}"},
                "assets": {"large_image": f"spotify:ab67616d0000b273{rng.getrandbits(96):x}"},
            }
        )
    return {
        "user": {"id": world.user()["id"]},
        "status": status,
        "guild_id": G,
        "client_status": {rng.choice(("desktop", "mobile", "web")): status},
        "activities": activities,
        "id": ID,
    }


def _member_update(world: _World) -> dict[str, Any]:
    member = world.member(world.user())
    return {**member, "guild_id": G, "id": ID}


def _reaction(world: _World) -> dict[str, Any]:
    rng = world.rng
    user = world.user()
    if rng.random() < 0.6:
        emoji: dict[str, Any] = {"name": rng.choice(_EMOJI), "id": None}
    else:
        name, emoji_id = rng.choice(world.emoji)
        emoji = {"name": name, "id": str(emoji_id)}
    return {
        "user_id": user["id"],
        "type": 0,
        "message_id": str(world.snowflake()),
        "message_author_id": world.user()["id"],
        "member": world.member(user),
        "emoji": emoji,
        "channel_id": C,
        "burst": False,
        "guild_id": G,
        "id": ID,
    }


def _guild_create(world: _World) -> dict[str, Any]:
    rng = world.rng
    count = int(rng.choice((300, 700, 1500, 3000)) * (0.5 + rng.random()))
    members = [world.member(world.user()) for _ in range(count)]
    channels: list[dict[str, Any]] = [
        {
            "id": str(world.snowflake()),
            "type": rng.choice((0, 0, 0, 2, 4, 5, 13, 15)),
            "name": "-".join(world.word() for _ in range(rng.choice((1, 2, 3)))),
            "position": i,
            "parent_id": None,
            "topic": world.text([])[:200] if rng.random() < 0.4 else None,
            "nsfw": False,
            "rate_limit_per_user": 0,
            "last_message_id": str(world.snowflake()),
            "permission_overwrites": [],
            "flags": 0,
        }
        for i in range(rng.randrange(10, 120))
    ]
    return {
        "id": ID,
        "name": " ".join(world.word() for _ in range(rng.choice((1, 2, 3)))).title(),
        "icon": f"{rng.getrandbits(128):032x}",
        "description": world.text([])[:200],
        "owner_id": world.user()["id"],
        "unavailable": False,
        "large": True,
        "member_count": count * 7,
        "joined_at": TS,
        "preferred_locale": "en-US",
        "features": ["COMMUNITY", "NEWS", "INVITE_SPLASH"],
        "roles": [
            {"id": str(r), "name": world.word(), "color": rng.getrandbits(24), "position": i}
            for i, r in enumerate(world.roles)
        ],
        "channels": channels,
        "members": members,
        "presences": [_presence(world) | {"guild_id": None} for _ in range(count // 4)],
        "emojis": [{"name": n, "id": str(i), "animated": False} for n, i in world.emoji],
        "voice_states": [],
        "threads": [],
        "stickers": [],
    }


_BUILDERS: Final[dict[str, Callable[[_World], dict[str, Any]]]] = {
    "MESSAGE_CREATE": _message,
    "MESSAGE_UPDATE": functools.partial(_message, update=True),
    "TYPING_START": _typing,
    "PRESENCE_UPDATE": _presence,
    "GUILD_MEMBER_UPDATE": _member_update,
    "MESSAGE_REACTION_ADD": _reaction,
    "GUILD_CREATE": _guild_create,
}


def _template(event: str, d: dict[str, Any]) -> str:
    text = events.dumps(d).decode().replace("%", "%%")
    for marker, field in _MARKERS:
        text = text.replace(marker, field)
    return '{"t":"%s","s":%%(s)d,"op":0,"d":%s}' % (event, text)  # noqa: UP031


@dataclass(frozen=True, slots=True)
class Template:
    event: str
    text: str
    channel_offset: int


class Corpus:
    """``pool`` templates drawn from :data:`MIX` with ``random.Random(seed)``."""

    def __init__(self, seed: int = 0, pool: int = 4096) -> None:
        rng = random.Random(seed)
        world = _World(rng)
        names = [name for name, _ in MIX]
        weights = [w for _, w in MIX]
        picks = rng.choices(names, weights, k=pool)
        if "GUILD_CREATE" not in picks:  # "now and then": at least one in every pool
            picks[rng.randrange(pool)] = "GUILD_CREATE"
        self.seed = seed
        self.templates = [
            Template(name, _template(name, _BUILDERS[name](world)), rng.randrange(1, 9))
            for name in picks
        ]
        self._rng = random.Random(seed + 1)
        self._ts_cache: tuple[int, str] = (-1, "")
        self._allowed: dict[int, list[int]] = {}

    def pick(self, intents: int = -1) -> int:
        """A template index for a session with ``intents`` (-1: any event type)."""
        allowed = self._allowed.get(intents)
        if allowed is None:
            allowed = [
                i
                for i, t in enumerate(self.templates)
                if intents == -1 or INTENT_OF[t.event] & intents
            ] or list(range(len(self.templates)))
            self._allowed[intents] = allowed
        return allowed[int(self._rng.random() * len(allowed))]

    def event(self, index: int) -> str:
        return self.templates[index].event

    def encode(self, seq: int, uid: int, index: int, guild_id: int) -> bytes:
        """The full payload of template ``index`` for event ``uid`` in ``guild_id``."""
        template = self.templates[index]
        ms = (uid >> 22) + events.DISCORD_EPOCH_MS
        cached_ms, iso = self._ts_cache
        if cached_ms != ms:
            iso = events.iso_timestamp(ms)
            self._ts_cache = (ms, iso)
        fields = {
            "s": seq,
            "id": uid,
            "g": guild_id,
            "c": guild_id + template.channel_offset,
            "ts": iso,
            "n": (uid * 0x9E3779B97F4A7C15) & 0x7FFF_FFFF_FFFF_FFFF,
            "tsu": ms // 1000,
        }
        return (template.text % fields).encode()


@functools.lru_cache(maxsize=4)
def corpus(seed: int = 0, pool: int = 4096) -> Corpus:
    """The pool for ``seed`` (built once per process: it takes a second or so)."""
    return Corpus(seed, pool)


def _percentile(sorted_sizes: list[int], fraction: float) -> int:
    return sorted_sizes[min(len(sorted_sizes) - 1, int(fraction * len(sorted_sizes)))]


def measure(payloads: list[bytes], level: int = 3) -> dict[str, Any]:
    """Wire figures of a stream of gateway payloads: per-message zstd-stream and zlib-stream
    bytes (one compressor for the whole stream, a flush per message, as Discord does) against
    the JSON bytes, and the JSON size distribution."""
    zstd = new_zstd_compressor(level)
    deflate = zlib.compressobj()
    json_bytes = zstd_bytes = zlib_bytes = 0
    for payload in payloads:
        json_bytes += len(payload)
        zstd_bytes += len(zstd.compress(payload) + zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        zlib_bytes += len(deflate.compress(payload) + deflate.flush(zlib.Z_SYNC_FLUSH))
    sizes = sorted(len(p) for p in payloads)
    count = len(payloads)
    return {
        "events": count,
        "json_bytes_per_event": round(json_bytes / count, 1),
        "zstd_bytes_per_event": round(zstd_bytes / count, 1),
        "zstd_ratio": round(json_bytes / zstd_bytes, 2),
        "zlib_ratio": round(json_bytes / zlib_bytes, 2),
        "p50": _percentile(sizes, 0.50),
        "p90": _percentile(sizes, 0.90),
        "p99": _percentile(sizes, 0.99),
        "max": sizes[-1],
    }


FIXED_TIME_MS: Final = 1_767_225_600_000
"""2026-01-01T00:00:00Z: the clock of :func:`profile_stream`, so figures repeat."""


def profile_stream(config: SimulatorConfig, count: int, guilds: int = 50) -> list[bytes]:
    """``count`` payloads as one session of ``config``'s profile would get them, every
    intent on: the stream :func:`measure` reads."""
    ids = events.SnowflakeGenerator(now_ms=FIXED_TIME_MS)  # the same ids every run
    factory = events.MessageFactory(events.guild_ids_for_shard(0, 1, guilds))
    out = []
    if config.profile == "realistic":
        pool = corpus(config.seed, config.corpus_pool)
        for seq in range(1, count + 1):
            uid = ids.take()
            out.append(pool.encode(seq, uid, pool.pick(), factory.guild_for(uid)))
    else:
        rng = random.Random(config.seed)
        sizes = [s for s, _ in config.size_mix]
        weights = [w for _, w in config.size_mix]
        for seq, size in enumerate(rng.choices(sizes, weights, k=count), 1):
            out.append(factory.encode(seq, ids.take(), size))
    return out


def measure_profile(config: SimulatorConfig, count: int) -> dict[str, Any]:
    """:func:`measure` of ``count`` events of ``config``'s profile (``--measure-corpus``)."""
    return {
        "profile": config.profile,
        "seed": config.seed,
        **measure(profile_stream(config, count)),
    }
