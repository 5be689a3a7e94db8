"""Gateway intents (Discord API v10): names, bits and the old names the seed's configs use.

See ``discord.md`` §10. Pure data and functions.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ALIASES",
    "ALL_INTENTS",
    "INTENTS",
    "NON_PRIVILEGED",
    "PRIVILEGED",
    "UnknownIntentError",
    "closest_intent",
    "intent_names",
    "resolve_intents",
    "undocumented_bits",
]

#: Current intent names and their bits, in bit order.
INTENTS: dict[str, int] = {
    "GUILDS": 1 << 0,
    "GUILD_MEMBERS": 1 << 1,  # privileged
    "GUILD_MODERATION": 1 << 2,
    "GUILD_EXPRESSIONS": 1 << 3,
    "GUILD_INTEGRATIONS": 1 << 4,
    "GUILD_WEBHOOKS": 1 << 5,
    "GUILD_INVITES": 1 << 6,
    "GUILD_VOICE_STATES": 1 << 7,
    "GUILD_PRESENCES": 1 << 8,  # privileged
    "GUILD_MESSAGES": 1 << 9,
    "GUILD_MESSAGE_REACTIONS": 1 << 10,
    "GUILD_MESSAGE_TYPING": 1 << 11,
    "DIRECT_MESSAGES": 1 << 12,
    "DIRECT_MESSAGE_REACTIONS": 1 << 13,
    "DIRECT_MESSAGE_TYPING": 1 << 14,
    "MESSAGE_CONTENT": 1 << 15,  # privileged
    "GUILD_SCHEDULED_EVENTS": 1 << 16,
    "AUTO_MODERATION_CONFIGURATION": 1 << 20,
    "AUTO_MODERATION_EXECUTION": 1 << 21,
    "GUILD_MESSAGE_POLLS": 1 << 24,
    "DIRECT_MESSAGE_POLLS": 1 << 25,
}

#: Old names still found in configs, mapped to the current name.
ALIASES: dict[str, str] = {
    "GUILD_BANS": "GUILD_MODERATION",
    "GUILD_EMOJIS": "GUILD_EXPRESSIONS",
    "GUILD_EMOJIS_AND_STICKERS": "GUILD_EXPRESSIONS",
}

#: Every documented intent OR'd together.
ALL_INTENTS = 53608447
#: GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT: must be enabled in the developer portal.
PRIVILEGED = 33026
#: Every documented intent that is not privileged.
NON_PRIVILEGED = ALL_INTENTS & ~PRIVILEGED


class UnknownIntentError(ValueError):
    """An intent name that is neither a current name nor an alias."""

    def __init__(self, name: str, suggestion: str | None) -> None:
        self.name = name
        self.suggestion = suggestion
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        super().__init__(f"unknown intent {name!r}{hint}")


def closest_intent(name: str) -> str | None:
    """The known name (current or alias) closest to ``name``, or None if none is close."""
    import difflib  # only for a name we do not know

    matches = difflib.get_close_matches(name.strip().upper(), [*INTENTS, *ALIASES], n=1, cutoff=0.6)
    return matches[0] if matches else None


def resolve_intents(names: Iterable[str]) -> int:
    """OR the bits of ``names`` (current names or aliases; case and spaces ignored).

    Empty names are skipped. Raises :class:`UnknownIntentError` for the first unknown name.
    """
    bits = 0
    for raw in names:
        name = raw.strip().upper()
        if not name:
            continue
        bit = INTENTS.get(ALIASES.get(name, name))
        if bit is None:
            raise UnknownIntentError(raw.strip(), closest_intent(name))
        bits |= bit
    return bits


def intent_names(bits: int) -> tuple[str, ...]:
    """The current names of the documented bits set in ``bits``, in bit order."""
    return tuple(name for name, bit in INTENTS.items() if bits & bit)


def undocumented_bits(bits: int) -> int:
    """The bits of ``bits`` that are not documented intents (Discord closes with 4013)."""
    return bits & ~ALL_INTENTS
