"""What test code can do to a shard's connection: :meth:`Simulator.inject` takes these.

Each fault is a frozen dataclass whose :meth:`Fault.apply` acts on one live connection of the
shard (one that identified or resumed); a :class:`NextConnectionFault` replaces the HELLO of
the next new connection instead; a :class:`RestFault` changes the next ``/gateway/bot``
answers (:meth:`Simulator.inject_rest`). Every injection is recorded in ``ledger.faults`` first,
with the connections it reached.

The hostile ones (issue 10) are what a compromised or broken Discord could send: a
decompression bomb, a huge message in thousands of websocket fragments, a deeply nested ``d``,
an absurd heartbeat interval, a redirect to another host, a ``ws://`` gateway URL.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.connection import Conn, Streamed
from spectacles_gateway.simulator.gateway import Gateway
from spectacles_gateway.simulator.ledger import FaultRecord

logger = logging.getLogger(__name__)


class Fault:
    """Base class of what :meth:`Simulator.inject` can do to a shard's connection."""

    def apply(self, gw: Gateway, conn: Conn) -> None:
        """Do it to ``conn``, a live connection of the shard the fault was injected into."""
        raise TypeError(f"unknown fault {self!r}")


class NextConnectionFault(Fault):
    """A fault for the next new connection, whichever shard it turns out to be (a
    connection's shard is unknown until it identifies or resumes): it replaces HELLO."""

    def open(self, gw: Gateway, conn: Conn) -> None:
        """Send what the connection gets instead of HELLO."""
        raise NotImplementedError


class RestFault(Fault):
    """A fault of the REST side: it changes the next ``times`` answers of ``/gateway/bot``."""

    times: int = 1


def inject(gw: Gateway, shard_id: int, fault: Fault) -> None:
    """Record ``fault`` and apply it to the shard's live connection(s)."""
    targets = gw.live(shard_id)
    gw.ledger.faults.append(FaultRecord(time.monotonic(), shard_id, fault, [c.id for c in targets]))
    if isinstance(fault, NextConnectionFault):
        gw.next_open.append(functools.partial(fault.open, gw))
        return
    if isinstance(fault, RestFault):
        raise TypeError(f"{fault!r} is a REST fault: use Simulator.inject_rest")
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
class Op7BeforeHello(NextConnectionFault):
    """One-shot: the next new connection gets op 7 instead of HELLO (and is closed with 4000
    after ``reconnect_close_after`` if the client stays)."""

    def open(self, gw: Gateway, conn: Conn) -> None:
        conn.write([events.RECONNECT])
        gw.schedule_reconnect_close(conn)


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


# --- hostile Discord (issue 10) ----------------------------------------------------------------

_CHUNK = 1 << 20


def _append_large(gw: Gateway, conn: Conn, event: str, build: Any, *, replay: bool) -> None:
    """Log a dispatch without an ``id`` (no consumer is expected to receive it) on the
    connection's session and write it at once."""
    session = conn.session
    if session is None:
        logger.warning("fault on conn %d: no session to dispatch into", conn.id)
        return
    seq = gw.table.append(session, event, None, build)
    if not replay:
        session.skip_replay.add(seq)
    gw.table.flush(session, force=True)


def _content_message(event: str, seq: int, size: int, body: Any, fragments: int = 1) -> Streamed:
    """``{"t":event,"s":seq,"op":0,"d":{"content":"<body>"}}``, exactly ``size`` bytes long."""
    head = b'{"t":"%s","s":%d,"op":0,"d":{"content":"' % (event.encode(), seq)
    tail = b'"}}'
    room = max(size - len(head) - len(tail), 0)
    return Streamed(head, functools.partial(body, room), tail, fragments)


def _repeated(byte: bytes, n: int) -> Iterator[bytes]:
    block = byte * _CHUNK
    full, rest = divmod(n, _CHUNK)
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


def _random_hex(seed: int, n: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    while n > 0:
        take = min(n, _CHUNK)
        yield rng.randbytes((take + 1) // 2).hex().encode()[:take]
        n -= take


@dataclass(frozen=True)
class DecompressionBomb(Fault):
    """One MESSAGE_CREATE that decompresses to ``size`` bytes from very few compressed ones.

    Its ``content`` is one byte repeated: 128 MiB take about 4 KiB of zstd-stream (and about
    130 KiB of zlib-stream, deflate's best being about 1000:1), in one websocket message. The
    simulator never holds the whole message: it compresses it in 1 MiB chunks, on the
    connection's own compressor, so the stream stays valid for what follows. It is a real
    dispatch with a seq but no ``id`` (``ledger.events_sent`` leaves it out); with ``replay``
    a RESUME replays it like any other event, without, it is sent once and skipped after.
    """

    size: int = 128 << 20
    replay: bool = True
    event: str = "MESSAGE_CREATE"

    def apply(self, gw: Gateway, conn: Conn) -> None:
        body = functools.partial(_repeated, b"A")
        build = functools.partial(self._build, body)
        _append_large(gw, conn, self.event, build, replay=self.replay)

    def _build(self, body: Any, seq: int) -> Streamed:
        return _content_message(self.event, seq, self.size, body)


@dataclass(frozen=True)
class FragmentedMessage(Fault):
    """One MESSAGE_CREATE of ``size`` bytes sent in ``fragments`` websocket frames (one
    message: a text or binary frame, then continuation frames).

    Its ``content`` is random hex from ``seed`` (about 2:1 under compression), so the
    reassembled compressed message is big as well: the default, 80 MiB in 10,000 frames, is
    oversized at every level (frames, reassembled message, decompressed output). No ``id``;
    ``replay`` as for :class:`DecompressionBomb`.
    """

    size: int = 80 << 20
    fragments: int = 10_000
    seed: int = 0
    replay: bool = True
    event: str = "MESSAGE_CREATE"

    def apply(self, gw: Gateway, conn: Conn) -> None:
        _append_large(gw, conn, self.event, self._build, replay=self.replay)

    def _build(self, seq: int) -> Streamed:
        body = functools.partial(_random_hex, self.seed)
        return _content_message(self.event, seq, self.size, body, self.fragments)


@dataclass(frozen=True)
class DeepNesting(Fault):
    """One dispatch whose ``d`` nests ``depth`` levels: ``{"nested":[[[...]]]}`` (or
    ``{"nested":{"a":{"a":...}}}`` with ``objects``). Small on the wire (two bytes a level),
    deadly for a recursive parser. No ``id``; ``replay`` as for :class:`DecompressionBomb`.
    """

    depth: int = 10_000
    objects: bool = False
    replay: bool = True
    event: str = "MESSAGE_CREATE"

    def apply(self, gw: Gateway, conn: Conn) -> None:
        if self.objects:
            inner = b'{"a":' * self.depth + b"null" + b"}" * self.depth
        else:
            inner = b"[" * self.depth + b"]" * self.depth
        d = b'{"nested":' + inner + b"}"
        build = functools.partial(events.dispatch, self.event, d=d)
        _append_large(gw, conn, self.event, lambda seq: build(seq=seq), replay=self.replay)


@dataclass(frozen=True)
class AbsurdHello(NextConnectionFault):
    """One-shot: the next new connection's HELLO says ``heartbeat_interval: interval``,
    whatever it is (1e300, 1e-6, -41250, "41250", None). The simulator's own heartbeat timeout
    still follows ``heartbeat_interval_ms``."""

    interval: Any = 1e300

    def open(self, gw: Gateway, conn: Conn) -> None:
        d = {"heartbeat_interval": self.interval, "_trace": events.trace(gw.config.trace_name)}
        conn.write([events.envelope(10, events.dumps(d))])
        gw.arm_hb(conn)


@dataclass(frozen=True)
class GatewayBotRedirect(RestFault):
    """The next ``times`` ``/gateway/bot`` answers are a ``status`` redirect (301, 302, 307,
    308) to the same path on the other host (``other_host``), which answers like Discord and
    records whether the request carried ``Authorization`` (``HttpRecord.authorization``)."""

    status: int = 302
    times: int = 1


@dataclass(frozen=True)
class InsecureGatewayUrl(RestFault):
    """The next ``times`` ``/gateway`` and ``/gateway/bot`` answers give a plain ``ws://`` URL
    (a gateway on the other host, without TLS) instead of the simulator's own (``wss://``
    with ``tls=True``). A client that connects there shows in ``ledger.connections`` with
    ``listener == "other"`` and ``secure == False``, and its IDENTIFY in ``ledger.identifies``."""

    times: int = 1
