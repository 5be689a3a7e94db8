"""A reshard's new generation in standby (fleet.md, "Resharding without downtime"), pure.

In standby a shard publishes nothing, with one exception: the guilds of running shards Discord
refused for good (4011) have nobody else to publish them, so the standby shard that now holds
such a guild publishes its events (:class:`Cover`). It also tracks the guilds READY listed and
that have not arrived yet, so the switch waits for them.
"""

from __future__ import annotations

from typing import Final

import msgspec

from .envelope import DECODE_ERRORS, ReadyInfo, decode_guild, decode_guild_of

__all__ = ["GUILDS_INTENT", "GUILD_EVENTS", "Cover", "guild_arrived", "waited"]

#: Intent bit 0: without it Discord sends no GUILD_CREATE.
GUILDS_INTENT: Final = 1
#: What ends the wait for a guild READY listed.
GUILD_EVENTS: Final = frozenset({"GUILD_CREATE", "GUILD_DELETE"})


class Cover:
    """The running generation's ``shard_count`` and those of its ``shards`` that are gone for
    good: a dispatch is covered when its guild belonged to one of them. A guild's shard is
    ``(guild_id >> 22) % shard_count``; events of no guild (direct messages) are shard 0's."""

    __slots__ = ("shard_count", "shards")

    def __init__(self, shard_count: int, shards: frozenset[int]) -> None:
        self.shard_count = shard_count
        self.shards = shards

    def covers(self, t: str, d: msgspec.Raw) -> bool:
        shards = self.shards
        try:
            ref = decode_guild_of(d)
        except DECODE_ERRORS:
            return 0 in shards
        guild = ref.guild_id or (ref.id if t in GUILD_EVENTS or t == "GUILD_UPDATE" else None)
        if guild is None or not (guild.isascii() and guild.isdigit()):
            return 0 in shards
        return (int(guild) >> 22) % self.shard_count in shards


def waited(info: ReadyInfo, intents: int) -> set[str]:
    """The guilds READY listed that are still to arrive (none without the GUILDS intent:
    Discord sends no GUILD_CREATE then)."""
    return {g.id for g in info.guilds} if intents & GUILDS_INTENT else set()


def guild_arrived(guilds: set[str], d: msgspec.Raw) -> None:
    """A GUILD_CREATE or GUILD_DELETE: that guild is no longer waited for."""
    try:
        guilds.discard(decode_guild(d).id)
    except DECODE_ERRORS:
        return  # a malformed one is the consumer's business: it is published as it came
