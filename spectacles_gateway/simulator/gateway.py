"""The simulated gateway node: its connections, its sessions, and the lifecycle of a connection
(HELLO, heartbeat timeout, server close, TCP drop, what a client's close means for its
session).

:class:`Gateway` is the state every other part acts on: the protocol rules (:mod:`.rules`), the
faults (:mod:`.faults`), the REST endpoints (:mod:`.rest`) and the generated traffic. It does
no I/O of its own beyond writing to and closing the connections it holds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.connection import Conn
from spectacles_gateway.simulator.ledger import ConnectionRecord, Ledger
from spectacles_gateway.simulator.sessions import SessionTable

if TYPE_CHECKING:
    from spectacles_gateway.simulator.guilds import GuildWorld

logger = logging.getLogger(__name__)

SUPPORTED_COMPRESSION: Final = ("zstd-stream", "zlib-stream")
INVALIDATING_SERVER_CODES: Final = frozenset({4003, 4004, 4007, 4009})
"""Server close codes after which the session cannot be resumed (discord.md §9)."""
INVALIDATING_CLIENT_CODES: Final = frozenset({1000, 1001})
SUPERSEDED_REASON: Final = "Session resumed on another connection"


def shard_label(conn: Conn) -> str:
    """The connection's shard for messages: its id, or ``?`` before IDENTIFY/RESUME."""
    return "?" if conn.shard_id is None else str(conn.shard_id)


class Gateway:
    """Connections, sessions and ids of one simulated gateway node (one event loop)."""

    def __init__(self, config: SimulatorConfig, ledger: Ledger) -> None:
        self.config = config
        self.ledger = ledger
        self.conns: dict[int, Conn] = {}
        self.table = SessionTable(config)
        self.ids = events.SnowflakeGenerator()
        self.user_id = self.ids.take()
        self.application_id = self.user_id
        self.gateway_url = ""
        self.resume_url = ""
        self.guilds: GuildWorld | None = None
        """A growing bot's guilds (``SimulatorConfig.guilds``), else None."""
        self.other_http_base = ""
        """``http://<other_host>:<port>`` of the second listener ("" when there is none)."""
        self.other_gateway_url = ""
        self.next_open: deque[Callable[[Conn], None]] = deque()
        """One-shot replacements for HELLO, applied to the next new connections in order."""
        self._conn_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._hello = events.hello(config.heartbeat_interval_ms, config.trace_name)

    @property
    def recommended_shards(self) -> int:
        """``/gateway/bot``'s ``shards``: ``config.shard_count``, which may change at run
        time (a growing bot; tests that assign it keep working)."""
        return self.config.shard_count

    @recommended_shards.setter
    def recommended_shards(self, shards: int) -> None:
        self.config.shard_count = shards

    # -- bookkeeping --

    def violation(self, text: str) -> None:
        """Record a breach of Discord's rules by a client (and log it)."""
        self.ledger.violations.append(text)
        logger.warning("violation: %s", text)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def later(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        """Call ``callback(*args)`` after ``delay`` s unless the gateway stops first."""

        def fire() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def live(self, shard_id: int) -> list[Conn]:
        """Open connections that identified or resumed as ``shard_id``."""
        return [c for c in self.conns.values() if c.shard_id == shard_id and not c.closing]

    def cancel_timers(self) -> None:
        """Cancel every timer; then the caller closes the server (and the sockets)."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for conn in list(self.conns.values()):
            self.cancel_hb(conn)

    async def reap(self) -> None:
        """Cancel and await what :meth:`spawn` started (after the sockets closed)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- a connection's lifecycle --

    def accept(
        self, ws: ServerConnection, listener: str = "main", secure: bool = False
    ) -> tuple[Conn, dict[str, str]]:
        """Register a new websocket connection; returns it and its query parameters."""
        assert ws.request is not None
        split = urlsplit(ws.request.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        compress = query.get("compress")
        record = ConnectionRecord(
            conn_id=next(self._conn_ids),
            path=split.path,
            query=query,
            compression=compress if compress in SUPPORTED_COMPRESSION else None,
            opened_at=time.monotonic(),
            listener=listener,
            secure=secure,
        )
        conn = Conn(record.conn_id, ws, record, self.config)
        self.conns[conn.id] = conn
        self.ledger.connections.append(record)
        return conn, query

    def open(self, conn: Conn, query: dict[str, str]) -> None:
        """Check the query string, then send HELLO (or op 7 when one was injected)."""
        version = query.get("v", "")
        if not version.isdigit() or int(version) not in self.config.api_versions:
            self.violation(f"4012 invalid API version {version!r} (conn {conn.id})")
            self.server_close(conn, 4012, "Invalid API version")
            return
        encoding = query.get("encoding", "json")
        if encoding != "json":
            self.violation(f"4002 unsupported encoding {encoding!r} (conn {conn.id})")
            self.server_close(conn, 4002, "Only encoding=json is simulated")
            return
        compress = query.get("compress")
        if compress is not None and compress not in SUPPORTED_COMPRESSION:
            self.violation(f"unknown compress {compress!r} (conn {conn.id}): not compressing")
        if self.next_open:
            self.next_open.popleft()(conn)
            return
        conn.write([self._hello])
        self.arm_hb(conn)

    def server_close(self, conn: Conn, code: int, reason: str) -> None:
        """Close with ``code`` (closing handshake); 4003/4004/4007/4009 kill the session."""
        if conn.closing:
            return
        conn.closing = True
        conn.record.server_close_code = code
        self.cancel_hb(conn)
        session = conn.session
        if session is not None:
            self.table.detach(session)
            if code in INVALIDATING_SERVER_CODES:
                session.invalidated = True
        logger.debug("conn %d: closing with %d (%s)", conn.id, code, reason)
        self.spawn(self._close_ws(conn.ws, code, reason))

    @staticmethod
    async def _close_ws(ws: ServerConnection, code: int, reason: str) -> None:
        try:
            await ws.close(code, reason)
        except Exception:  # the peer may vanish mid-close; the ledger already has the code
            logger.debug("error while closing", exc_info=True)

    def drop(self, conn: Conn) -> None:
        """Abort the TCP connection without a close frame; the session stays resumable."""
        if conn.closing:
            return
        conn.closing = True
        conn.dropped = True
        self.cancel_hb(conn)
        if conn.session is not None:
            self.table.detach(conn.session)
        conn.transport.abort()

    def supersede(self, old: Conn, new: Conn) -> None:
        """``new`` resumed the session ``old`` carries: close ``old`` with
        ``superseded_close_code`` (the closing handshake; a peer that does not answer is
        dropped after ``close_timeout``). ``ledger.overlap_seconds`` counts the time both
        were open."""
        old.record.superseded_by = new.id
        logger.info(
            "conn %d: session %s resumed on conn %d, closing this one",
            old.id,
            old.record.session_id,
            new.id,
        )
        if old.session is not None:
            self.table.detach(old.session)  # the session moves on: the code cannot kill it
        self.server_close(old, self.config.superseded_close_code, SUPERSEDED_REASON)

    def schedule_reconnect_close(self, conn: Conn) -> None:
        delay = self.config.reconnect_close_after
        if delay > 0:
            self.later(delay, self._close_if_open, conn, 4000, "Reconnect requested")

    def _close_if_open(self, conn: Conn, code: int, reason: str) -> None:
        if not conn.closing and conn.ws.protocol.state is State.OPEN:
            self.server_close(conn, code, reason)

    def cancel_hb(self, conn: Conn) -> None:
        if conn.hb_timer is not None:
            conn.hb_timer.cancel()
            conn.hb_timer = None

    def arm_hb(self, conn: Conn) -> None:
        """(Re)start the heartbeat timeout: 4009 after interval x factor without one."""
        factor = self.config.heartbeat_timeout_factor
        if factor <= 0 or conn.closing:
            return
        self.cancel_hb(conn)
        timeout = self.config.heartbeat_interval_ms / 1000 * factor
        conn.hb_timer = asyncio.get_running_loop().call_later(
            timeout, self._hb_expired, conn, timeout
        )

    def _hb_expired(self, conn: Conn, timeout: float) -> None:
        conn.hb_timer = None
        if conn.closing:
            return
        self.violation(
            f"4009 heartbeat timeout shard {shard_label(conn)}: no heartbeat for {timeout:.2f} s"
        )
        self.server_close(conn, 4009, "Session timed out")

    def on_closed(self, conn: Conn) -> None:
        """The connection is gone: record who closed it and what that means for its session."""
        self.cancel_hb(conn)
        self.conns.pop(conn.id, None)
        record = conn.record
        record.closed_at = time.monotonic()
        proto = conn.ws.protocol
        if proto.close_rcvd is not None:
            record.client_close_code = proto.close_rcvd.code
        client_first = proto.close_rcvd is not None and proto.close_rcvd_then_sent is not False
        if conn.dropped:
            record.closed_by = "server-drop"
        elif record.server_close_code is not None and not client_first:
            record.closed_by = "server"
        elif client_first:
            record.closed_by = "client"
        elif proto.close_sent is not None:
            record.closed_by = "server"
            record.server_close_code = proto.close_sent.code
        else:
            record.closed_by = "client-drop"
        conn.closing = True
        session = conn.session
        if session is not None:
            self.table.detach(session)
        owned = conn.owned_session
        if (
            owned is not None
            and record.closed_by == "client"
            and record.client_close_code in INVALIDATING_CLIENT_CODES
            and owned.conn is None
        ):
            owned.invalidated = True
        logger.debug(
            "conn %d closed by %s (client code %s, server code %s)",
            conn.id,
            record.closed_by,
            record.client_close_code,
            record.server_close_code,
        )
