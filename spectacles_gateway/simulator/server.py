"""A local Discord gateway (v10, JSON) that behaves like Discord on the wire.

One TCP port serves both the REST discovery endpoint (``GET /api/v10/gateway/bot``) and the
websocket gateway, on two paths: ``/`` (what ``/gateway/bot`` returns) and ``/resume-gw``
(READY's ``resume_gateway_url``). The rules enforced are those of ``discord.md``; every breach
is recorded in :attr:`Simulator.ledger` as a violation string as well as acted upon the way
Discord would (close code, op 9, …).

How bytes are compressed and framed is in :mod:`.connection`. ``websockets`` handles the
opening handshake, reading client frames and the closing handshake.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import random
import re
import secrets
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final, TypeGuard
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.connection import (
    PAYLOAD_ZLIB,
    PLAIN,
    Conn,
    new_zstd_compressor,
)
from spectacles_gateway.simulator.faults import (
    Close,
    CorruptCompressed,
    Drop,
    Fault,
    HeartbeatRequest,
    InvalidSession,
    MalformedJson,
    Op7BeforeHello,
    Reconnect,
    UnknownDispatch,
    UnknownOpcode,
    WithholdAcks,
)
from spectacles_gateway.simulator.gateway import Gateway, shard_label
from spectacles_gateway.simulator.ledger import (
    GENERATED,
    CommandRecord,
    FaultRecord,
    HeartbeatRecord,
    HttpRecord,
    IdentifyRecord,
    Ledger,
    ReceivedRecord,
    ResumeRecord,
)
from spectacles_gateway.simulator.sessions import Session

__all__ = [
    "Close",
    "CorruptCompressed",
    "Drop",
    "Fault",
    "HeartbeatRequest",
    "InvalidSession",
    "MalformedJson",
    "Op7BeforeHello",
    "Reconnect",
    "Simulator",
    "SimulatorConfig",
    "UnknownDispatch",
    "UnknownOpcode",
    "WithholdAcks",
    "new_zstd_compressor",
]

logger = logging.getLogger(__name__)

RESUME_PATH: Final = "/resume-gw"
COMMAND_OPS: Final = frozenset({3, 4, 8, 31, 43})
MAX_PAYLOAD_BYTES: Final = 4096
MEMBER_REQUEST_WINDOW: Final = 30.0
_SESSION_LIMIT_PERIOD = 86_400.0

_API_PATH = re.compile(r"/api(?:/v\d+)?/gateway(/bot)?")


def _json_response(status: int, obj: Any) -> Response:
    body = events.dumps(obj)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, body)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalize_uid(value: Any) -> str | int | None:
    if _is_int(value):
        return int(value) if 0 < value < 2**63 else str(value)
    if isinstance(value, str) and value:
        if value.isdigit() and 0 < int(value) < 2**63 and str(int(value)) == value:
            return int(value)
        return value
    return None


def _bind(host: str, port: int) -> socket.socket:
    """One listening socket on exactly ``host`` (never every address a name resolves to)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


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
        self._server: Server | None = None
        self._gw = Gateway(self.config, self.ledger)
        self._rate = self.config.rate
        self._bucket_last: dict[int, float] = {}
        self._remaining = self.config.session_start_remaining
        self._reset_at = time.monotonic() + self.config.session_start_reset_after_ms / 1000
        self._member_requests: dict[str, float] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._sizes = [s for s, _ in self.config.size_mix]
        self._weights = [w for _, w in self.config.size_mix]

    # -- lifecycle --

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        cfg = self.config
        sock = _bind(cfg.host, cfg.port)
        self.port = sock.getsockname()[1]
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.http_base = f"http://{host}:{self.port}/api/v10"
        self.gateway_url = f"ws://{host}:{self.port}/"
        self.resume_url = f"ws://{host}:{self.port}{RESUME_PATH}"
        self._gw.gateway_url, self._gw.resume_url = self.gateway_url, self.resume_url
        self._server = await serve(
            self._handle,
            sock=sock,
            process_request=self._process_request,
            compression=None,
            ping_interval=None,
            ping_timeout=None,
            close_timeout=cfg.close_timeout,
            max_size=16 * 2**20,
            server_header="spectacles-simulator",
        )
        self._wake = asyncio.Event()
        self._ticker = asyncio.create_task(self._tick_loop(), name="simulator ticker")
        logger.info(
            "simulator listening on %s (shards=%d, max_concurrency=%d, rate=%s)",
            self.gateway_url,
            cfg.shard_count,
            cfg.max_concurrency,
            self._rate,
        )

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        self._gw.cancel_timers()
        server.close(close_connections=True)
        await server.wait_closed()
        await self._gw.reap()
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
        """Generate ``count`` MESSAGE_CREATEs and write them to the socket in one write."""
        session = self._gw.table.current(shard_id)
        if session.conn is None:
            raise RuntimeError(f"shard {shard_id} has no connected session to burst into")
        first_uid = self._gw.ids.take(count)
        session.log.extend_generated(first_uid, count, size)
        self._gw.table.flush(session)

    def inject(self, shard_id: int, fault: Fault) -> None:
        """Apply ``fault`` to the shard's live connection(s) (those that identified/resumed)."""
        targets = self._gw.live(shard_id)
        self.ledger.faults.append(
            FaultRecord(time.monotonic(), shard_id, fault, [c.id for c in targets])
        )
        if isinstance(fault, Op7BeforeHello):
            self._gw.op7_pending.append(shard_id)
            return
        if not targets:
            logger.warning("inject %r: shard %d has no live connection", fault, shard_id)
        for conn in targets:
            self._apply_fault(conn, fault)

    def set_rate(self, rate: float) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self._rate = rate
        if self._wake is not None:
            self._wake.set()

    def pause_dispatch(self) -> None:
        """Stop rate mode and hold every dispatch (queued with its seq) until resumed."""
        self._gw.table.paused = True

    def resume_dispatch(self) -> None:
        self._gw.table.paused = False
        for session in list(self._gw.table.attached.values()):
            self._gw.table.flush(session)
        if self._wake is not None:
            self._wake.set()

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
        self._refresh_session_limit(time.monotonic())
        return self._remaining

    # -- internals: sessions and writes --

    def _generate(self, session: Session, count: int) -> None:
        if len(self._sizes) == 1:
            session.log.extend_generated(self._gw.ids.take(count), count, self._sizes[0])
        else:
            first = self._gw.ids.take(count)
            sizes = random.choices(self._sizes, self._weights, k=count)
            for i, size in enumerate(sizes):
                session.log.append(GENERATED, first + i, size)
        self._gw.table.flush(session)

    async def _tick_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            if not self._rate_active():
                self._wake.clear()
                await self._wake.wait()
                last = loop.time()
                for session in self._gw.table.attached.values():
                    session.credit = 0.0
                continue
            await asyncio.sleep(self.config.tick)
            now = loop.time()
            elapsed, last = min(now - last, 1.0), now
            if not self._rate_active():
                continue
            for session in list(self._gw.table.attached.values()):
                session.credit += self._rate * elapsed
                count = int(session.credit)
                if count:
                    session.credit -= count
                    self._generate(session, count)

    def _rate_active(self) -> bool:
        return self._rate > 0 and not self._gw.table.paused

    def _refresh_session_limit(self, now: float) -> None:
        while now >= self._reset_at:
            self._remaining = self.config.session_start_total
            self._reset_at += _SESSION_LIMIT_PERIOD

    # -- internals: connection lifecycle --

    def _refuse(
        self,
        conn: Conn,
        record: IdentifyRecord | ResumeRecord,
        code: int,
        reason: str,
        violation: str,
    ) -> None:
        """Close an IDENTIFY or RESUME attempt with ``code`` and record why."""
        record.outcome = f"close {code}"
        self._gw.violation(violation)
        self._gw.server_close(conn, code, reason)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        path = path.rstrip("/") or "/"
        match = _API_PATH.fullmatch(path)
        if match is not None:
            response = self._http(match.group(1) is not None, request)
            self.ledger.http.append(
                HttpRecord(time.monotonic(), "GET", request.path, response.status_code)
            )
            return response
        if path in ("/", RESUME_PATH):
            return None
        self.ledger.http.append(HttpRecord(time.monotonic(), "GET", request.path, 404))
        return _json_response(404, {"message": "404: Not Found", "code": 0})

    def _http(self, bot: bool, request: Request) -> Response:
        if not bot:
            return _json_response(200, {"url": self.gateway_url})
        if request.headers.get("Authorization") != f"Bot {self.config.token}":
            return _json_response(401, {"message": "401: Unauthorized", "code": 0})
        now = time.monotonic()
        self._refresh_session_limit(now)
        return _json_response(
            200,
            {
                "url": self.gateway_url,
                "shards": self.config.shard_count,
                "session_start_limit": {
                    "total": self.config.session_start_total,
                    "remaining": self._remaining,
                    "reset_after": max(0, int((self._reset_at - now) * 1000)),
                    "max_concurrency": self.config.max_concurrency,
                },
            },
        )

    async def _handle(self, ws: ServerConnection) -> None:
        conn, query = self._gw.accept(ws)
        try:
            self._gw.open(conn, query)
            while True:
                message = await ws.recv()
                self._on_message(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self._gw.on_closed(conn)

    # -- internals: client payloads --

    def _on_message(self, conn: Conn, message: str | bytes) -> None:
        if conn.closing:
            return
        now = time.monotonic()
        raw = message.encode() if isinstance(message, str) else message
        size = len(raw)
        limit, window = self.config.send_limit
        times = conn.recv_times
        times.append(now)
        while times and times[0] <= now - window:
            times.popleft()
        if len(times) > limit:
            self.ledger.received.append(
                ReceivedRecord(now, conn.id, conn.shard_id, None, size, raw[:256])
            )
            self._gw.violation(
                f"4008 rate limit shard {shard_label(conn)}: "
                f"{len(times)} payloads in {window:g} s (limit {limit})"
            )
            self._gw.server_close(conn, 4008, "Rate limited")
            return
        if size > MAX_PAYLOAD_BYTES:
            self.ledger.received.append(
                ReceivedRecord(now, conn.id, conn.shard_id, None, size, raw[:256])
            )
            self._gw.violation(f"4002 payload of {size} bytes shard {shard_label(conn)}")
            self._gw.server_close(conn, 4002, "Decode error: payload too large")
            return
        try:
            payload = json.loads(raw)
        except ValueError:
            self.ledger.received.append(
                ReceivedRecord(now, conn.id, conn.shard_id, None, size, raw[:256])
            )
            kind = "binary" if isinstance(message, bytes) else "text"
            self._gw.violation(
                f"4002 undecodable {kind} payload of {size} bytes shard {shard_label(conn)}"
            )
            self._gw.server_close(conn, 4002, "Decode error")
            return
        self.ledger.received.append(ReceivedRecord(now, conn.id, conn.shard_id, payload, size))
        if not isinstance(payload, dict) or not _is_int(payload.get("op")):
            self._gw.violation(f"4002 payload without an integer op shard {shard_label(conn)}")
            self._gw.server_close(conn, 4002, "Decode error: no op")
            return
        try:
            self._dispatch_op(conn, payload, size, now)
        except Exception:  # a simulator bug must not kill the connection handler silently
            logger.exception("conn %d: error handling %r", conn.id, payload.get("op"))
            self._gw.violation(f"simulator internal error on op {payload.get('op')!r}")
            self._gw.server_close(conn, 4000, "Unknown error")

    def _dispatch_op(self, conn: Conn, payload: dict[str, Any], size: int, now: float) -> None:
        op = payload["op"]
        d = payload.get("d")
        if op == 1:
            self._on_heartbeat(conn, d, now)
        elif op == 2:
            self._on_identify(conn, payload, d, size, now)
        elif op == 6:
            self._on_resume(conn, d, now)
        elif op in COMMAND_OPS:
            if conn.session is None:
                self._gw.violation(
                    f"4003 op {op} before identify shard {shard_label(conn)} (conn {conn.id})"
                )
                self._gw.server_close(conn, 4003, "Not authenticated")
                return
            self._on_command(conn, conn.session, op, d, now)
        else:
            self._gw.violation(f"4001 unknown opcode {op} shard {shard_label(conn)}")
            self._gw.server_close(conn, 4001, "Unknown opcode")

    def _on_heartbeat(self, conn: Conn, d: Any, now: float) -> None:
        self.ledger.heartbeats.append(HeartbeatRecord(now, conn.id, conn.shard_id, d))
        if d is not None and not _is_int(d):
            self._gw.violation(f"heartbeat d={d!r} is not an integer or null (conn {conn.id})")
        elif conn.session is not None and d is not None and d > conn.session.log.written:
            self._gw.violation(
                f"heartbeat d={d} ahead of the last seq sent ({conn.session.log.written}) "
                f"shard {shard_label(conn)}"
            )
        if not conn.withhold_acks:
            conn.write([events.HEARTBEAT_ACK])
        self._gw.arm_hb(conn)

    def _on_identify(
        self, conn: Conn, payload: dict[str, Any], d: Any, size: int, now: float
    ) -> None:
        cfg = self.config
        if not isinstance(d, dict):
            self._gw.violation(f"4001 identify without an object d (conn {conn.id})")
            self._gw.server_close(conn, 4001, "Invalid payload for identify")
            return
        shard_raw = d.get("shard", [0, 1])
        shard_ok = (
            isinstance(shard_raw, list)
            and len(shard_raw) == 2
            and _is_int(shard_raw[0])
            and _is_int(shard_raw[1])
        )
        shard_id: int | None = shard_raw[0] if shard_ok else None
        num_shards: int | None = shard_raw[1] if shard_ok else None
        token = d.get("token")
        token_ok = isinstance(token, str) and token in (cfg.token, f"Bot {cfg.token}")
        record = IdentifyRecord(
            time=now,
            conn_id=conn.id,
            shard_id=shard_id,
            num_shards=num_shards,
            intents=d.get("intents"),
            token_ok=token_ok,
            properties=d.get("properties"),
            presence=d.get("presence"),
            large_threshold=d.get("large_threshold"),
            compress=d.get("compress"),
            payload=payload,
            size=size,
        )
        self.ledger.identifies.append(record)
        label = "?" if shard_id is None else str(shard_id)

        def close(code: int, reason: str, violation: str) -> None:
            self._refuse(conn, record, code, reason, violation)

        if conn.session is not None:
            close(4005, "Already authenticated", f"4005 second identify shard {label}")
            return
        if not token_ok:
            close(4004, "Authentication failed", f"4004 authentication failed shard {label}")
            return
        if token != cfg.token:
            self._gw.violation(f"identify token carries the 'Bot ' prefix shard {label}")
        if shard_id is None or num_shards is None or not 0 <= shard_id < num_shards:
            close(4010, "Invalid shard", f"4010 invalid shard {shard_raw!r}")
            return
        if cfg.strict_shard_count and num_shards != cfg.shard_count:
            close(
                4010,
                "Invalid shard",
                f"4010 invalid shard {shard_raw!r}: expected {cfg.shard_count} shards",
            )
            return
        if cfg.required_shards and num_shards < cfg.required_shards:
            close(
                4011,
                "Sharding required",
                f"4011 sharding required: {num_shards} < {cfg.required_shards} shards",
            )
            return
        raw_intents = d.get("intents")
        if not _is_int(raw_intents):
            close(4013, "Invalid intent(s)", f"4013 invalid intents {raw_intents!r} shard {label}")
            return
        intents = int(raw_intents)
        if intents < 0 or intents & ~events.DOCUMENTED_INTENTS:
            close(4013, "Invalid intent(s)", f"4013 invalid intents {intents!r} shard {label}")
            return
        disallowed = intents & events.PRIVILEGED_INTENTS & ~cfg.allowed_privileged
        if disallowed:
            close(
                4014,
                "Disallowed intent(s)",
                f"4014 disallowed privileged intents {disallowed} shard {label}",
            )
            return
        self._check_identify_fields(d, label)
        bucket = shard_id % cfg.max_concurrency
        last = self._bucket_last.get(bucket)
        if last is not None and now - last < cfg.identify_window:
            record.outcome = "invalid_session"
            self._gw.violation(
                f"identify concurrency bucket {bucket}: 2 identifies {now - last:.2f} s apart "
                f"(shard {shard_id})"
            )
            conn.write([events.INVALID_SESSION_FALSE])
            return
        self._refresh_session_limit(now)
        if self._remaining <= 0:
            record.outcome = "invalid_session"
            self._gw.violation(f"session start limit exhausted: identify shard {shard_id}")
            conn.write([events.INVALID_SESSION_FALSE])
            return
        self._remaining -= 1
        self._bucket_last[bucket] = now
        self._start_session(
            conn=conn,
            record=record,
            d=d,
            shard_id=shard_id,
            num_shards=num_shards,
            intents=intents,
            now=now,
        )

    def _check_identify_fields(self, d: dict[str, Any], label: str) -> None:
        props = d.get("properties")
        if not isinstance(props, dict) or not all(k in props for k in ("os", "browser", "device")):
            self._gw.violation(f"identify properties lack os/browser/device shard {label}")
        threshold = d.get("large_threshold")
        if threshold is not None and not (_is_int(threshold) and 50 <= threshold <= 250):
            self._gw.violation(
                f"identify large_threshold {threshold!r} not in 50..250 shard {label}"
            )
        presence = d.get("presence")
        if presence is not None and not isinstance(presence, dict):
            self._gw.violation(f"identify presence is not an object shard {label}")

    def _start_session(
        self,
        *,
        conn: Conn,
        record: IdentifyRecord,
        d: dict[str, Any],
        shard_id: int,
        num_shards: int,
        intents: int,
        now: float,
    ) -> None:
        cfg = self.config
        session_id = secrets.token_hex(16)
        guild_ids = events.guild_ids_for_shard(shard_id, num_shards, cfg.guilds_per_shard)
        session = Session(
            session_id=session_id,
            shard_id=shard_id,
            num_shards=num_shards,
            intents=intents,
            guild_ids=guild_ids,
            created_at=now,
        )
        self._gw.table.add(session)
        self.ledger.sent_dispatches[session_id] = session.log
        self._gw.table.attach(session, conn)
        record.outcome = "ready"
        record.session_id = session_id
        if d.get("compress") is True and conn.mode == PLAIN:
            conn.mode = PAYLOAD_ZLIB
        version = int(conn.record.query.get("v", "10"))
        self._gw.table.append(
            session,
            "READY",
            None,
            lambda seq: events.ready(
                seq=seq,
                version=version,
                user_id=self._gw.user_id,
                application_id=self._gw.application_id,
                session_id=session_id,
                resume_gateway_url=self.resume_url,
                shard=(shard_id, num_shards),
                guild_ids=guild_ids,
                trace_name=cfg.trace_name,
            ),
        )
        raw_threshold = d.get("large_threshold")
        threshold = raw_threshold if _is_int(raw_threshold) else 50
        for index, guild_id in enumerate(guild_ids):
            build = functools.partial(
                events.guild_create,
                guild_id=guild_id,
                index=index,
                large_threshold=threshold,
                min_bytes=cfg.big_guild_create_bytes if index == 0 else 0,
            )
            self._gw.table.append(session, "GUILD_CREATE", None, build)
        self._gw.table.flush(session, force=True)
        logger.info("shard %d/%d: new session %s", shard_id, num_shards, session_id)

    def _on_resume(self, conn: Conn, d: Any, now: float) -> None:
        session_id = d.get("session_id") if isinstance(d, dict) else None
        seq = d.get("seq") if isinstance(d, dict) else None
        record = ResumeRecord(now, conn.id, None, session_id, seq)
        self.ledger.resumes.append(record)

        def close(code: int, reason: str, violation: str) -> None:
            self._refuse(conn, record, code, reason, violation)

        if conn.session is not None:
            close(4005, "Already authenticated", f"4005 resume on an authenticated conn {conn.id}")
            return
        if (
            not isinstance(d, dict)
            or not isinstance(session_id, str)
            or not (seq is None or _is_int(seq))
        ):
            close(4001, "Invalid payload for resume", f"4001 malformed resume (conn {conn.id})")
            return
        token = d.get("token")
        if not isinstance(token, str) or token not in (
            self.config.token,
            f"Bot {self.config.token}",
        ):
            close(4004, "Authentication failed", f"4004 authentication failed on resume {conn.id}")
            return
        session = self._gw.table.by_id.get(session_id)
        if session is not None:
            record.shard_id = session.shard_id
            conn.shard_id = session.shard_id
            conn.record.shard_id = session.shard_id
        if session is None or self._gw.table.is_dead(session, now):
            if session is not None:
                session.invalidated = True
            record.outcome = "invalid_session"
            conn.write([events.INVALID_SESSION_FALSE])
            return
        log = session.log
        client_seq = seq or 0
        if client_seq > log.last_seq or client_seq < 0:
            session.invalidated = True
            close(
                4007,
                "Invalid seq",
                f"4007 resume seq {client_seq} beyond last seq {log.last_seq} "
                f"shard {session.shard_id}",
            )
            return
        if client_seq > log.written:
            self._gw.violation(
                f"resume seq {client_seq} was never sent (last written {log.written}) "
                f"shard {session.shard_id}"
            )
        if session.conn is not None:
            self._gw.drop(session.conn)  # a resume takes the session over from a zombie
        replayed = self._gw.table.resume(session, conn, client_seq)
        record.success = True
        record.outcome = "resumed"
        record.replayed = replayed
        logger.info(
            "shard %d: resumed session %s from seq %d (%d replayed)",
            session.shard_id,
            session_id,
            client_seq,
            replayed,
        )

    def _on_command(self, conn: Conn, session: Session, op: int, d: Any, now: float) -> None:
        self.ledger.commands.append(CommandRecord(now, conn.id, conn.shard_id, op, d))
        if not isinstance(d, dict):
            self._gw.violation(f"4001 op {op} without an object d shard {session.shard_id}")
            self._gw.server_close(conn, 4001, "Invalid payload")
            return
        if op == 8:
            self._on_request_members(session, d, now)
        elif op == 31:
            guild_ids = d.get("guild_ids")
            for guild_id in guild_ids if isinstance(guild_ids, list) else []:
                build = functools.partial(events.soundboard_sounds, guild_id=str(guild_id))
                self._gw.table.append(session, "SOUNDBOARD_SOUNDS", None, build)
        elif op == 43:
            gid = str(d.get("guild_id"))
            self._gw.table.append(
                session, "CHANNEL_INFO", None, lambda s: events.channel_info(seq=s, guild_id=gid)
            )
        self._gw.table.flush(session)

    def _on_request_members(self, session: Session, d: dict[str, Any], now: float) -> None:
        gid = str(d.get("guild_id"))
        nonce = d.get("nonce") if isinstance(d.get("nonce"), str) else None
        all_members = d.get("query") == "" and d.get("limit") == 0
        if all_members and self.config.member_request_limit:
            last = self._member_requests.get(gid)
            if last is not None and now - last < MEMBER_REQUEST_WINDOW:
                meta: dict[str, Any] = {"guild_id": gid}
                if nonce is not None:
                    meta["nonce"] = nonce
                retry = MEMBER_REQUEST_WINDOW - (now - last)
                self._gw.table.append(
                    session,
                    "RATE_LIMITED",
                    None,
                    lambda s: events.rate_limited(seq=s, opcode=8, retry_after=retry, meta=meta),
                )
                return
            self._member_requests[gid] = now
        user_ids = d.get("user_ids")
        ids = [str(u) for u in user_ids] if isinstance(user_ids, list) else []
        self._gw.table.append(
            session,
            "GUILD_MEMBERS_CHUNK",
            None,
            lambda s: events.guild_members_chunk(seq=s, guild_id=gid, nonce=nonce, user_ids=ids),
        )

    def _apply_fault(self, conn: Conn, fault: Fault) -> None:
        if isinstance(fault, Reconnect):
            conn.write([events.RECONNECT])
            self._gw.schedule_reconnect_close(conn)
        elif isinstance(fault, InvalidSession):
            conn.write(
                [events.INVALID_SESSION_TRUE if fault.resumable else events.INVALID_SESSION_FALSE]
            )
            session = conn.session
            if session is not None:
                self._gw.table.detach(session)
                if not fault.resumable:
                    session.invalidated = True
        elif isinstance(fault, WithholdAcks):
            conn.withhold_acks = fault.on
        elif isinstance(fault, HeartbeatRequest):
            conn.write([events.HEARTBEAT_REQUEST])
        elif isinstance(fault, Close):
            self._gw.server_close(conn, fault.code, fault.reason)
        elif isinstance(fault, Drop):
            self._gw.drop(conn)
        elif isinstance(fault, CorruptCompressed):
            conn.write_corrupt()
        elif isinstance(fault, MalformedJson):
            conn.write([events.MALFORMED_JSON])
        elif isinstance(fault, UnknownOpcode):
            conn.write([events.UNKNOWN_OPCODE])
        elif isinstance(fault, UnknownDispatch):
            session = conn.session
            if session is not None:
                uid = self._gw.ids.take()
                guild_id = session.factory.guild_for(uid)
                self._gw.table.append(
                    session,
                    "FUTURE_EVENT",
                    uid,
                    lambda s: events.future_event(seq=s, event_id=uid, guild_id=guild_id),
                )
                self._gw.table.flush(session, force=True)
        else:
            raise TypeError(f"unknown fault {fault!r}")
