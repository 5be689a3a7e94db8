"""The supervisor <-> worker control channel: one schema for both ends, and its framing.

Messages are msgspec structs tagged by ``t`` (a tagged union), sent as msgpack behind a 4-byte
big-endian length on a ``socketpair``. Pure code (no asyncio, no sockets): the supervisor's select
loop and the worker's asyncio protocol both frame with :func:`encode` and :class:`FrameReader`.

Supervisor -> worker: :class:`Start` (first, once), :class:`Grant`, :class:`Relayed`,
:class:`Deliver`, in fleet mode :class:`Assign`, :class:`Release`, :class:`Leases`, and in a
reshard :class:`Publish` and :class:`Retire`.
Worker -> supervisor: :class:`IdentifyRequest`, :class:`Identified`, :class:`Status`,
:class:`Released`, :class:`Publishing`.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from .plan import WorkerPlan
from .protocol.state import Session

__all__ = [
    "MAX_FRAME",
    "Assign",
    "Cover",
    "Deliver",
    "Drain",
    "FleetStart",
    "FleetView",
    "FrameError",
    "FrameReader",
    "Grant",
    "HandOff",
    "Identified",
    "IdentifyRequest",
    "Leases",
    "LockReshard",
    "Locked",
    "Lose",
    "MemberView",
    "Message",
    "Own",
    "Publish",
    "Publishing",
    "Relayed",
    "Release",
    "Released",
    "ReshardAsk",
    "Retire",
    "ShardStatus",
    "Start",
    "Status",
    "Superseded",
    "Switch",
    "UnlockReshard",
    "encode",
]

#: No control message is larger (a status report of 2,500 shards is about 300 KiB).
MAX_FRAME = 64 << 20

_HEADER = struct.Struct(">I")


class _Message(msgspec.Struct, tag_field="t", array_like=False, omit_defaults=True):
    pass


class Start(_Message, tag="start"):
    """The first message to a worker: what to run, how, and the sessions it resumes."""

    plan: WorkerPlan
    argv: list[str]  # the command line the settings are read from (with the environment)
    sessions: dict[int, Session | None]
    #: stdio: confirm an event only once the supervisor reported it written (:class:`Relayed`).
    confirm_on_relay: bool = False
    #: stdio, direct output: the descriptor (inherited) of the lock file that the workers
    #: writing to the supervisor's stdout share (:mod:`.brokers.sharedout`).
    stdout_lock: int | None = None
    #: Fleet mode: shards come (:class:`Assign`) and go (:class:`Release`).
    fleet: bool = False


class Grant(_Message, tag="grant"):
    """The identify permit for ``shard``: connect and IDENTIFY now."""

    shard: int


class Relayed(_Message, tag="relayed"):
    """stdio: the supervisor wrote this worker's output to stdout up to byte ``offset``."""

    offset: int


class Deliver(_Message, tag="deliver"):
    """A command read from the supervisor's stdin for this worker: ``body`` as a ``SEND``."""

    body: bytes


class IdentifyRequest(_Message, tag="identify"):
    """``shard`` must IDENTIFY: wait for its :class:`Grant`."""

    shard: int


class Identified(_Message, tag="identified"):
    """The permit of ``shard`` comes back: its IDENTIFY was sent at ``sent`` (the monotonic
    clock both processes read), or not at all (None)."""

    shard: int
    sent: float | None


class ShardStatus(msgspec.Struct, array_like=True):
    state: str
    ready: bool
    seq: int | None
    latency_ms: float | None
    last_close: str | None
    fatal: int | None
    guilds_pending: int = 0  # guilds READY listed that have not arrived yet
    publishing: bool = True  # False in standby


class Status(_Message, tag="status"):
    """Once a second and at exit: what changed since the last report (shards, sessions,
    metric series), plus whether the broker is connected."""

    pid: int
    broker: bool
    shards: dict[int, ShardStatus] = {}
    sessions: dict[int, Session | None] = {}
    metrics: list[tuple[str, tuple[str, ...], Any]] = []


class Assign(_Message, tag="assign"):
    """Fleet: run ``shard`` (its session is loaded from the store), owned under lease
    ``epoch``; publish nothing for it after ``until`` (monotonic clock) unless extended."""

    shard: int
    epoch: int
    until: float


class Release(_Message, tag="release"):
    """Fleet: stop ``shard``, resumably. ``save``: write its final confirmed session first (a
    handoff); otherwise the lease is already gone and the store would refuse it."""

    shard: int
    save: bool = True


class Publish(_Message, tag="publish"):
    """Reshard: leave standby, publish every shard's events from now on (the switch)."""


class Cover(_Message, tag="cover"):
    """Reshard, in standby: publish the events of these shards of the running generation
    (``shard_count`` shards): they are gone for good (4011)."""

    shard_count: int
    shards: list[int]


class Publishing(_Message, tag="publishing"):
    """Worker: every shard of ours publishes now (the answer to :class:`Publish`)."""

    generation: int


class Retire(_Message, tag="retire"):
    """Reshard: this generation is over: tell consumers (``GATEWAY_GAP``, ``reason``), close
    every shard with 1000, forget the stored sessions, exit 0. ``successor``: (generation,
    shard count) that took over, to record as current in the store (None: a rollback)."""

    reason: str = "reshard"
    successor: tuple[int, int] | None = None


class Leases(_Message, tag="leases"):
    """Fleet: the leases were renewed; each shard may publish until its new deadline."""

    until: dict[int, float]


class Released(_Message, tag="released"):
    """Fleet: ``shard`` is stopped; ``session`` is what it left in the store (None: nothing
    to resume, or not saved). ``reason``: ``release``, ``expired`` or ``fatal``."""

    shard: int
    session: Session | None
    reason: str = "release"
    generation: int = 0


class FleetStart(_Message, tag="fleet-start"):
    """The first message to the fleet agent: who this member is and what it may run."""

    member: str
    argv: list[str]  # the settings (Redis, prefix, fleet name, lease) are read from them
    shard_count: int
    allowed: list[int] | None  # the shards this member may own (--shards); None: any
    session_total: int  # Discord's session start budget as this member last saw it
    session_remaining: int
    session_reset_after: float  # seconds
    generation: int = 0  # the generation of shards the member starts with


class Own(_Message, tag="own"):
    """Agent: this member now owns ``shard`` under lease ``epoch`` until ``until``.
    ``how``: ``claim`` (it was free), ``failover`` (its owner's lease ran out; that happened at
    ``expired_at``, our clock), ``keep`` (a restarted agent found it still ours)."""

    shard: int
    epoch: int
    until: float
    how: str = "claim"
    expired_at: float | None = None
    generation: int = 0


class Lose(_Message, tag="lose"):
    """Agent: ``shard`` is no longer ours (not renewed in time, or taken): stop it now."""

    shard: int
    reason: str
    generation: int = 0


class HandOff(_Message, tag="hand-off"):
    """Agent: let ``shard`` go gracefully (save its session), then tell us (Released)."""

    shard: int
    reason: str
    generation: int = 0


class LockReshard(_Message, tag="lock-reshard"):
    """Supervisor: take the fleet's reshard lock (one reshard at a time in the fleet)."""


class UnlockReshard(_Message, tag="unlock-reshard"):
    """Supervisor: our reshard is over (rolled back or given up): let the lock go."""


class Locked(_Message, tag="locked"):
    """Agent: the answer to :class:`LockReshard`; ``holder``: who has it when not us."""

    ok: bool
    holder: str = ""


class Switch(_Message, tag="switch"):
    """Supervisor: our new generation publishes: own its leases, make it the fleet's (the
    generation pointer), let the old leases and the reshard lock go."""

    generation: int
    shard_count: int


class Superseded(_Message, tag="superseded"):
    """Agent: the fleet runs ``generation`` of ``shard_count`` shards now (another member's
    reshard switched): retire ours, run shards of the new one as they come."""

    generation: int
    shard_count: int


class ReshardAsk(_Message, tag="reshard-ask"):
    """Agent: an operator asked the fleet to reshard (``to``: None for Discord's count), and
    this member took the request."""

    to: int | None = None


class Drain(_Message, tag="drain"):
    """Supervisor: stopping: hand every shard off, then exit."""


class MemberView(msgspec.Struct, array_like=True):
    member: str
    capacity: int
    shards: int
    seen_ago: float  # seconds since its last renewal


class FleetView(_Message, tag="fleet-view"):
    """Agent: the fleet as this member sees it: members and every shard's owner and epoch."""

    members: list[MemberView]
    owners: dict[int, tuple[str, int]]
    targets: dict[str, int]


Message = (
    Start
    | Grant
    | Relayed
    | Deliver
    | IdentifyRequest
    | Identified
    | Status
    | Assign
    | Release
    | Leases
    | Released
    | FleetStart
    | Own
    | Lose
    | HandOff
    | Drain
    | FleetView
    | Publish
    | Publishing
    | Retire
    | Cover
    | LockReshard
    | UnlockReshard
    | Locked
    | Switch
    | Superseded
    | ReshardAsk
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """One framed message."""
    body = _encoder.encode(message)
    return _HEADER.pack(len(body)) + body


class FrameError(ValueError):
    """A frame that is not a message of this schema. ``fatal``: the stream cannot go on (a
    frame larger than any message: the length prefix itself is garbage)."""

    def __init__(self, detail: str, *, fatal: bool = False) -> None:
        super().__init__(detail)
        self.fatal = fatal


class FrameReader:
    """Turns a byte stream into messages; a frame that does not decode comes out as a
    :class:`FrameError` in its place, and the frames after it still decode."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Message | FrameError]:
        buf = self._buf
        buf += data
        out: list[Message | FrameError] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > self._max:
                buf.clear()
                out.append(FrameError(f"control frame of {size} bytes", fatal=True))
                return out
            if n - pos - 4 < size:
                break
            start = pos + 4
            pos = start + size
            try:
                out.append(_decoder.decode(bytes(buf[start:pos])))
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                out.append(FrameError(f"control frame that is not a message: {exc}"))
        del buf[:pos]
        return out
