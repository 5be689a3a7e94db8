"""One Discord gateway shard as a sans-I/O state machine (discord.md §1–§9).

The driver calls, for every connection::

    plan = shard.plan_connect(now)            # where and when to connect, identify or resume
    ... open the websocket at plan.url, no earlier than plan.at ...
    shard.connection_opened(now, identify_permitted=...)   # or shard.connect_failed(now, why)
    loop:
        shard.receive(message, now)           # one decompressed gateway message
        shard.tick(now)                       # when shard.next_deadline() has come
        shard.queue_command(payload, now, ticket)    # a command from a consumer
        ... after any of these (and after connection_closed / stop):
        for event in shard.events_received(): # the one way out, see .events
            ...
    shard.connection_closed(now, code)         # code the server sent, None for a TCP drop

:meth:`ShardProtocol.stats` is a read-only snapshot for status reports and metrics.

The shard never reads a clock: ``now`` is any monotonic time in seconds. Randomness (heartbeat
jitter, backoff) comes from the ``rand`` callable given at construction.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import msgspec

from .backoff import backoff_delay, heartbeat_time
from .closecodes import (
    RESUMABLE_CLOSE,
    SESSION_END_CLOSE,
    CloseAction,
    classify_close,
    describe_close,
)
from .commands import CommandQueue, CommandRejected
from .envelope import (
    DECODE_ERRORS,
    Opcode,
    decode_bool,
    decode_envelope,
    decode_ready,
    hello_interval,
)
from .events import (
    CloseRequest,
    CommandsDropped,
    Dispatch,
    Event,
    Gap,
    IdentifySent,
    Notice,
    NoticeKind,
    ShardCounts,
    ShardStats,
)
from .identify import MAX_PAYLOAD_BYTES
from .limiter import SendLimiter
from .sending import Sending
from .standby import GUILD_EVENTS, Cover, guild_arrived, waited
from .state import ConnectPlan, Delay, Phase, Session, ShardConfig
from .urls import build_gateway_url, tls_kept

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "CommandRejected",
    "ConnectPlan",
    "Phase",
    "Session",
    "ShardConfig",
    "ShardProtocol",
]

_encode = msgspec.json.encode


class ShardProtocol(Sending):
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
        # Standby publishes nothing: an empty filter, so nothing waits for the broker either.
        self._filter = frozenset() if config.standby else config.events
        self.publishing = not config.standby
        self._guilds: set[str] = set()  # listed by READY, not arrived yet
        # Standby: the guilds of running shards gone for good (4011), published by us meanwhile.
        self._cover: Cover | None = None
        self._identify_payload = config.identify_payload()
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
        self._out: list[Event] = []  # the one way out
        # Connection state.
        self._limiter = self._new_limiter()
        self._heartbeat_interval = 0.0
        self._heartbeat_at: float | None = None
        self._hello_deadline: float | None = None
        self._acked = True
        self._heartbeat_sent_at: float | None = None
        self._latency: float | None = None
        self._heartbeats_acked = 0
        self._identify_permitted = False
        self._reached_ready = False
        self._after_close: CloseAction | None = None
        self._after_close_delay = Delay.NOW
        # Reconnect state.
        self._failures = 0
        self._connect_at = 0.0
        self._use_resume_url = True
        self._stopping = False
        self._poisoned_after: tuple[str | None, int | None] | None = None
        self._identify_reason = ""  # why the session is given up when the close completes
        self._gap: tuple[str, str, int | None, float] | None = None
        self.fatal_code: int | None = None
        self.last_close = ""
        # Counted since the last take_counts(), for metrics.
        self._packets_received: dict[tuple[str, int], int] = {}
        self._packets_sent: dict[int, int] = {}
        self._commands_sent = 0
        self._confirmed_events = 0
        self._commands = CommandQueue(config.command_queue_limit, config.command_max_age)
        self._commands_waiting = False  # commands queued and held back by the send limit

    # ------------------------------------------------------------------ the way out

    def events_received(self) -> list[Event]:
        """Everything to carry out or report, in order, since the last call (call it after
        every input: receive, tick, queue_command, connection_closed, stop, ...)."""
        out = self._out
        if out:
            self._out = []
        return out

    def stats(self) -> ShardStats:
        """A read-only snapshot of the state, for status reports."""
        return ShardStats(
            phase=self.phase.value,
            ready=self.phase is Phase.READY,
            session_id=self.session_id,
            seq=self.seq,
            confirmed_seq=self.confirmed_seq,
            latency=self._latency,
            last_close=self.last_close,
            fatal_code=self.fatal_code,
            commands_waiting=len(self._commands),
            guilds_pending=len(self._guilds),
            publishing=self.publishing,
        )

    def take_counts(self) -> ShardCounts:
        """What was counted since the last call (for metrics: one reader takes them)."""
        counts = ShardCounts(
            self._packets_received,
            self._packets_sent,
            self._commands_sent,
            self._confirmed_events,
            self._heartbeats_acked,
            self._latency,
        )
        self._packets_received = {}
        self._packets_sent = {}
        self._commands_sent = self._confirmed_events = self._heartbeats_acked = 0
        return counts

    def take_gap(self, reason: str, now: float) -> Gap | None:
        """This shard stops for good (its generation retires): where its events end, for
        consumers. A session given up earlier and never replaced is that gap (its own reason);
        else the current session ends here with ``reason``. None in standby or with no session
        (nothing was published, or nothing was lost)."""
        if not self.publishing:
            return None
        pending, self._gap = self._gap, None
        if pending is not None:
            return Gap(pending[0], pending[1], pending[2], pending[3], "", now)
        if self.session_id is None:
            return None
        return Gap(reason, self.session_id, self.seq, now, "", now)

    def cover(self, shard_count: int, shards: frozenset[int]) -> None:
        """In standby, publish the events that shards ``shards`` of the running generation
        (``shard_count`` shards) would have published: they are gone for good (4011), so
        nobody else will. A guild's shard is ``(guild_id >> 22) % shard_count``; events of no
        guild (direct messages) go to shard 0."""
        self._cover = Cover(shard_count, shards) if shards and shard_count > 0 else None

    def _covered(self, t: str, d: msgspec.Raw) -> bool:
        events = self.config.events
        if self.publishing or (events is not None and t not in events):
            return False
        return self._cover is not None and self._cover.covers(t, d)

    def start_publishing(self) -> None:
        """Leave standby: every dispatch read from now on is published (a reshard's switch).
        What was read before is gone for good: the old generation published it."""
        self._filter = self.config.events
        self.publishing = True
        self._cover = None

    # ------------------------------------------------------------------ helpers

    def _new_limiter(self) -> SendLimiter:
        c = self.config
        return SendLimiter(c.send_limit, c.send_period, c.heartbeat_reserve)

    def _notice(self, kind: NoticeKind, detail: str = "") -> None:
        self._out.append(Notice(kind, detail))

    def _request_close(self, code: int, reason: str, action: CloseAction, delay: Delay) -> None:
        if self.phase in (Phase.CLOSING, Phase.STOPPED, Phase.DISCONNECTED):
            return
        self._commands_waiting = False
        self.phase = Phase.CLOSING
        self._out.append(CloseRequest(code, reason))
        self._after_close = action
        self._after_close_delay = delay
        self._heartbeat_at = None
        self._hello_deadline = None

    def _next_backoff(self) -> float:
        """One more failure in a row: how long to wait before the next connection."""
        self._failures += 1
        c = self.config
        return backoff_delay(self._failures, self._rand(), base=c.backoff_base, cap=c.backoff_cap)

    def _drop_session(self, reason: str = "", now: float | None = None) -> None:
        """Forget the session. With a ``reason``, the events Discord will not send again are a
        gap the next session's READY reports (:class:`Gap`)."""
        if reason and self.session_id is not None and now is not None:
            self._gap = (reason, self.session_id, self.seq, now)
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

    def _trusted_url(self, url: str | None) -> str | None:
        if url is None or tls_kept(url, self.config.gateway_url):
            return url
        self._notice(
            NoticeKind.DECODE_ERROR,
            f"ignored a resume URL that is not wss:// ({url.split('://', 1)[0]}://...); "
            "resuming at the gateway URL instead",
        )
        return None

    # ------------------------------------------------------------------ connecting

    def plan_connect(self, now: float) -> ConnectPlan | None:
        """Where and when to connect next (None: never again)."""
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
        if self.session_id is not None and self.resume_url and self._use_resume_url:
            self._use_resume_url = False  # a stale resume URL: try the main one (may resume)
        delay = self._next_backoff()
        self._connect_at = now + delay
        self._notice(NoticeKind.CONNECT_FAILED, f"{reason}; retrying in {delay:.1f} s")

    def connection_opened(self, now: float, *, identify_permitted: bool) -> None:
        """The websocket is open; wait for HELLO. ``identify_permitted``: the gate was taken."""
        self.phase = Phase.WAITING_HELLO
        self._limiter = self._new_limiter()
        self._after_close = None
        self._hello_deadline = now + self.config.hello_timeout
        self._heartbeat_at = None
        self._acked = True
        self._heartbeat_sent_at = None
        self._identify_permitted = identify_permitted
        self._reached_ready = False

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes, now: float) -> None:
        """Feed one complete gateway message (decompressed JSON text)."""
        if self.phase is Phase.CLOSING or self.phase is Phase.STOPPED:
            return  # after we asked to close, nothing counts: it will be replayed
        try:
            env = decode_envelope(data)
        except DECODE_ERRORS as exc:
            self.message_failed(f"malformed JSON from the gateway: {type(exc).__name__}: {exc}")
            return
        op = env.op
        counts = self._packets_received
        key = (env.t or "", op)
        counts[key] = counts.get(key, 0) + 1
        if op == 0:
            s = env.s
            if s is not None:
                self.seq = s
            t = env.t
            if t in ("READY", "RESUMED"):
                self._on_session_event(t, env.d, now)
            elif t is None:
                return
            elif self._guilds and t in GUILD_EVENTS:
                guild_arrived(self._guilds, env.d)
            events = self._filter
            if events is None or t in events or (self._cover and self._covered(t, env.d)):
                if s is not None:
                    self._pending.append(s)
                self._out.append(Dispatch(t, s, bytes(env.d), self.session_id or ""))
            return
        if op == Opcode.HEARTBEAT_ACK:
            self._acked = True
            if self._heartbeat_sent_at is not None:
                self._latency = now - self._heartbeat_sent_at
                self._heartbeats_acked += 1
            return
        if op == Opcode.HELLO:
            self._on_hello(env.d, now)
        elif op == Opcode.HEARTBEAT:
            self._notice(NoticeKind.HEARTBEAT_REQUEST, "server asked for a heartbeat")
            self._send_heartbeat(now)
        elif op == Opcode.RECONNECT:
            self._notice(NoticeKind.RECONNECT_REQUESTED, "op 7 RECONNECT")
            self._request_close(
                RESUMABLE_CLOSE, "reconnect requested", CloseAction.RESUME, Delay.NOW
            )
        elif op == Opcode.INVALID_SESSION:
            self._on_invalid_session(env.d, now)
        else:
            self._notice(NoticeKind.UNKNOWN_OPCODE, f"ignored unknown opcode {op}")

    def message_failed(self, reason: str) -> None:
        """A message from the gateway could not be processed (corrupt compressed bytes, bad
        JSON, a bug of ours): drop this connection with a resumable code; a new connection gets
        a new decompression context and Discord replays what follows the confirmed seq.

        The same failure twice in a row at the same point of a session would replay the same
        message forever: the second time the session is given up and the shard identifies."""
        point = (self.session_id, self.seq)
        if self.session_id is not None and self._poisoned_after == point:
            self._notice(
                NoticeKind.POISON,
                f"{reason}; it failed again after seq {self.seq}: starting a new session",
            )
            self._poisoned_after = None
            self._identify_reason = "unprocessable"
            self._request_close(
                RESUMABLE_CLOSE, "unprocessable", CloseAction.IDENTIFY, Delay.BACKOFF
            )
            return
        self._poisoned_after = point
        self._notice(NoticeKind.DECODE_ERROR, reason)
        self._request_close(RESUMABLE_CLOSE, "decode error", CloseAction.RESUME, Delay.BACKOFF)

    def _on_session_event(self, t: str, d: msgspec.Raw, now: float) -> None:
        if t == "READY":
            try:
                info = decode_ready(d)
            except DECODE_ERRORS as exc:
                self._request_close(
                    RESUMABLE_CLOSE, "bad READY", CloseAction.IDENTIFY, Delay.BACKOFF
                )
                self._notice(NoticeKind.DECODE_ERROR, f"READY without a session id: {exc}")
                return
            self.session_id = info.session_id
            self.resume_url = self._trusted_url(info.resume_gateway_url)
            self._use_resume_url = True
            self._pending.clear()
            self._guilds = waited(info, self.config.intents)
            self._notice(NoticeKind.READY, f"session {info.session_id[:8]}…")
            gap, self._gap = self._gap, None
            if gap is not None and self.publishing:  # in standby, the old generation publishes
                self._out.append(Gap(gap[0], gap[1], gap[2], gap[3], info.session_id, now))
        else:
            self._notice(NoticeKind.RESUMED, f"seq {self.seq}")
        self.phase = Phase.READY
        self._reached_ready = True
        self._failures = 0
        self._poisoned_after = None  # the replay got through: what failed before was transient
        self._flush_commands(now)

    def _on_hello(self, d: msgspec.Raw, now: float) -> None:
        if self.phase is not Phase.WAITING_HELLO:
            self._notice(NoticeKind.UNEXPECTED_HELLO, f"HELLO in phase {self.phase.value}; ignored")
            return
        interval, problem = hello_interval(d, self.config.heartbeat_range)
        if interval is None:
            self._request_close(RESUMABLE_CLOSE, "bad HELLO", CloseAction.RESUME, Delay.BACKOFF)
            self._notice(NoticeKind.DECODE_ERROR, problem)
            return
        if problem:
            self._notice(NoticeKind.HELLO_CLAMPED, problem)
        self._hello_deadline = None
        self._heartbeat_interval = interval
        # Keep a window's heartbeats, identify/resume and one heartbeat request in the budget.
        c = self.config
        beats = math.ceil(c.send_period / interval) + 2
        self._limiter.reserved = min(c.send_limit - 1, max(c.heartbeat_reserve, beats))
        self._acked = True
        self._heartbeat_at = heartbeat_time(now, now + interval * self._rand(), interval)
        if self.session_id is not None:
            # Resume after the last event handed to the broker: this process still holds what
            # the broker has not confirmed yet (it retries until it can), so a replay would only
            # duplicate it. A new process starts from the stored, confirmed seq instead.
            self.phase = Phase.RESUMING
            resume = {"token": c.token, "session_id": self.session_id, "seq": self.seq}
            self._send_priority(_encode({"op": Opcode.RESUME, "d": resume}), now, Opcode.RESUME)
        elif self._identify_permitted:
            self.phase = Phase.IDENTIFYING
            if self._send_priority(self._identify_payload, now, Opcode.IDENTIFY):
                self._out.append(IdentifySent(now))
        else:
            # Planned a resume but the session vanished meanwhile: identify on a new connection.
            self._request_close(RESUMABLE_CLOSE, "identify needed", CloseAction.RESUME, Delay.NOW)

    def _on_invalid_session(self, d: msgspec.Raw, now: float) -> None:
        try:
            resumable = bool(decode_bool(d))
        except DECODE_ERRORS:
            resumable = False
        if resumable and self.session_id is not None:
            self._notice(NoticeKind.INVALID_SESSION, "op 9 (resumable): reconnecting to resume")
            self._request_close(RESUMABLE_CLOSE, "invalid session", CloseAction.RESUME, Delay.NOW)
        else:
            self._notice(NoticeKind.INVALID_SESSION, "op 9 (not resumable): new session")
            self._drop_session("invalid_session", now)
            self._request_close(
                RESUMABLE_CLOSE, "invalid session", CloseAction.IDENTIFY, Delay.INVALID_SESSION
            )

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        """The next time :meth:`tick` must be called, or None."""
        deadline = self._heartbeat_at
        hello = self._hello_deadline
        if hello is not None and (deadline is None or hello < deadline):
            deadline = hello
        if self._commands.items:
            sending = self._commands_waiting and self.phase is Phase.READY
            due = self._commands.next_deadline(self._limiter, sending=sending)
            if due is not None and (deadline is None or due < deadline):
                deadline = due
        return deadline

    def tick(self, now: float) -> None:
        """Run what is due: heartbeat or zombie check, HELLO timeout, queued commands."""
        hello = self._hello_deadline
        if hello is not None and now >= hello and self.phase is Phase.WAITING_HELLO:
            self._notice(
                NoticeKind.HELLO_TIMEOUT, f"no HELLO within {self.config.hello_timeout:g} s"
            )
            self._request_close(RESUMABLE_CLOSE, "no hello", CloseAction.RESUME, Delay.BACKOFF)
            return
        beat = self._heartbeat_at
        if beat is not None and now >= beat:
            if not self._acked:
                self._notice(NoticeKind.ZOMBIE, "no heartbeat ACK since the last heartbeat")
                self._request_close(
                    RESUMABLE_CLOSE, "zombie connection", CloseAction.RESUME, Delay.NOW
                )
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
        self._confirmed_events += popped

    def stop(self, *, keep_session: bool) -> None:
        """Shut this shard down. ``keep_session``: close with a resumable code (the session is
        saved somewhere and a later process will resume it); otherwise close with 1000.
        Queued commands are given up (:class:`CommandsDropped`)."""
        self._stopping = True
        tickets = self._commands.clear()
        if tickets:
            self._out.append(CommandsDropped(tickets, "stopping"))
        if self.phase in (Phase.DISCONNECTED, Phase.STOPPED):
            self.phase = Phase.STOPPED
            if not keep_session:
                self._drop_session()
            return
        code = RESUMABLE_CLOSE if keep_session else SESSION_END_CLOSE
        self.phase = Phase.CLOSING
        self._out.append(CloseRequest(code, "shutting down"))
        self._heartbeat_at = None
        self._hello_deadline = None
        self._commands_waiting = False
        if not keep_session:
            self._drop_session()

    def connection_closed(self, now: float, code: int | None) -> CloseAction:
        """The websocket is closed. ``code``: the close code the server sent (None: no frame)."""
        self._heartbeat_at = None
        self._hello_deadline = None
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
            delay = Delay.NOW if self._reached_ready else Delay.BACKOFF
            self.last_close = describe_close(code)
            self._notice(NoticeKind.CLOSED, f"server closed the connection: {describe_close(code)}")
        self._after_close = None
        self.phase = Phase.DISCONNECTED
        if action is CloseAction.FATAL:
            self.phase = Phase.STOPPED
            self.fatal_code = code
            return action
        if action is CloseAction.IDENTIFY:
            self._drop_session(self._identify_reason or "session_closed", now)
        self._identify_reason = ""
        if delay is Delay.NOW and not self._reached_ready and self._failures > 0:
            delay = Delay.BACKOFF  # still failing: a clean close right away does not reset backoff
        if delay is Delay.BACKOFF:
            wait = self._next_backoff()
        elif delay is Delay.INVALID_SESSION:
            wait = 1.0 + 4.0 * self._rand()
        else:
            wait = 0.0
        self._connect_at = now + wait
        return action
