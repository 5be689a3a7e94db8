"""What the shard core asks its driver to do, and what it reports: its one way out.

After any input (:meth:`ShardProtocol.receive`, :meth:`~ShardProtocol.tick`,
:meth:`~ShardProtocol.queue_command`, ...) the driver calls
:meth:`~ShardProtocol.events_received` and handles each event in order:

- :class:`Dispatch`: publish it (it passed the event filter);
- :class:`SendData`: write this text payload to the websocket now;
- :class:`CloseRequest`: close the websocket with this code;
- :class:`IdentifySent`: an IDENTIFY went out: give the identify permit back;
- :class:`CommandsSent`: these commands were written: acknowledge them to their source;
- :class:`CommandsDropped`: these commands will never be sent: acknowledge them too;
- :class:`Notice`: a lifecycle fact worth a log line or a metric;
- :class:`Gap`: a new session replaced one that was given up: tell the consumers.

Counters for metrics are not events: :meth:`ShardProtocol.stats` is a read-only snapshot.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import msgspec

__all__ = [
    "CloseRequest",
    "CommandsDropped",
    "CommandsSent",
    "Dispatch",
    "Event",
    "Gap",
    "IdentifySent",
    "Notice",
    "NoticeKind",
    "SendData",
    "ShardCounts",
    "ShardStats",
]


class Dispatch(NamedTuple):
    """An op-0 event to publish: name, ``s``, the raw JSON bytes of ``d``, and its session."""

    event: str
    seq: int | None
    data: bytes
    session: str


class SendData(NamedTuple):
    """A text payload (compact JSON) to write to the websocket, in order."""

    payload: bytes


class CloseRequest(NamedTuple):
    """Close the websocket with ``code`` (never 1000/1001 unless the session is meant to end)."""

    code: int
    reason: str


class IdentifySent(NamedTuple):
    """An IDENTIFY was handed over at ``at`` (core time): the identify window starts there."""

    at: float


class CommandsSent(NamedTuple):
    """Commands queued with these tickets were handed to the websocket."""

    tickets: tuple[object, ...]


class CommandsDropped(NamedTuple):
    """Commands queued with these tickets will never be sent (``reason``: a metric label):
    acknowledge them to their source so that they are not redelivered forever."""

    tickets: tuple[object, ...]
    reason: str


class Gap(NamedTuple):
    """Discord will never send some events of this shard again: the session ``old_session``
    was given up at ``since`` (core time) after ``last_seq``, and ``new_session`` started at
    ``until``. ``reason``: ``invalid_session`` (op 9 false), ``session_closed`` (4003, 4007,
    4009), ``unprocessable`` (a message that failed twice), ``identify`` (any other new
    session in place of one that existed)."""

    reason: str
    old_session: str
    last_seq: int | None
    since: float
    new_session: str
    until: float


class NoticeKind(enum.Enum):
    """Lifecycle facts. ``level`` is how loud the log line is (``debug``, ``info``,
    ``warning``); ``reconnect`` is the reason label when the fact ends the connection."""

    READY = ("ready", "info", None)
    RESUMED = ("resumed", "info", None)
    RECONNECT_REQUESTED = ("reconnect requested", "info", "op7")
    INVALID_SESSION = ("invalid session", "info", "op9")
    CLOSED = ("closed", "info", "server_close")
    HEARTBEAT_REQUEST = ("heartbeat request", "debug", None)
    UNKNOWN_OPCODE = ("unknown opcode", "debug", None)
    UNEXPECTED_HELLO = ("unexpected hello", "warning", None)
    HELLO_CLAMPED = ("heartbeat interval clamped", "warning", None)
    ZOMBIE = ("zombie", "warning", "zombie")
    HELLO_TIMEOUT = ("hello timeout", "warning", "hello_timeout")
    DECODE_ERROR = ("decode error", "warning", "decode_error")
    POISON = ("unprocessable message", "warning", "poison")
    CONNECT_FAILED = ("connect failed", "warning", "connect_failed")
    COMMANDS_EXPIRED = ("commands expired", "warning", None)

    def __init__(self, label: str, level: str, reconnect: str | None) -> None:
        self.label = label  # for log lines
        self.level = level
        self.reconnect = reconnect


class Notice(NamedTuple):
    """Worth a log line or a metric: ``kind`` says what, ``detail`` is free text."""

    kind: NoticeKind
    detail: str


Event = (
    Dispatch
    | SendData
    | CloseRequest
    | IdentifySent
    | CommandsSent
    | CommandsDropped
    | Notice
    | Gap
)


class ShardStats(msgspec.Struct, frozen=True, gc=False):
    """A read-only snapshot of one shard's state, for status reports (what it counted for
    the metrics is taken apart: :class:`ShardCounts`)."""

    phase: str
    ready: bool
    session_id: str | None
    seq: int | None
    confirmed_seq: int | None
    latency: float | None  # seconds, last heartbeat round trip
    last_close: str
    fatal_code: int | None
    commands_waiting: int
    #: Guilds READY listed that have not arrived yet (GUILD_CREATE); 0 without the GUILDS intent.
    guilds_pending: int = 0
    #: False in standby: dispatches are read and counted, and nothing is published.
    publishing: bool = True


class ShardCounts(msgspec.Struct, frozen=True, gc=False):
    """What one shard counted since the previous ``take_counts()`` (differences, not totals:
    the once-a-second round adds them to its counters as they are, and a busy shard's round
    copies and compares nothing)."""

    packets_received: dict[tuple[str, int], int]  # (dispatch type or "", op) -> packets
    packets_sent: dict[int, int]  # op -> packets
    commands_sent: int
    confirmed_events: int
    heartbeats_acked: int
    latency: float | None  # seconds, the last heartbeat round trip (of any time)
