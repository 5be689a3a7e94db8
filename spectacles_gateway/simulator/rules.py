"""The protocol rules: what the simulated Discord does with each payload a client sends.

Send limit (120 per 60 s, else 4008), payload size (4096 bytes, else 4002), JSON and opcode
checks (4002, 4001, 4003 before identifying), heartbeats, IDENTIFY (token 4004, shard 4010,
sharding 4011, intents 4013/4014, a second one 4005, concurrency buckets and the session start
limit: op 9), RESUME (replay, op 9 for a dead session, 4007 for a seq ahead) and the commands
(ops 3, 4, 8, 31, 43). Every breach is a violation in the ledger as well.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import time
from typing import Any, Final, TypeGuard

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.connection import PAYLOAD_ZLIB, PLAIN, Conn
from spectacles_gateway.simulator.gateway import Gateway, shard_label
from spectacles_gateway.simulator.ledger import (
    CommandRecord,
    HeartbeatRecord,
    IdentifyRecord,
    ReceivedRecord,
    ResumeRecord,
)
from spectacles_gateway.simulator.sessions import Session

logger = logging.getLogger(__name__)

COMMAND_OPS: Final = frozenset({3, 4, 8, 31, 43})
MAX_PAYLOAD_BYTES: Final = 4096
MEMBER_REQUEST_WINDOW: Final = 30.0
SESSION_LIMIT_PERIOD: Final = 86_400.0


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (JSON ``true`` is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool)


class IdentifyLimits:
    """The application's identify budget: one IDENTIFY per ``max_concurrency`` bucket per
    ``identify_window``, and the session start limit (``remaining`` of ``total`` per day)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.bucket_last: dict[int, float] = {}
        self.total = config.session_start_total
        self.remaining = config.session_start_remaining
        self.reset_at = time.monotonic() + config.session_start_reset_after_ms / 1000

    def refresh(self, now: float) -> None:
        """Start a new day of session starts once ``reset_at`` has passed."""
        while now >= self.reset_at:
            self.remaining = self.total
            self.reset_at += SESSION_LIMIT_PERIOD

    def set(
        self,
        remaining: int | None = None,
        total: int | None = None,
        reset_after_ms: int | None = None,
    ) -> dict[str, int]:
        """Change the session start limit now; returns what ``/gateway/bot`` says next."""
        now = time.monotonic()
        if any(v is not None and v < 0 for v in (remaining, total, reset_after_ms)):
            raise ValueError("session start limits must be >= 0")
        if total is not None:
            self.total = total
        if remaining is not None:
            self.remaining = remaining
        if reset_after_ms is not None:
            self.reset_at = now + reset_after_ms / 1000
        return self.session_start_limit(now)

    def session_start_limit(self, now: float) -> dict[str, int]:
        """``/gateway/bot``'s ``session_start_limit`` object."""
        self.refresh(now)
        return {
            "total": self.total,
            "remaining": self.remaining,
            "reset_after": max(0, int((self.reset_at - now) * 1000)),
            "max_concurrency": self.config.max_concurrency,
        }


class Rules:
    """Handles every payload a client sends on a connection of ``gw``."""

    def __init__(self, gw: Gateway, limits: IdentifyLimits) -> None:
        self.gw = gw
        self.config = gw.config
        self.ledger = gw.ledger
        self.limits = limits
        self._member_requests: dict[str, float] = {}

    def refuse(
        self,
        conn: Conn,
        record: IdentifyRecord | ResumeRecord,
        code: int,
        reason: str,
        violation: str,
    ) -> None:
        """Close an IDENTIFY or RESUME attempt with ``code`` and record why."""
        record.outcome = f"close {code}"
        self.gw.violation(violation)
        self.gw.server_close(conn, code, reason)

    def on_message(self, conn: Conn, message: str | bytes) -> None:
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
            self._received(conn, now, None, size, raw)
            self.gw.violation(
                f"4008 rate limit shard {shard_label(conn)}: "
                f"{len(times)} payloads in {window:g} s (limit {limit})"
            )
            self.gw.server_close(conn, 4008, "Rate limited")
            return
        if size > MAX_PAYLOAD_BYTES:
            self._received(conn, now, None, size, raw)
            self.gw.violation(f"4002 payload of {size} bytes shard {shard_label(conn)}")
            self.gw.server_close(conn, 4002, "Decode error: payload too large")
            return
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json goes
            self._received(conn, now, None, size, raw)
            kind = "binary" if isinstance(message, bytes) else "text"
            self.gw.violation(
                f"4002 undecodable {kind} payload of {size} bytes shard {shard_label(conn)}"
            )
            self.gw.server_close(conn, 4002, "Decode error")
            return
        self._received(conn, now, payload, size)
        if not isinstance(payload, dict) or not is_int(payload.get("op")):
            self.gw.violation(f"4002 payload without an integer op shard {shard_label(conn)}")
            self.gw.server_close(conn, 4002, "Decode error: no op")
            return
        try:
            self._dispatch_op(conn, payload, size, now)
        except Exception:  # a simulator bug must not kill the connection handler silently
            logger.exception("conn %d: error handling %r", conn.id, payload.get("op"))
            self.gw.violation(f"simulator internal error on op {payload.get('op')!r}")
            self.gw.server_close(conn, 4000, "Unknown error")

    def _received(
        self, conn: Conn, now: float, payload: Any, size: int, raw: bytes | None = None
    ) -> None:
        if self.config.record_traffic:
            head = None if raw is None else raw[:256]
            self.ledger.received.append(
                ReceivedRecord(now, conn.id, conn.shard_id, payload, size, head)
            )

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
                self.gw.violation(
                    f"4003 op {op} before identify shard {shard_label(conn)} (conn {conn.id})"
                )
                self.gw.server_close(conn, 4003, "Not authenticated")
                return
            self._on_command(conn, conn.session, op, d, now)
        else:
            self.gw.violation(f"4001 unknown opcode {op} shard {shard_label(conn)}")
            self.gw.server_close(conn, 4001, "Unknown opcode")

    def _on_heartbeat(self, conn: Conn, d: Any, now: float) -> None:
        if self.config.record_traffic:
            self.ledger.heartbeats.append(HeartbeatRecord(now, conn.id, conn.shard_id, d))
        if d is not None and not is_int(d):
            self.gw.violation(f"heartbeat d={d!r} is not an integer or null (conn {conn.id})")
        elif conn.session is not None and d is not None and d > conn.session.log.written:
            self.gw.violation(
                f"heartbeat d={d} ahead of the last seq sent ({conn.session.log.written}) "
                f"shard {shard_label(conn)}"
            )
        if not conn.withhold_acks:
            conn.write([events.HEARTBEAT_ACK])
        self.gw.arm_hb(conn)

    def _on_identify(
        self, conn: Conn, payload: dict[str, Any], d: Any, size: int, now: float
    ) -> None:
        cfg = self.config
        if not isinstance(d, dict):
            self.gw.violation(f"4001 identify without an object d (conn {conn.id})")
            self.gw.server_close(conn, 4001, "Invalid payload for identify")
            return
        shard_raw = d.get("shard", [0, 1])
        shard_ok = (
            isinstance(shard_raw, list)
            and len(shard_raw) == 2
            and is_int(shard_raw[0])
            and is_int(shard_raw[1])
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
            self.refuse(conn, record, code, reason, violation)

        if conn.session is not None:
            close(4005, "Already authenticated", f"4005 second identify shard {label}")
            return
        if not token_ok:
            close(4004, "Authentication failed", f"4004 authentication failed shard {label}")
            return
        if token != cfg.token:
            self.gw.violation(f"identify token carries the 'Bot ' prefix shard {label}")
        if shard_id is None or num_shards is None or not 0 <= shard_id < num_shards:
            close(4010, "Invalid shard", f"4010 invalid shard {shard_raw!r}")
            return
        expected = self.gw.recommended_shards
        if cfg.strict_shard_count and num_shards != expected:
            close(
                4010,
                "Invalid shard",
                f"4010 invalid shard {shard_raw!r}: expected {expected} shards",
            )
            return
        if cfg.required_shards and num_shards < cfg.required_shards:
            close(
                4011,
                "Sharding required",
                f"4011 sharding required: {num_shards} < {cfg.required_shards} shards",
            )
            return
        guilds = self.gw.guilds
        if (
            guilds is not None
            and len(guilds.owned(shard_id, num_shards)) > cfg.max_guilds_per_shard
        ):
            close(
                4011,
                "Sharding required",
                f"4011 sharding required: shard {shard_raw!r} would hold "
                f"{len(guilds.owned(shard_id, num_shards))} guilds "
                f"(max {cfg.max_guilds_per_shard})",
            )
            return
        raw_intents = d.get("intents")
        if not is_int(raw_intents):
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
        last = self.limits.bucket_last.get(bucket)
        self.limits.refresh(now)
        if last is not None and now - last < cfg.identify_window:
            # Every authenticated IDENTIFY spends a session start, even one refused here:
            # a client that identifies too fast drains its budget (and shows it).
            self.limits.remaining = max(0, self.limits.remaining - 1)
            record.outcome = "invalid_session"
            self.gw.violation(
                f"identify concurrency bucket {bucket}: 2 identifies {now - last:.2f} s apart "
                f"(shard {shard_id})"
            )
            conn.write([events.INVALID_SESSION_FALSE])
            return
        if self.limits.remaining <= 0:
            record.outcome = "invalid_session"
            self.gw.violation(f"session start limit exhausted: identify shard {shard_id}")
            conn.write([events.INVALID_SESSION_FALSE])
            return
        self.limits.remaining -= 1
        self.limits.bucket_last[bucket] = now
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
            self.gw.violation(f"identify properties lack os/browser/device shard {label}")
        threshold = d.get("large_threshold")
        if threshold is not None and not (is_int(threshold) and 50 <= threshold <= 250):
            self.gw.violation(
                f"identify large_threshold {threshold!r} not in 50..250 shard {label}"
            )
        presence = d.get("presence")
        if presence is not None and not isinstance(presence, dict):
            self.gw.violation(f"identify presence is not an object shard {label}")

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
        if self.gw.guilds is not None:
            guild_ids = list(self.gw.guilds.owned(shard_id, num_shards))
        else:
            guild_ids = events.guild_ids_for_shard(shard_id, num_shards, cfg.guilds_per_shard)
        session = Session(
            session_id=session_id,
            shard_id=shard_id,
            num_shards=num_shards,
            intents=intents,
            guild_ids=guild_ids,
            created_at=now,
        )
        self.gw.table.add(session)
        self.ledger.sent_dispatches[session_id] = session.log
        self.gw.table.attach(session, conn)
        record.outcome = "ready"
        record.session_id = session_id
        if d.get("compress") is True and conn.mode == PLAIN:
            conn.mode = PAYLOAD_ZLIB
        version = int(conn.record.query.get("v", "10"))
        self.gw.table.append(
            session,
            "READY",
            None,
            lambda seq: events.ready(
                seq=seq,
                version=version,
                user_id=self.gw.user_id,
                application_id=self.gw.application_id,
                session_id=session_id,
                resume_gateway_url=self.gw.resume_url,
                shard=(shard_id, num_shards),
                guild_ids=guild_ids,
                trace_name=cfg.trace_name,
            ),
        )
        raw_threshold = d.get("large_threshold")
        threshold = raw_threshold if is_int(raw_threshold) else 50
        for index, guild_id in enumerate(guild_ids):
            build = functools.partial(
                events.guild_create,
                guild_id=guild_id,
                index=index,
                large_threshold=threshold,
                min_bytes=cfg.big_guild_create_bytes if index == 0 else 0,
            )
            self.gw.table.append_lazy(session, "GUILD_CREATE", None, build)
        self.gw.table.flush(session, force=True)
        logger.info("shard %d/%d: new session %s", shard_id, num_shards, session_id)

    def _on_resume(self, conn: Conn, d: Any, now: float) -> None:
        session_id = d.get("session_id") if isinstance(d, dict) else None
        seq = d.get("seq") if isinstance(d, dict) else None
        record = ResumeRecord(now, conn.id, None, session_id, seq)
        self.ledger.resumes.append(record)

        def close(code: int, reason: str, violation: str) -> None:
            self.refuse(conn, record, code, reason, violation)

        if conn.session is not None:
            close(4005, "Already authenticated", f"4005 resume on an authenticated conn {conn.id}")
            return
        if (
            not isinstance(d, dict)
            or not isinstance(session_id, str)
            or not (seq is None or is_int(seq))
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
        session = self.gw.table.by_id.get(session_id)
        if session is not None:
            record.shard_id = session.shard_id
            conn.shard_id = session.shard_id
            conn.record.shard_id = session.shard_id
        if session is None or self.gw.table.is_dead(session, now):
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
            self.gw.violation(
                f"resume seq {client_seq} was never sent (last written {log.written}) "
                f"shard {session.shard_id}"
            )
        if session.conn is not None:
            self.gw.supersede(session.conn, conn)  # a resume takes the session over
        replayed = self.gw.table.resume(session, conn, client_seq)
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
            self.gw.violation(f"4001 op {op} without an object d shard {session.shard_id}")
            self.gw.server_close(conn, 4001, "Invalid payload")
            return
        if op == 8:
            self._on_request_members(session, d, now)
        elif op == 31:
            guild_ids = d.get("guild_ids")
            for guild_id in guild_ids if isinstance(guild_ids, list) else []:
                build = functools.partial(events.soundboard_sounds, guild_id=str(guild_id))
                self.gw.table.append(session, "SOUNDBOARD_SOUNDS", None, build)
        elif op == 43:
            gid = str(d.get("guild_id"))
            self.gw.table.append(
                session, "CHANNEL_INFO", None, lambda s: events.channel_info(seq=s, guild_id=gid)
            )
        self.gw.table.flush(session)

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
                self.gw.table.append(
                    session,
                    "RATE_LIMITED",
                    None,
                    lambda s: events.rate_limited(seq=s, opcode=8, retry_after=retry, meta=meta),
                )
                return
            self._member_requests[gid] = now
        user_ids = d.get("user_ids")
        ids = [str(u) for u in user_ids] if isinstance(user_ids, list) else []
        self.gw.table.append(
            session,
            "GUILD_MEMBERS_CHUNK",
            None,
            lambda s: events.guild_members_chunk(seq=s, guild_id=gid, nonce=nonce, user_ids=ids),
        )
