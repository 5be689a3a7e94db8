"""What test code can do to a shard's connection: :meth:`Simulator.inject` takes these."""

from __future__ import annotations

from dataclasses import dataclass


class Fault:
    """Base class of what :meth:`Simulator.inject` can do to a shard's connection."""


@dataclass(frozen=True)
class Reconnect(Fault):
    """Send op 7; close the connection (4000) if the client hasn't after a grace period."""


@dataclass(frozen=True)
class InvalidSession(Fault):
    """Send op 9 with ``d = resumable``; ``False`` also invalidates the session."""

    resumable: bool = False


@dataclass(frozen=True)
class WithholdAcks(Fault):
    """Stop (or restart) answering heartbeats with op 11 on the live connection(s)."""

    on: bool = True


@dataclass(frozen=True)
class HeartbeatRequest(Fault):
    """Send op 1: the client must heartbeat immediately."""


@dataclass(frozen=True)
class Close(Fault):
    """Close with ``code``; 4003/4004/4007/4009 invalidate the session, others keep it."""

    code: int = 4000
    reason: str = "simulated close"


@dataclass(frozen=True)
class Drop(Fault):
    """Abort the TCP connection: no close frame. The session stays resumable."""


@dataclass(frozen=True)
class CorruptCompressed(Fault):
    """Send one message whose compressed bytes are corrupt (undecodable)."""


@dataclass(frozen=True)
class MalformedJson(Fault):
    """Send one properly compressed message that is not valid JSON."""


@dataclass(frozen=True)
class Op7BeforeHello(Fault):
    """One-shot: the next new connection gets op 7 instead of HELLO.

    A connection's shard is unknown until it identifies or resumes, so this applies to the
    next connection opened after the injection, whichever shard it turns out to be.
    """


@dataclass(frozen=True)
class UnknownOpcode(Fault):
    """Send ``op 99`` (a future opcode) that clients must ignore."""


@dataclass(frozen=True)
class UnknownDispatch(Fault):
    """Dispatch ``t = "FUTURE_EVENT"`` with unknown fields (it takes a seq and has an id)."""
