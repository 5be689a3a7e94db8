"""Generations of shards: a reshard starts generation ``g + 1`` beside ``g``.

Each generation keeps its sessions under keys of its own (generation 0 under the seed's key
layout, ``<prefix><id>session``; generation ``g`` under ``<prefix>g<g>:<id>session``), so both
run side by side during a reshard without touching each other's sessions. Which generation is
current, and with how many shards, is the *generation pointer* ``<prefix>generation``
(``"<generation> <shard count>"``), written when a reshard switches and read at start-up, so a
restarted gateway resumes the generation that was running instead of the one in its settings.

``python -m spectacles_gateway.generation [settings arguments]`` prints the pointer as JSON
(``{}`` when there is none or no Redis store): the supervisor asks it at start-up, so that the
Redis client is never loaded into the supervisor itself.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "POINT_SCRIPT",
    "Pointer",
    "format_pointer",
    "parse_pointer",
    "pointer_key",
    "session_prefix",
]

#: The Lua that moves the pointer (KEYS: the pointer; ARGV: the new generation, the new value):
#: only ever forward, so a late writer of an older switch changes nothing. 1 when written.
POINT_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local generation = tonumber(string.match(current, '^(%d+) '))
  if generation and generation >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


class Pointer(NamedTuple):
    generation: int
    shard_count: int


def session_prefix(prefix: str, generation: int) -> str:
    """Where generation ``generation`` keeps its sessions."""
    return prefix if generation == 0 else f"{prefix}g{generation}:"


def pointer_key(prefix: str) -> str:
    return f"{prefix}generation"


def format_pointer(pointer: Pointer) -> str:
    return f"{pointer.generation} {pointer.shard_count}"


def parse_pointer(raw: bytes | str | None) -> Pointer | None:
    """The pointer's value, or None when it is absent or not a pointer."""
    if raw is None:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    parts = text.split()
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    generation, count = int(parts[0]), int(parts[1])
    return Pointer(generation, count) if count > 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    import asyncio
    import os

    from .config import load

    settings = load(list(sys.argv[1:] if argv is None else argv), os.environ).settings
    if settings.shard_store.type != "redis":
        print("{}")
        return 0
    from .redis_store import read_pointer

    pointer = asyncio.run(read_pointer(settings))
    print(json.dumps({} if pointer is None else pointer._asdict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
