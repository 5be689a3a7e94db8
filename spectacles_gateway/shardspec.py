"""Shard id specs as written on the command line and in ``DISCORD_SHARD_IDS``.

A spec is a comma-separated list of ids and inclusive ranges: ``"3"``, ``"0-15"``,
``"0,2,4-7"``. Spaces around items are allowed; duplicates and overlaps are merged. Pure
functions; :class:`ShardSpecError` is a :class:`ValueError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MAX_SHARD_ID", "ShardSpecError", "format_shard_spec", "parse_shard_spec"]

#: Sanity bound so that a typo such as ``0-1000000000`` fails instead of filling memory.
#: The largest bots run a few tens of thousands of shards.
MAX_SHARD_ID = 1_000_000

_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+))?")


class ShardSpecError(ValueError):
    """The text is not a shard spec."""


def _id(text: str, spec: str) -> int:
    value = int(text)
    if value > MAX_SHARD_ID:
        raise ShardSpecError(f"shard id {value} in {spec!r} is too large (at most {MAX_SHARD_ID})")
    return value


def parse_shard_spec(spec: str) -> tuple[int, ...]:
    """Return the ids that ``spec`` names, sorted and without duplicates.

    >>> parse_shard_spec("4-6,0,5")
    (0, 4, 5, 6)
    """
    if not spec.strip():
        raise ShardSpecError("empty shard spec: expected ids and ranges such as 0-15 or 0,2,4-7")
    ids: set[int] = set()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ShardSpecError(f"empty item in shard spec {spec!r}")
        match = _ITEM.fullmatch(item)
        if match is None:
            raise ShardSpecError(
                f"invalid item {item!r} in shard spec {spec!r}: "
                "expected an id (3) or a range (0-15)"
            )
        first = _id(match.group(1), spec)
        last = first if match.group(2) is None else _id(match.group(2), spec)
        if last < first:
            raise ShardSpecError(f"descending range {item!r} in shard spec {spec!r}")
        ids.update(range(first, last + 1))
    return tuple(sorted(ids))


def format_shard_spec(ids: Iterable[int]) -> str:
    """The shortest spec for ``ids``: ``(0, 1, 2, 3, 5)`` -> ``"0-3,5"``; empty -> ``""``."""
    parts: list[str] = []
    ordered = sorted(set(ids))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
