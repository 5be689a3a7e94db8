"""Sessions and their replay: what the simulated Discord remembers between connections.

A session outlives its connections: dispatches are appended to its log with a seq whether a
connection is attached or not, written at once when one is, and replayed after a RESUME from
the client's seq. A session is dead once invalidated or after ``resume_window`` seconds
without a connection.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Final

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.connection import Conn, Payload
from spectacles_gateway.simulator.corpus import Corpus
from spectacles_gateway.simulator.ledger import DispatchLog, GuildEventLog

NOT_REPLAYED: Final = frozenset({"READY", "RESUMED"})
"""Dispatches a RESUME never replays (they belong to the connection that received them)."""

GUILD_KIND_BASE: Final = -(1 << 40)
"""A dispatch log's size slot at or below this holds a guild event: row ``BASE - size`` of
``ledger.guild_events``. Between it and 0: a realistic template ``-size - 1``; above 0: a
uniform MESSAGE_CREATE of that size; 0: a payload kept in ``Session.payloads``."""

Stored = Payload | Callable[[], bytes]
"""What ``Session.payloads`` keeps: the payload, or how to make it again (big ones)."""


class Session:
    """One gateway session: its shard, its dispatch log and the connection it is attached to."""

    __slots__ = (
        "conn",
        "created_at",
        "detached_at",
        "factory",
        "guild_ids",
        "intents",
        "invalidated",
        "log",
        "num_shards",
        "payloads",
        "session_id",
        "shard_id",
        "skip_replay",
    )

    def __init__(
        self,
        *,
        session_id: str,
        shard_id: int,
        num_shards: int,
        intents: int,
        guild_ids: list[int],
        created_at: float,
    ) -> None:
        self.session_id = session_id
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.intents = intents
        self.guild_ids = guild_ids
        self.created_at = created_at
        self.log = DispatchLog(session_id, shard_id)
        self.factory = events.MessageFactory(
            guild_ids or events.guild_ids_for_shard(shard_id, num_shards, 1)
        )
        self.payloads: dict[int, Stored] = {}
        self.skip_replay: set[int] = set()
        """Seqs a RESUME does not replay (sent once, then "lost" on Discord's side)."""
        self.conn: Conn | None = None
        self.detached_at: float | None = None
        self.invalidated = False


class SessionTable:
    """Every session by id and by shard, and which ones have a connection attached."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.by_id: dict[str, Session] = {}
        self.by_shard: dict[int, list[Session]] = {}
        self.attached: dict[str, Session] = {}
        self.paused = False
        """While True, dispatches are logged (with their seq) but not written."""
        self.corpus: Corpus | None = None
        """The realistic profile's templates, when it is on."""
        self.guild_events: GuildEventLog | None = None
        """The guild events of a growing bot (``ledger.guild_events``), when it is on."""
        self.on_attach: list[Callable[[Session], None]] = []
        """Called with each session that a connection (IDENTIFY or RESUME) attaches to."""

    def add(self, session: Session) -> None:
        self.by_id[session.session_id] = session
        self.by_shard.setdefault(session.shard_id, []).append(session)

    def current(self, shard_id: int) -> Session:
        """The shard's newest session that was not invalidated; LookupError if none."""
        for session in reversed(self.by_shard.get(shard_id, [])):
            if not session.invalidated:
                return session
        raise LookupError(f"shard {shard_id} has no session")

    def ids_for(self, shard_id: int) -> list[str]:
        return [s.session_id for s in self.by_shard.get(shard_id, [])]

    @staticmethod
    def append(
        session: Session, event: str, uid: str | int | None, build: Callable[[int], Payload]
    ) -> int:
        """Log a dispatch whose payload ``build(seq)`` makes; returns its seq."""
        seq = session.log.last_seq + 1
        session.payloads[seq] = build(seq)
        session.log.append(event, uid)
        return seq

    @staticmethod
    def append_lazy(
        session: Session, event: str, uid: str | int | None, build: Callable[[int], bytes]
    ) -> int:
        """Like :meth:`append`, but ``build(seq)`` runs at each write, not now (a payload
        that is big, or that many sessions get)."""
        seq = session.log.last_seq + 1
        session.payloads[seq] = functools.partial(build, seq)
        session.log.append(event, uid)
        return seq

    def payload(self, session: Session, seq: int) -> Payload:
        """The full payload of dispatch ``seq``: kept, or made again byte for byte (see
        :data:`GUILD_KIND_BASE` for how the log says which)."""
        stored = session.payloads.get(seq)
        if stored is not None:
            return stored() if callable(stored) else stored
        uid, kind = session.log.raw_uid(seq), session.log.size(seq)
        if kind > 0:
            return session.factory.encode(seq, uid, kind)
        if kind > GUILD_KIND_BASE:
            assert self.corpus is not None
            return self.corpus.encode(seq, uid, -kind - 1, session.factory.guild_for(uid))
        assert self.guild_events is not None
        row = GUILD_KIND_BASE - kind
        guild_id, template = self.guild_events.source(row)
        if template >= 0:
            assert self.corpus is not None
            return self.corpus.encode(seq, uid, template, guild_id)
        return session.factory.encode_in(seq, uid, -template, guild_id)

    def flush(self, session: Session, *, force: bool = False) -> None:
        """Write what the session logged since its last write, in one write."""
        conn = session.conn
        log = session.log
        if conn is None or (self.paused and not force):
            return
        start, end = log.written + 1, log.last_seq
        if start > end:
            return
        payload = self.payload
        if conn.write(payload(session, seq) for seq in range(start, end + 1)):
            log.written = end

    def attach(self, session: Session, conn: Conn) -> None:
        session.conn = conn
        session.detached_at = None
        conn.session = session
        conn.owned_session = session
        conn.shard_id = session.shard_id
        conn.record.shard_id = session.shard_id
        conn.record.session_id = session.session_id
        conn.record.attached_at = time.monotonic()
        self.attached[session.session_id] = session
        for listener in self.on_attach:
            listener(session)

    def detach(self, session: Session) -> None:
        conn = session.conn
        if conn is not None and conn.session is session:
            conn.session = None
        session.conn = None
        session.detached_at = time.monotonic()
        self.attached.pop(session.session_id, None)

    def is_dead(self, session: Session, now: float) -> bool:
        if session.invalidated:
            return True
        return (
            session.conn is None
            and session.detached_at is not None
            and now - session.detached_at > self.config.resume_window
        )

    def resume(self, session: Session, conn: Conn, client_seq: int) -> int:
        """Attach ``conn`` and write everything after ``client_seq`` (what was queued while
        away included), then RESUMED, in one write. Returns how many were replayed."""
        self.attach(session, conn)
        log = session.log
        skip = session.skip_replay
        replay = [
            s
            for s in range(client_seq + 1, log.last_seq + 1)
            if log.event(s) not in NOT_REPLAYED and s not in skip
        ]
        trace_name = self.config.trace_name
        resumed_seq = self.append(session, "RESUMED", None, lambda s: events.resumed(s, trace_name))
        payload = self.payload
        replayed = (payload(session, s) for s in (*replay, resumed_seq))
        if conn.write(replayed):
            log.written = resumed_seq
        self.flush(session)
        return len(replay)
