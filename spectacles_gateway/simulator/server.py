"""A local Discord gateway (v10, JSON) that behaves like Discord on the wire.

One TCP port serves both the REST discovery endpoint (``GET /api/v10/gateway/bot``) and the
websocket gateway, on two paths: ``/`` (what ``/gateway/bot`` returns) and ``/resume-gw``
(READY's ``resume_gateway_url``). The rules enforced are those of ``discord.md``; every breach
is recorded in :attr:`Simulator.ledger` as a violation string as well as acted upon the way
Discord would (close code, op 9, …).

This module is the facade; the parts are :mod:`.connection` (compression and framing of one
websocket), :mod:`.sessions` (sessions and their replay), :mod:`.gateway` (the node's state and
a connection's lifecycle), :mod:`.rules` (what each client payload gets), :mod:`.faults`,
:mod:`.rest` and :mod:`.controls` (HTTP), :mod:`.traffic` and :mod:`.corpus` (generated
events), :mod:`.guilds` (a growing bot). ``websockets`` handles the opening handshake,
reading client frames and the closing handshake.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from spectacles_gateway.simulator import controls, events, faults, sockets, tls
from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.faults import Fault, RestFault
from spectacles_gateway.simulator.gateway import Gateway
from spectacles_gateway.simulator.guilds import GuildWorld
from spectacles_gateway.simulator.ledger import (
    FaultRecord,
    Ledger,
)
from spectacles_gateway.simulator.rest import RESUME_PATH, Rest
from spectacles_gateway.simulator.rules import IdentifyLimits, Rules, is_int
from spectacles_gateway.simulator.traffic import Traffic

__all__ = ["RESUME_PATH", "Simulator", "SimulatorConfig"]

logger = logging.getLogger(__name__)


def _normalize_uid(value: Any) -> str | int | None:
    if is_int(value):
        return int(value) if 0 < value < 2**63 else str(value)
    if isinstance(value, str) and value:
        if value.isdigit() and 0 < int(value) < 2**63 and str(int(value)) == value:
            return int(value)
        return value
    return None


# --- the simulator ---------------------------------------------------------------------------


class Simulator:
    """The simulated gateway. ``async with Simulator(config) as sim: ...``.

    All methods must be called from the event loop the simulator was started on.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.ledger = Ledger()
        self.http_base = ""
        self.gateway_url = ""
        self.resume_url = ""
        self.port = 0
        self.tls_ca_file = ""
        """With ``tls=True``: the PEM file clients must trust (the certificate itself)."""
        self._server: Server | None = None
        self._other: Server | None = None
        self._cert: tls.Certificate | None = None
        self._gw = Gateway(self.config, self.ledger)
        self._limits = IdentifyLimits(self.config)
        self._rules = Rules(self._gw, self._limits)
        self._rest = Rest(self._gw, self._limits)
        self._traffic = Traffic(self.config, self._gw.table, self._gw.ids.take)
        if self.config.growing:
            world = GuildWorld(
                self.config, self._gw.table, self.ledger, self._gw.ids.take, self._traffic.corpus
            )
            world.on_first_owner = self._traffic.start_guild
            self._traffic.emit_guild = world.emit
            self._gw.guilds = world
        self._rest.controls.update(controls.endpoints(self))

    # -- lifecycle --

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        cfg = self.config
        sockets.raise_open_files(cfg.expected_connections or 2 * cfg.shard_count)
        ssl_context = None
        if cfg.tls:
            self._cert = tls.self_signed(cfg.host, cfg.other_host)
            self.tls_ca_file = str(self._cert.cert_file)
            ssl_context = self._cert.server_context()
        sock = sockets.bind(cfg.host, cfg.port)
        self.port = sock.getsockname()[1]
        host = sockets.url_host(cfg.host)
        http, ws = ("https", "wss") if cfg.tls else ("http", "ws")
        self.http_base = f"{http}://{host}:{self.port}/api/v10"
        self.gateway_url = f"{ws}://{host}:{self.port}/"
        self.resume_url = f"{ws}://{host}:{self.port}{RESUME_PATH}"
        self._gw.gateway_url, self._gw.resume_url = self.gateway_url, self.resume_url
        self._server = await self._serve(sock, self._rest, "main", ssl_context)
        if cfg.other_host:
            await self._start_other(cfg.other_host)
        self._traffic.start()
        logger.info(
            "simulator listening on %s (shards=%d, max_concurrency=%d, rate=%s, profile=%s)",
            self.gateway_url,
            cfg.shard_count,
            cfg.max_concurrency,
            cfg.rate,
            cfg.profile,
        )

    async def _serve(
        self, sock: socket.socket, rest: Rest, listener: str, ssl_context: ssl.SSLContext | None
    ) -> Server:
        secure = ssl_context is not None
        return await serve(
            functools.partial(self._handle, listener=listener, secure=secure),
            sock=sock,
            ssl=ssl_context,
            process_request=rest.process_request,
            compression=None,
            ping_interval=None,
            ping_timeout=None,
            close_timeout=self.config.close_timeout,
            max_size=16 * 2**20,
            server_header="spectacles-simulator",
        )

    async def _start_other(self, other_host: str) -> None:
        """The second, plain listener ("another host") for redirect and ``ws://`` faults."""
        try:
            sock = sockets.bind(other_host, 0)
        except OSError as exc:
            logger.warning("no listener on other_host %s: %s", other_host, exc)
            return
        rest = Rest(self._gw, self._limits, listener="other")
        self._other = await self._serve(sock, rest, "other", None)
        base = f"{sockets.url_host(other_host)}:{sock.getsockname()[1]}"
        self._gw.other_http_base = f"http://{base}"
        self._gw.other_gateway_url = f"ws://{base}/"

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        self._traffic.stop()
        self._gw.cancel_timers()
        servers = [server] if self._other is None else [server, self._other]
        self._other = None
        for each in servers:
            each.close(close_connections=True)
        for each in servers:
            await each.wait_closed()
        await self._gw.reap()
        if self._cert is not None:
            self._cert.remove()
            self._cert = None
        logger.info("simulator stopped")

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- public controls --

    def dispatch(self, shard_id: int, event: str, d: dict[str, Any] | bytes) -> int:
        """Dispatch ``event`` on the shard's current session and return its seq.

        Written at once if the session is connected (and dispatch isn't paused), otherwise
        kept for the replay of the next RESUME, like Discord.
        """
        session = self._gw.table.current(shard_id)
        if isinstance(d, bytes | bytearray | memoryview):
            raw = bytes(d)
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            uid = _normalize_uid(parsed.get("id")) if isinstance(parsed, dict) else None
        else:
            raw = events.dumps(d)
            uid = _normalize_uid(d.get("id"))
        seq = self._gw.table.append(session, event, uid, lambda s: events.dispatch(event, s, raw))
        self._gw.table.flush(session)
        return seq

    def burst(self, shard_id: int, count: int, size: int = 1024) -> None:
        """Generate ``count`` events and write them to the socket in one write: the realistic
        profile's mix with ``profile="realistic"``, else MESSAGE_CREATEs of ``size``."""
        session = self._gw.table.current(shard_id)
        if session.conn is None:
            raise RuntimeError(f"shard {shard_id} has no connected session to burst into")
        if self._traffic.corpus is not None:
            self._traffic.generate(session, count)
            return
        first_uid = self._gw.ids.take(count)
        session.log.extend_generated(first_uid, count, size)
        self._gw.table.flush(session)

    def inject(self, shard_id: int, fault: Fault) -> None:
        """Apply ``fault`` to the shard's live connection(s) (those that identified/resumed)."""
        faults.inject(self._gw, shard_id, fault)

    def inject_rest(self, fault: RestFault) -> None:
        """Change the next ``/gateway/bot`` answer(s): :class:`GatewayBotRedirect`,
        :class:`InsecureGatewayUrl` (recorded in ``ledger.faults`` with ``shard_id=None``)."""
        self._rest.add_fault(fault)
        self.ledger.faults.append(FaultRecord(time.monotonic(), None, fault, []))

    def set_rate(self, rate: float) -> None:
        """Generated events per second per session from now on (new phases for all)."""
        self._traffic.set_rate(rate)

    # -- a growing bot --

    @property
    def recommended_shards(self) -> int:
        """The shard count ``/gateway/bot`` recommends."""
        return self._gw.recommended_shards

    def set_recommended_shards(self, shards: int) -> None:
        """Raise (or lower) the recommended shard count from now on (``POST
        /control/recommended_shards?shards=N``, ``--control URL --set-recommended-shards N``)."""
        if shards < 1:
            raise ValueError("the recommended shard count must be >= 1")
        logger.info("recommended shards: %d -> %d", self._gw.recommended_shards, shards)
        self._gw.recommended_shards = shards

    @property
    def guild_ids(self) -> list[int]:
        """A growing bot's guilds (empty without ``guilds``/``guild_ids``)."""
        return [] if self._gw.guilds is None else list(self._gw.guilds.ids)

    def guilds_of(self, shard_id: int, num_shards: int) -> list[int]:
        """The guilds shard ``[shard_id, num_shards]`` owns."""
        return [] if self._gw.guilds is None else list(self._gw.guilds.owned(shard_id, num_shards))

    def add_guilds(self, count: int) -> list[int]:
        """The bot joins ``count`` more guilds (GUILD_CREATE to their owners, streams start);
        returns their ids. ``POST /control/guilds?add=N``."""
        if self._gw.guilds is None:
            raise RuntimeError("add_guilds needs a growing bot (SimulatorConfig.guilds)")
        if count < 0:
            raise ValueError("count must be >= 0")
        return self._gw.guilds.add(count)

    def set_guild_rate(self, rate: float) -> None:
        """Events per second per guild from now on (``POST /control/guild_rate?rate=R``)."""
        self._traffic.set_guild_rate(rate)

    def set_session_start_limit(
        self,
        *,
        remaining: int | None = None,
        total: int | None = None,
        reset_after_ms: int | None = None,
    ) -> dict[str, int]:
        """Change ``session_start_limit`` now (every authenticated IDENTIFY spends one, a
        session started or refused with op 9 for its bucket; at 0, IDENTIFY gets op 9);
        returns the new ``/gateway/bot`` object. ``POST /control/session_start_limit``
        with ``remaining``, ``total``, ``reset_after`` (ms)."""
        return self._limits.set(remaining, total, reset_after_ms)

    def stats(self) -> dict[str, float]:
        """Open connections, attached sessions, and what the generator did since start:
        wake-ups, writes, events, events/s, writes that carried more than one event (it fell
        behind), skipped events, worst lateness. Also ``GET /control/stats``."""
        outcomes = [r.outcome for r in self.ledger.identifies]
        return {
            "recommended_shards": self._gw.recommended_shards,
            "guilds": len(self.guild_ids),
            "guild_events": len(self.ledger.guild_events),
            "session_starts_remaining": self.session_start_remaining,
            "connections": len(self._gw.conns),
            "sessions_attached": len(self._gw.table.attached),
            "identifies_ready": outcomes.count("ready"),
            "identifies_refused": len(outcomes) - outcomes.count("ready"),
            "resumes": len(self.ledger.resumes),
            "violations": len(self.ledger.violations),
            **self._traffic.stats.as_dict(),
        }

    def pause_dispatch(self) -> None:
        """Stop rate mode and hold every dispatch (queued with its seq) until resumed."""
        self._gw.table.paused = True

    def resume_dispatch(self) -> None:
        self._gw.table.paused = False
        for session in list(self._gw.table.attached.values()):
            self._gw.table.flush(session)
        self._traffic.restart()

    async def wait_for(
        self,
        predicate: Callable[[Ledger], bool],
        timeout: float,  # noqa: ASYNC109 - a plain deadline, part of the public API
    ) -> None:
        """Poll the ledger until ``predicate`` holds; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not predicate(self.ledger):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"ledger condition not met within {timeout} s")
            await asyncio.sleep(0.01)

    def session_ids(self, shard_id: int) -> list[str]:
        """Session ids created for a shard, oldest first."""
        return self._gw.table.ids_for(shard_id)

    def is_resumable(self, session_id: str) -> bool:
        session = self._gw.table.by_id.get(session_id)
        return session is not None and not self._gw.table.is_dead(session, time.monotonic())

    @property
    def session_start_remaining(self) -> int:
        self._limits.refresh(time.monotonic())
        return self._limits.remaining

    # -- internals: connection lifecycle --

    async def _handle(self, ws: ServerConnection, *, listener: str, secure: bool) -> None:
        conn, query = self._gw.accept(ws, listener, secure)
        try:
            self._gw.open(conn, query)
            while True:
                message = await ws.recv()
                self._rules.on_message(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self._gw.on_closed(conn)
