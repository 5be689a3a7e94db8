"""Intent names and bits (discord.md §10)."""

from __future__ import annotations

import functools
import operator

import pytest

from spectacles_gateway.intents import (
    ALIASES,
    ALL_INTENTS,
    INTENTS,
    NON_PRIVILEGED,
    PRIVILEGED,
    UnknownIntentError,
    closest_intent,
    intent_names,
    resolve_intents,
    undocumented_bits,
)

# discord.md §10, row by row: name, bit, privileged.
TABLE = [
    ("GUILDS", 0, False),
    ("GUILD_MEMBERS", 1, True),
    ("GUILD_MODERATION", 2, False),
    ("GUILD_EXPRESSIONS", 3, False),
    ("GUILD_INTEGRATIONS", 4, False),
    ("GUILD_WEBHOOKS", 5, False),
    ("GUILD_INVITES", 6, False),
    ("GUILD_VOICE_STATES", 7, False),
    ("GUILD_PRESENCES", 8, True),
    ("GUILD_MESSAGES", 9, False),
    ("GUILD_MESSAGE_REACTIONS", 10, False),
    ("GUILD_MESSAGE_TYPING", 11, False),
    ("DIRECT_MESSAGES", 12, False),
    ("DIRECT_MESSAGE_REACTIONS", 13, False),
    ("DIRECT_MESSAGE_TYPING", 14, False),
    ("MESSAGE_CONTENT", 15, True),
    ("GUILD_SCHEDULED_EVENTS", 16, False),
    ("AUTO_MODERATION_CONFIGURATION", 20, False),
    ("AUTO_MODERATION_EXECUTION", 21, False),
    ("GUILD_MESSAGE_POLLS", 24, False),
    ("DIRECT_MESSAGE_POLLS", 25, False),
]


@pytest.mark.parametrize(("name", "bit", "privileged"), TABLE)
def test_every_documented_name(name: str, bit: int, privileged: bool) -> None:
    assert resolve_intents([name]) == 1 << bit
    assert INTENTS[name] == 1 << bit
    assert bool(PRIVILEGED & (1 << bit)) is privileged


def test_table_is_complete() -> None:
    assert list(INTENTS) == [name for name, _, _ in TABLE]


@pytest.mark.parametrize(
    ("alias", "value"),
    [("GUILD_BANS", 4), ("GUILD_EMOJIS", 8), ("GUILD_EMOJIS_AND_STICKERS", 8)],
)
def test_aliases(alias: str, value: int) -> None:
    assert resolve_intents([alias]) == value
    assert INTENTS[ALIASES[alias]] == value


def test_constants() -> None:
    assert ALL_INTENTS == 53608447
    assert PRIVILEGED == 33026 == 2 | 256 | 32768
    assert NON_PRIVILEGED == 53575421
    assert functools.reduce(operator.or_, INTENTS.values()) == ALL_INTENTS
    assert resolve_intents(INTENTS) == ALL_INTENTS
    assert resolve_intents([*INTENTS, *ALIASES]) == ALL_INTENTS


@pytest.mark.parametrize(
    ("names", "value"),
    [
        ([], 0),
        (["GUILDS", "GUILD_MESSAGES"], 513),
        (["guilds", " guild_messages "], 513),  # case and spaces do not matter
        (["GUILDS", "", "  ", "GUILDS"], 1),  # empty names skipped, repeats harmless
        (["GUILD_BANS", "GUILD_MODERATION"], 4),
    ],
)
def test_resolve(names: list[str], value: int) -> None:
    assert resolve_intents(names) == value


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("GUILD_MESAGES", "GUILD_MESSAGES"),
        ("guild_precenses", "GUILD_PRESENCES"),
        ("MESSAGE_CONTENTS", "MESSAGE_CONTENT"),
        ("GUILD_EMOJI", "GUILD_EMOJIS"),
        ("NOPE", None),
    ],
)
def test_unknown_name(name: str, suggestion: str | None) -> None:
    with pytest.raises(UnknownIntentError) as info:
        resolve_intents(["GUILDS", name])
    assert info.value.name == name
    assert info.value.suggestion == suggestion
    assert closest_intent(name) == suggestion
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)
    if suggestion:
        assert f"did you mean {suggestion!r}" in str(info.value)


def test_names_from_bits() -> None:
    assert intent_names(0) == ()
    assert intent_names(513) == ("GUILDS", "GUILD_MESSAGES")
    assert intent_names(ALL_INTENTS) == tuple(INTENTS)
    assert intent_names(1 << 17) == ()


@pytest.mark.parametrize("bit", [17, 18, 19, 22, 23, 26, 40])
def test_undocumented_bits(bit: int) -> None:
    assert undocumented_bits(1 << bit) == 1 << bit
    assert undocumented_bits(ALL_INTENTS | 1 << bit) == 1 << bit


def test_documented_bits_are_not_undocumented() -> None:
    assert undocumented_bits(ALL_INTENTS) == 0
