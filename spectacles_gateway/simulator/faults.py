"""What test code can do to a shard's connection: :meth:`Simulator.inject` takes these.

Each fault is a frozen dataclass whose :meth:`Fault.apply` acts on one live connection of the
shard (one that identified or resumed). :func:`inject` records the fault in the ledger first,
with the connections it reached.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.connection import Conn
from spectacles_gateway.simulator.gateway import Gateway
from spectacles_gateway.simulator.ledger import FaultRecord

logger = logging.getLogger(__name__)


class Fault:
    """Base class of what :meth:`Simulator.inject` can do to a shard's connection."""

    def apply(self, gw: Gateway, conn: Conn) -> None:
        """Do it to ``conn``, a live connection of the shard the fault was injected into."""
        raise TypeError(f"unknown fault {self!r}")


def inject(gw: Gateway, shard_id: int, fault: Fault) -> None:
    """Record ``fault`` and apply it to the shard's live connection(s)."""
    targets = gw.live(shard_id)
    gw.ledger.faults.append(FaultRecord(time.monotonic(), shard_id, fault, [c.id for c in targets]))
    if isinstance(fault, Op7BeforeHello):
        gw.op7_pending.append(shard_id)
        return
    if not targets:
        logger.warning("inject %r: shard %d has no live connection", fault, shard_id)
    for conn in targets:
        fault.apply(gw, conn)


@dataclass(frozen=True)
class Reconnect(Fault):
    """Send op 7; close the connection (4000) if the client hasn't after a grace period."""

    def apply(self, gw: Gateway, conn: Conn) -> None:
        conn.write([events.RECONNECT])
        gw.schedule_reconnect_close(conn)


@dataclass(frozen=True)
class InvalidSession(Fault):
    """Send op 9 with ``d = resumable``; ``False`` also invalidates the session."""

    resumable: bool = False

    def apply(self, gw: Gateway, conn: Conn) -> None:
        conn.write(
            [events.INVALID_SESSION_TRUE if self.resumable else events.INVALID_SESSION_FALSE]
        )
        session = conn.session
        if session is not None:
            gw.table.detach(session)
            if not self.resumable:
                session.invalidated = True


@dataclass(frozen=True)
class WithholdAcks(Fault):
    """Stop (or restart) answering heartbeats with op 11 on the live connection(s)."""

    on: bool = True

    def apply(self, gw: Gateway, conn: Conn) -> None:
        conn.withhold_acks = self.on


@dataclass(frozen=True)
class HeartbeatRequest(Fault):
    """Send op 1: the client must heartbeat immediately."""

    def apply(self, gw: Gateway, conn: Conn) -> None:
        conn.write([events.HEARTBEAT_REQUEST])


@dataclass(frozen=True)
class Close(Fault):
    """Close with ``code``; 4003/4004/4007/4009 invalidate the session, others keep it."""

    code: int = 4000
    reason: str = "simulated close"

    def apply(self, gw: Gateway, conn: Conn) -> None:
        gw.server_close(conn, self.code, self.reason)


@dataclass(frozen=True)
class Drop(Fault):
    """Abort the TCP connection: no close frame. The session stays resumable."""

    def apply(self, gw: Gateway, conn: Conn) -> None:
        gw.drop(conn)


@dataclass(frozen=True)
class CorruptCompressed(Fault):
    """Send one message whose compressed bytes are corrupt (undecodable)."""

    def apply(self, gw: Gateway, conn: Conn) -> None:
        conn.write_corrupt()


@dataclass(frozen=True)
class MalformedJson(Fault):
    """Send one properly compressed message that is not valid JSON."""

    def apply(self, gw: Gateway, conn: Conn) -> None:
        conn.write([events.MALFORMED_JSON])


@dataclass(frozen=True)
class Op7BeforeHello(Fault):
    """One-shot: the next new connection gets op 7 instead of HELLO.

    A connection's shard is unknown until it identifies or resumes, so this applies to the
    next connection opened after the injection, whichever shard it turns out to be.
    """


@dataclass(frozen=True)
class UnknownOpcode(Fault):
    """Send ``op 99`` (a future opcode) that clients must ignore."""

    def apply(self, gw: Gateway, conn: Conn) -> None:
        conn.write([events.UNKNOWN_OPCODE])


@dataclass(frozen=True)
class UnknownDispatch(Fault):
    """Dispatch ``t = "FUTURE_EVENT"`` with unknown fields (it takes a seq and has an id)."""

    def apply(self, gw: Gateway, conn: Conn) -> None:
        session = conn.session
        if session is None:
            return
        uid = gw.ids.take()
        guild_id = session.factory.guild_for(uid)
        gw.table.append(
            session,
            "FUTURE_EVENT",
            uid,
            lambda s: events.future_event(seq=s, event_id=uid, guild_id=guild_id),
        )
        gw.table.flush(session, force=True)
