"""One Discord gateway shard as a sans-I/O state machine (discord.md §1–§9).

The driver calls, in this order for every connection::

    plan = shard.plan_connect(now)            # where and when to connect, identify or resume
    ... open the websocket at plan.url, no earlier than plan.at ...
    shard.connection_opened(now, identify_permitted=...)   # or shard.connect_failed(now, why)
    loop:
        dispatch = shard.receive(message, now)     # one decompressed gateway message
        shard.tick(now)                            # when shard.next_deadline() has come
        shard.queue_command(payload, ticket)       # commands from consumers
        ... after any of these, carry out what the shard asks for:
        shard.data_to_send()  -> text payloads to write, in order
        shard.pop_close_request() -> (code, reason) to close the websocket with
        shard.take_sent_tickets() -> tickets of commands now written
        shard.take_notices()  -> what happened, for logs and metrics
    shard.connection_closed(now, code)         # code the server sent, None for a TCP drop

The shard never reads a clock: ``now`` is any monotonic time in seconds. Randomness (heartbeat
jitter, backoff) comes from the ``rand`` callable given at construction.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from .backoff import backoff_delay
from .closecodes import (
    RESUMABLE_CLOSE,
    SESSION_END_CLOSE,
    CloseAction,
    classify_close,
    describe_close,
)
from .envelope import Opcode, decode_bool, decode_envelope, decode_hello, decode_ready
from .limiter import SendLimiter
from .urls import build_gateway_url

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "CommandRejected",
    "ConnectPlan",
    "Dispatch",
    "Notice",
    "Phase",
    "Session",
    "ShardConfig",
    "ShardProtocol",
]

MAX_PAYLOAD_BYTES = 4096

_encode = msgspec.json.encode


class Phase(enum.Enum):
    DISCONNECTED = "disconnected"
    WAITING_HELLO = "waiting_hello"
    IDENTIFYING = "identifying"
    RESUMING = "resuming"
    READY = "ready"
    CLOSING = "closing"
    STOPPED = "stopped"


class Dispatch(NamedTuple):
    """An op-0 event to publish: its name, its ``s``, and the raw JSON bytes of its ``d``."""

    event: str
    seq: int | None
    data: bytes


class Notice(NamedTuple):
    """Worth a log line or a metric: ``kind`` is a short fixed word, ``detail`` free text."""

    kind: str
    detail: str


class ConnectPlan(NamedTuple):
    url: str  # full URL with the query
    at: float  # connect no earlier than this time
    identify: bool  # True: the connection will IDENTIFY (take the identify gate first)
    reason: str


class CommandRejected(ValueError):
    """A command that can never be sent (too large, not an object); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Session:
    """What a RESUME needs. ``seq`` is the last *confirmed* sequence number."""

    session_id: str
    seq: int | None
    resume_url: str | None


@dataclass(frozen=True)
class ShardConfig:
    shard_id: int
    shard_count: int
    token: str = field(repr=False)
    intents: int
    gateway_url: str  # bare base URL: from /gateway/bot or an override
    version: int = 10
    encoding: str = "json"
    compress: str | None = "zstd-stream"
    large_threshold: int = 250
    presence: Mapping[str, Any] | None = None
    properties: Mapping[str, str] = field(
        default_factory=lambda: {
            "os": "linux",
            "browser": "spectacles-gateway",
            "device": "spectacles-gateway",
        }
    )
    events: frozenset[str] | None = None  # None: publish every dispatch
    hello_timeout: float = 20.0
    send_limit: int = 120
    send_period: float = 60.0
    heartbeat_reserve: int = 3
    backoff_base: float = 1.0
    backoff_cap: float = 60.0


class ShardProtocol:
    """The rules of one shard: heartbeats, identify/resume, seq, close codes, send limit."""

    def __init__(
        self,
        config: ShardConfig,
        *,
        rand: Callable[[], float],
        session: Session | None = None,
    ) -> None:
        if not 0 <= config.shard_id < config.shard_count:
            raise ValueError(f"shard id {config.shard_id} is outside 0..{config.shard_count - 1}")
        self.config = config
        self._rand = rand
        self._events = config.events
        self._identify_payload = self._build_identify()
        if len(self._identify_payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(
                f"IDENTIFY would be {len(self._identify_payload)} bytes, over Discord's "
                f"{MAX_PAYLOAD_BYTES}-byte limit (shorten the presence)"
            )
        self.phase = Phase.DISCONNECTED
        # Session state (survives reconnects of the same session).
        self.session_id: str | None = None
        self.resume_url: str | None = None
        self.seq: int | None = None  # last s received on this session: heartbeats carry it
        self._pending: deque[int] = deque()  # seqs handed to the broker, not yet confirmed
        if session is not None:
            self.session_id = session.session_id
            self.resume_url = session.resume_url
            self.seq = session.seq
        # Connection state.
        self._out: list[bytes] = []
        self._close_request: tuple[int, str] | None = None
        self._notices: list[Notice] = []
        self._limiter = self._new_limiter()
        self._heartbeat_interval = 0.0
        self._heartbeat_at: float | None = None
        self._hello_deadline: float | None = None
        self._acked = True
        self._heartbeat_sent_at: float | None = None
        self.latency: float | None = None  # last heartbeat round trip; metrics consume it
        self.ping_ms: float | None = None  # the same, kept for status reports
        self._identify_permitted = False
        self._reached_ready = False
        self._after_close: CloseAction | None = None
        self._after_close_delay = "now"  # "now" | "backoff" | "invalid_session"
        # Reconnect state.
        self._failures = 0
        self._connect_at = 0.0
        self._use_resume_url = True
        self._stopping = False
        self.fatal_code: int | None = None
        self.last_close: str = ""
        self._identify_sent_at: float | None = None
        #: Packets received by (t, op), for the seed's ``gateway_packets_received`` metric; the
        #: driver reads and clears it periodically.
        self.packets_received: dict[tuple[str, int], int] = {}
        #: Payloads sent by op, commands sent, and dispatches the broker confirmed: running
        #: totals the driver reads for metrics.
        self.packets_sent: dict[int, int] = {}
        self.commands_sent = 0
        self.confirmed_events = 0
        # Commands.
        self._commands: deque[tuple[bytes, object, int]] = deque()
        self._commands_waiting = False  # commands queued and held back by the send limit
        self._sent_tickets: list[object] = []

    # ------------------------------------------------------------------ helpers

    def _new_limiter(self) -> SendLimiter:
        c = self.config
        return SendLimiter(c.send_limit, c.send_period, c.heartbeat_reserve)

    def _build_identify(self) -> bytes:
        c = self.config
        d: dict[str, Any] = {
            "token": c.token,
            "intents": c.intents,
            "properties": dict(c.properties),
            "compress": False,
            "large_threshold": c.large_threshold,
            "shard": [c.shard_id, c.shard_count],
        }
        if c.presence is not None:
            d["presence"] = dict(c.presence)
        return _encode({"op": Opcode.IDENTIFY, "d": d})

    def _notice(self, kind: str, detail: str = "") -> None:
        self._notices.append(Notice(kind, detail))

    def _request_close(self, code: int, reason: str, action: CloseAction, delay: str) -> None:
        if self.phase in (Phase.CLOSING, Phase.STOPPED, Phase.DISCONNECTED):
            return
        self._commands_waiting = False
        self.phase = Phase.CLOSING
        self._close_request = (code, reason)
        self._after_close = action
        self._after_close_delay = delay
        self._heartbeat_at = None
        self._hello_deadline = None

    def _drop_session(self) -> None:
        self.session_id = None
        self.resume_url = None
        self.seq = None
        self._pending.clear()

    @property
    def confirmed_seq(self) -> int | None:
        """The highest seq such that every dispatch up to it is safely with the broker."""
        if self._pending:
            first = self._pending[0]
            return first - 1 if first > 0 else None
        return self.seq

    def session(self) -> Session | None:
        """A snapshot for the shard store: what a restarted process needs to RESUME."""
        if self.session_id is None:
            return None
        return Session(self.session_id, self.confirmed_seq, self.resume_url)

    # ------------------------------------------------------------------ connecting

    def plan_connect(self, now: float) -> ConnectPlan | None:
        """Where and when to connect next, or None when the shard must not reconnect."""
        if self.phase is Phase.STOPPED or self._stopping:
            return None
        c = self.config
        resuming = self.session_id is not None
        base = c.gateway_url
        if resuming and self.resume_url and self._use_resume_url:
            base = self.resume_url
        url = build_gateway_url(base, version=c.version, encoding=c.encoding, compress=c.compress)
        reason = "resume" if resuming else "identify"
        return ConnectPlan(url, max(now, self._connect_at), not resuming, reason)

    def connect_failed(self, now: float, reason: str) -> None:
        """The websocket could not be opened (DNS, TCP, TLS, handshake, timeout)."""
        self._failures += 1
        if self.session_id is not None and self.resume_url and self._use_resume_url:
            # A stale resume URL: try the main gateway URL next (the session may still resume).
            self._use_resume_url = False
        delay = backoff_delay(
            self._failures, self._rand(), base=self.config.backoff_base, cap=self.config.backoff_cap
        )
        self._connect_at = now + delay
        self._notice("connect_failed", f"{reason}; retrying in {delay:.1f} s")

    def connection_opened(self, now: float, *, identify_permitted: bool) -> None:
        """The websocket is open; wait for HELLO. ``identify_permitted``: the gate was taken."""
        self.phase = Phase.WAITING_HELLO
        self._limiter = self._new_limiter()
        self._out.clear()
        self._close_request = None
        self._after_close = None
        self._hello_deadline = now + self.config.hello_timeout
        self._heartbeat_at = None
        self._acked = True
        self._heartbeat_sent_at = None
        self._identify_permitted = identify_permitted
        self._reached_ready = False

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes, now: float) -> Dispatch | None:
        """Feed one complete gateway message (decompressed JSON text).

        Returns the dispatch to publish, if this message is one that passes the event filter.
        """
        if self.phase is Phase.CLOSING or self.phase is Phase.STOPPED:
            return None  # after we asked to close, nothing counts: it will be replayed
        try:
            env = decode_envelope(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            self._request_close(RESUMABLE_CLOSE, "malformed payload", CloseAction.RESUME, "backoff")
            self._notice("decode_error", f"malformed JSON from the gateway: {exc}")
            return None
        op = env.op
        counts = self.packets_received
        key = (env.t or "", op)
        counts[key] = counts.get(key, 0) + 1
        if op == 0:
            s = env.s
            if s is not None:
                self.seq = s
            t = env.t
            if t in ("READY", "RESUMED"):
                self._on_session_event(t, env.d.copy() if t == "READY" else b"", now)
            if t is None:
                return None
            events = self._events
            if events is None or t in events:
                if s is not None:
                    self._pending.append(s)
                return Dispatch(t, s, bytes(env.d))
            return None
        if op == Opcode.HEARTBEAT_ACK:
            self._acked = True
            if self._heartbeat_sent_at is not None:
                self.latency = now - self._heartbeat_sent_at
                self.ping_ms = self.latency * 1000.0
            return None
        if op == Opcode.HELLO:
            self._on_hello(env.d, now)
        elif op == Opcode.HEARTBEAT:
            self._notice("heartbeat_request", "server asked for a heartbeat")
            self._send_heartbeat(now)
        elif op == Opcode.RECONNECT:
            self._notice("reconnect_requested", "op 7 RECONNECT")
            self._request_close(RESUMABLE_CLOSE, "reconnect requested", CloseAction.RESUME, "now")
        elif op == Opcode.INVALID_SESSION:
            self._on_invalid_session(env.d)
        else:
            self._notice("unknown_opcode", f"ignored unknown opcode {op}")
        return None

    def _on_session_event(self, t: str, d: bytes, now: float) -> None:
        if t == "READY":
            try:
                info = decode_ready(d)
            except msgspec.DecodeError as exc:
                self._request_close(RESUMABLE_CLOSE, "bad READY", CloseAction.IDENTIFY, "backoff")
                self._notice("decode_error", f"READY without a session id: {exc}")
                return
            self.session_id = info.session_id
            self.resume_url = info.resume_gateway_url
            self._use_resume_url = True
            self._pending.clear()
            self._notice("ready", f"session {info.session_id[:8]}…")
        else:
            self._notice("resumed", f"seq {self.seq}")
        self.phase = Phase.READY
        self._reached_ready = True
        self._failures = 0
        self._flush_commands(now)

    def _on_hello(self, d: msgspec.Raw, now: float) -> None:
        if self.phase is not Phase.WAITING_HELLO:
            self._notice("unexpected_hello", f"HELLO in phase {self.phase.value}; ignored")
            return
        try:
            interval = decode_hello(d).heartbeat_interval / 1000.0
        except msgspec.DecodeError as exc:
            self._request_close(RESUMABLE_CLOSE, "bad HELLO", CloseAction.RESUME, "backoff")
            self._notice("decode_error", f"HELLO without a heartbeat interval: {exc}")
            return
        if interval <= 0:
            self._request_close(RESUMABLE_CLOSE, "bad HELLO", CloseAction.RESUME, "backoff")
            self._notice("decode_error", f"HELLO with heartbeat interval {interval}")
            return
        self._hello_deadline = None
        self._heartbeat_interval = interval
        # Keep enough of the send budget for every heartbeat of a window, plus identify/resume
        # and one heartbeat request from the server.
        c = self.config
        beats = math.ceil(c.send_period / interval) + 2
        self._limiter.reserved = min(c.send_limit - 1, max(c.heartbeat_reserve, beats))
        self._acked = True
        self._heartbeat_at = now + interval * self._rand()
        if self.session_id is not None:
            self.phase = Phase.RESUMING
            seq = self.confirmed_seq
            self.seq = seq
            self._pending.clear()
            self._send_priority(
                _encode(
                    {
                        "op": Opcode.RESUME,
                        "d": {
                            "token": self.config.token,
                            "session_id": self.session_id,
                            "seq": seq,
                        },
                    }
                ),
                now,
                Opcode.RESUME,
            )
        elif self._identify_permitted:
            self.phase = Phase.IDENTIFYING
            self._send_priority(self._identify_payload, now, Opcode.IDENTIFY)
            self._identify_sent_at = now
        else:
            # Planned a resume but the session vanished meanwhile: identify on a new connection.
            self._request_close(RESUMABLE_CLOSE, "identify needed", CloseAction.RESUME, "now")

    def _on_invalid_session(self, d: msgspec.Raw) -> None:
        try:
            resumable = bool(decode_bool(d))
        except msgspec.DecodeError:
            resumable = False
        if resumable and self.session_id is not None:
            self._notice("invalid_session", "op 9 (resumable): reconnecting to resume")
            self._request_close(RESUMABLE_CLOSE, "invalid session", CloseAction.RESUME, "now")
        else:
            self._notice("invalid_session", "op 9 (not resumable): new session")
            self._drop_session()
            self._request_close(
                RESUMABLE_CLOSE, "invalid session", CloseAction.IDENTIFY, "invalid_session"
            )

    def transport_error(self, reason: str) -> None:
        """The transport could not decode what the server sent (corrupt compressed bytes):
        drop this connection with a resumable code; a new connection gets a new context."""
        self._notice("decode_error", reason)
        self._request_close(RESUMABLE_CLOSE, "decode error", CloseAction.RESUME, "backoff")

    # ------------------------------------------------------------------ sending

    def _send_priority(self, payload: bytes, now: float, op: int) -> bool:
        if self._limiter.try_acquire(now, priority=True):
            self._out.append(payload)
            sent = self.packets_sent
            sent[op] = sent.get(op, 0) + 1
            return True
        return False

    def _send_heartbeat(self, now: float) -> None:
        seq = self.seq
        payload = b'{"op":1,"d":null}' if seq is None else b'{"op":1,"d":%d}' % seq
        if self._send_priority(payload, now, Opcode.HEARTBEAT):
            self._acked = False
            self._heartbeat_sent_at = now
            if self._heartbeat_interval:
                self._heartbeat_at = now + self._heartbeat_interval
        else:  # cannot happen while commands keep to their share; retry when a slot frees
            self._heartbeat_at = self._limiter.next_free(now, priority=True)

    def queue_command(self, payload: bytes, now: float, ticket: object = None) -> None:
        """Queue a command payload (``{"op": .., "d": ..}`` JSON) to send when the limit allows.

        Raises :class:`CommandRejected` for a payload that can never be sent. ``ticket`` comes
        back from :meth:`take_sent_tickets` once the payload was handed to the websocket.
        """
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise CommandRejected(
                f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit"
            )
        try:
            op = decode_envelope(payload).op
        except msgspec.DecodeError as exc:
            raise CommandRejected(f"not a gateway payload: {exc}") from None
        self._commands.append((payload, ticket, op))
        self._flush_commands(now)

    def pending_commands(self) -> int:
        return len(self._commands)

    def _flush_commands(self, now: float) -> None:
        if self.phase is not Phase.READY:
            return
        commands = self._commands
        limiter = self._limiter
        sent = self.packets_sent
        while commands and limiter.try_acquire(now):
            payload, ticket, op = commands.popleft()
            self._out.append(payload)
            sent[op] = sent.get(op, 0) + 1
            self.commands_sent += 1
            if ticket is not None:
                self._sent_tickets.append(ticket)
        self._commands_waiting = bool(commands)

    def data_to_send(self) -> list[bytes]:
        """Text payloads to write to the websocket now, in order. Call after every input."""
        out = self._out
        if out:
            self._out = []
        return out

    def take_sent_tickets(self) -> list[object]:
        tickets = self._sent_tickets
        if tickets:
            self._sent_tickets = []
        return tickets

    def pop_close_request(self) -> tuple[int, str] | None:
        req = self._close_request
        self._close_request = None
        return req

    def take_notices(self) -> list[Notice]:
        notices = self._notices
        if notices:
            self._notices = []
        return notices

    def take_identify_sent(self) -> float | None:
        """When an IDENTIFY went out on this connection (once), for the identify gate."""
        at = self._identify_sent_at
        self._identify_sent_at = None
        return at

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        """The next time :meth:`tick` must be called, or None."""
        deadline = self._heartbeat_at
        hello = self._hello_deadline
        if hello is not None and (deadline is None or hello < deadline):
            deadline = hello
        if self._commands_waiting and self.phase is Phase.READY:
            free = self._limiter.earliest_free()
            if free is not None and (deadline is None or free < deadline):
                deadline = free
        return deadline

    def tick(self, now: float) -> None:
        """Run what is due: heartbeat or zombie check, HELLO timeout, queued commands."""
        hello = self._hello_deadline
        if hello is not None and now >= hello and self.phase is Phase.WAITING_HELLO:
            self._notice("hello_timeout", f"no HELLO within {self.config.hello_timeout:g} s")
            self._request_close(RESUMABLE_CLOSE, "no hello", CloseAction.RESUME, "backoff")
            return
        beat = self._heartbeat_at
        if beat is not None and now >= beat:
            if not self._acked:
                self._notice("zombie", "no heartbeat ACK since the last heartbeat")
                self._request_close(RESUMABLE_CLOSE, "zombie connection", CloseAction.RESUME, "now")
                return
            self._send_heartbeat(now)
        self._flush_commands(now)

    # ------------------------------------------------------------------ closing

    def confirm(self, seq: int, session_id: str | None) -> None:
        """The broker has every dispatch of ``session_id`` up to ``seq``."""
        if session_id != self.session_id:
            return
        pending = self._pending
        popped = 0
        while pending and pending[0] <= seq:
            pending.popleft()
            popped += 1
        self.confirmed_events += popped

    def stop(self, *, keep_session: bool) -> None:
        """Shut this shard down. ``keep_session``: close with a resumable code (the session is
        saved somewhere and a later process will resume it); otherwise close with 1000."""
        self._stopping = True
        if self.phase in (Phase.DISCONNECTED, Phase.STOPPED):
            self.phase = Phase.STOPPED
            if not keep_session:
                self._drop_session()
            return
        code = RESUMABLE_CLOSE if keep_session else SESSION_END_CLOSE
        self.phase = Phase.CLOSING
        self._close_request = (code, "shutting down")
        self._heartbeat_at = None
        self._hello_deadline = None
        self._commands_waiting = False
        if not keep_session:
            self._drop_session()

    def connection_closed(self, now: float, code: int | None) -> CloseAction:
        """The websocket is closed. ``code``: the close code the server sent (None: no frame)."""
        self._heartbeat_at = None
        self._hello_deadline = None
        self._close_request = None
        if self._stopping:
            self.phase = Phase.STOPPED
            self.last_close = "stopped"
            return CloseAction.RESUME if self.session_id else CloseAction.IDENTIFY
        ours = self._after_close
        if ours is not None:
            action = ours
            delay = self._after_close_delay
            self.last_close = "closed by us"
        else:
            action = classify_close(code)
            delay = "now" if self._reached_ready else "backoff"
            self.last_close = describe_close(code)
            self._notice("closed", f"server closed the connection: {describe_close(code)}")
        self._after_close = None
        self.phase = Phase.DISCONNECTED
        if action is CloseAction.FATAL:
            self.phase = Phase.STOPPED
            self.fatal_code = code
            return action
        if action is CloseAction.IDENTIFY:
            self._drop_session()
        if delay == "now" and not self._reached_ready and self._failures > 0:
            delay = "backoff"  # still failing: a clean close right away does not reset backoff
        if delay == "backoff":
            self._failures += 1
            wait = backoff_delay(
                self._failures,
                self._rand(),
                base=self.config.backoff_base,
                cap=self.config.backoff_cap,
            )
        elif delay == "invalid_session":
            wait = 1.0 + 4.0 * self._rand()
        else:
            wait = 0.0
        self._connect_at = now + wait
        return action
