"""A growing bot (issue 12): its guilds, which sessions own them, and the guild event streams.

Guild ``g`` belongs to shard ``(g >> 22) % num_shards`` of every shard count at once, so the
sessions of an old and a new generation (say ``[1, 4]`` and ``[5, 8]``) both own it. Each
guild emits ``guild_rate`` events per second once a session owning it has identified; every
event goes to every live session (attached, or detached but still resumable) whose shard
owns the guild, subject to its intents, and is recorded once in ``ledger.guild_events`` with
its emission time, so a test can check that each reached a consumer at least once and that no
guild's stream stopped.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Final

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.corpus import INTENT_OF, Corpus
from spectacles_gateway.simulator.ledger import GENERATED, Ledger
from spectacles_gateway.simulator.sessions import GUILD_KIND_BASE, Session, SessionTable

logger = logging.getLogger(__name__)

_FIRST_GUILD_MS: Final = 31_536_000_000  # guilds created from 2016 ...
_LAST_GUILD_MS: Final = 11 * 31_536_000_000  # ... to 2025


def _draw(rng: random.Random, count: int, exclude: set[int]) -> list[int]:
    ids: set[int] = set()
    while len(ids) < count:
        ms = rng.randrange(_FIRST_GUILD_MS, _LAST_GUILD_MS)
        guild_id = (ms << 22) | rng.getrandbits(22)
        if guild_id not in exclude:
            ids.add(guild_id)
    return sorted(ids)


def guild_ids(count: int, seed: int = 0) -> list[int]:
    """``count`` distinct, plausible guild snowflakes from ``seed``, spread over the shards
    of any shard count (their timestamps are random milliseconds)."""
    return _draw(random.Random(f"guilds:{seed}"), count, set())


class GuildWorld:
    """The bot's guilds, the sessions that own them and what each guild emits."""

    def __init__(
        self,
        config: SimulatorConfig,
        table: SessionTable,
        ledger: Ledger,
        take_ids: Callable[[int], int],
        corpus: Corpus | None,
    ) -> None:
        self.config = config
        self.table = table
        self.ledger = ledger
        self.ids = sorted(config.guild_ids) or guild_ids(config.guilds, config.seed)
        self.started: set[int] = set()
        """Guilds whose stream runs (from the first IDENTIFY of a session owning them)."""
        self.on_first_owner: Callable[[int], None] = lambda guild_id: None
        self._take_ids = take_ids
        self._corpus = corpus
        self._rng = random.Random(f"guild-events:{config.seed}")
        self._joins = random.Random(f"guilds-joined:{config.seed}")
        self._sizes = [s for s, _ in config.size_mix]
        self._weights = [w for _, w in config.size_mix]
        self._placement: dict[int, list[list[int]]] = {}
        self._owners: dict[int, dict[int, dict[str, Session]]] = {}
        table.guild_events = ledger.guild_events
        table.on_attach.append(self._attached)

    def owned(self, shard_id: int, num_shards: int) -> list[int]:
        """The guilds shard ``[shard_id, num_shards]`` owns."""
        placement = self._placement.get(num_shards)
        if placement is None:
            placement = [[] for _ in range(num_shards)]
            for guild_id in self.ids:
                placement[(guild_id >> 22) % num_shards].append(guild_id)
            self._placement[num_shards] = placement
        return placement[shard_id]

    def most_per_shard(self, num_shards: int) -> int:
        self.owned(0, num_shards)
        return max(len(p) for p in self._placement[num_shards])

    def _attached(self, session: Session) -> None:
        shards = self._owners.setdefault(session.num_shards, {})
        shards.setdefault(session.shard_id, {})[session.session_id] = session
        for guild_id in session.guild_ids:
            if guild_id not in self.started:
                self.started.add(guild_id)
                self.on_first_owner(guild_id)

    def owners(self, guild_id: int, now: float) -> list[Session]:
        """Live sessions whose shard owns ``guild_id`` (dead ones leave the index)."""
        out = []
        for num_shards, shards in self._owners.items():
            sessions = shards.get((guild_id >> 22) % num_shards)
            if not sessions:
                continue
            for session_id, session in list(sessions.items()):
                if self.table.is_dead(session, now):
                    del sessions[session_id]
                else:
                    out.append(session)
        return out

    def emit(self, guild_id: int) -> None:
        """One event in ``guild_id``, to every live session that owns it."""
        now = time.monotonic()
        uid = self._take_ids(1)
        if self._corpus is not None:
            template = self._corpus.pick()
            event = self._corpus.event(template)
            need = INTENT_OF[event]
        else:
            template = -self._rng.choices(self._sizes, self._weights)[0]
            event, need = GENERATED, 0
        log = self.ledger.guild_events
        row = log.add(uid, guild_id, now, template)
        owners = self.owners(guild_id, now)
        delivered = 0
        for session in owners:
            if need and not need & session.intents:
                continue
            session.log.append(event, uid, GUILD_KIND_BASE - row)
            self.table.flush(session)
            delivered += 1
        log.set_delivery(row, delivered, len(owners))

    def add(self, count: int) -> list[int]:
        """The bot joins ``count`` new guilds: each owning live session gets GUILD_CREATE
        (and the guild's stream starts). Returns the new ids."""
        fresh = _draw(self._joins, count, set(self.ids))
        self.ids = sorted([*self.ids, *fresh])
        self._placement.clear()
        now = time.monotonic()
        for guild_id in fresh:
            owners = self.owners(guild_id, now)
            for session in owners:
                session.guild_ids.append(guild_id)
                build = functools.partial(
                    events.guild_create,
                    guild_id=guild_id,
                    index=len(session.guild_ids) - 1,
                    large_threshold=50,
                )
                self.table.append_lazy(session, "GUILD_CREATE", None, build)
                self.table.flush(session)
            if owners:
                self.started.add(guild_id)
                self.on_first_owner(guild_id)
        logger.info("the bot joined %d guilds (%d in all)", len(fresh), len(self.ids))
        return fresh
