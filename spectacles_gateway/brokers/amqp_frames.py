"""Pre-built AMQP 0-9-1 frames for ``basic.publish``: method, content header and body frames of
one message in one ``bytes`` object, ready for a single write.

pika marshals every publish through its generic ``Method``/``Header``/``Body`` objects and three
transport writes, which is most of a worker's CPU at tens of thousands of events per second
(performance.md). The frames here are byte-for-byte what pika would send (the unit tests compare
them with ``pika.frame`` marshalling), built from a few cached prefixes per event name and per
shard. Pure functions and a small immutable builder: no I/O, no clock reads except the message
timestamp.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass, field

from .wire import msgpack_header, unwrap_msgpack_string

__all__ = [
    "DEFAULT_FRAME_MAX",
    "FRAME_END",
    "FrameBuilder",
    "event_headers_table",
    "message_body",
    "message_id",
    "short_string",
]

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = b"\xce"
#: Frame header (type, channel, size) plus the frame-end octet.
FRAME_OVERHEAD = 8
#: RabbitMQ's and pika's default negotiated frame size.
DEFAULT_FRAME_MAX = 131072

BASIC_CLASS = 60
BASIC_PUBLISH = 40

FLAG_HEADERS = 1 << 13
FLAG_DELIVERY_MODE = 1 << 12
FLAG_EXPIRATION = 1 << 8
FLAG_MESSAGE_ID = 1 << 7
FLAG_TIMESTAMP = 1 << 6

_frame_head = struct.Struct(">BHI")  # type, channel, payload size
#: Content header frame up to the property flags: type, channel, size, class, weight, body size,
#: property flags.
_content_head = struct.Struct(">BHIHHQH")
_u8 = struct.Struct(">B").pack
_u32 = struct.Struct(">I").pack
_i32 = struct.Struct(">i").pack
_i64 = struct.Struct(">q").pack
_u64 = struct.Struct(">Q").pack

_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1
#: What follows the message id in the frames of a small event: its timestamp, the header
#: frame's end, the body frame's head, and the msgpack string header (of each size).
_tail_fix = struct.Struct(">QBBHIB").pack
_tail_16 = struct.Struct(">QBBHIBH").pack
_tail_32 = struct.Struct(">QBBHIBI").pack
_tail_raw = struct.Struct(">QBBHI").pack


def short_string(value: str | bytes) -> bytes:
    """An AMQP ``shortstr``: one length octet, then at most 255 bytes."""
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 255:
        raise ValueError(f"AMQP short string of {len(raw)} bytes (at most 255)")
    return _u8(len(raw)) + raw


def _int_field(value: int) -> bytes:
    """A field-table integer as pika writes it: ``I`` (int32) when it fits, else ``l``."""
    if _I32_MIN <= value <= _I32_MAX:
        return b"I" + _i32(value)
    return b"l" + _i64(value)


def event_headers_table(shard_id: int, seq: int | None, generation: int = 0) -> bytes:
    """The ``headers`` field table ``{"shard_id": N, "generation": G, "seq": N}`` (``seq`` left
    out if None). ``generation`` tells the two sides of a reshard apart."""
    body = b"\x08shard_id" + _int_field(shard_id) + b"\x0ageneration" + _int_field(generation)
    if seq is not None:
        body += b"\x03seq" + _int_field(seq)
    return _u32(len(body)) + body


def message_id(session: str, seq: int | None, shard_id: int) -> bytes:
    """A deterministic id for one dispatch: ``<session id>:<seq>``.

    The same event replayed after a RESUME gets the same id, so consumers can drop duplicates.
    Discord's session ids are 32 hex digits; anything that would not fit a short string is
    hashed. Without a seq (never for real dispatches) the shard id stands in, prefixed ``~``.
    """
    text = f"{session}:{seq}" if seq is not None else f"{session}:~{shard_id}"
    raw = text.encode()
    if len(raw) > 255:
        raw = hashlib.sha256(raw).hexdigest().encode()
    return raw


def message_body(frames: bytes) -> bytes:
    """The body of the message whose frames (method, content header, body...) are ``frames``."""
    pos = 0
    parts: list[bytes] = []
    index = 0
    while pos < len(frames):
        kind, _, size = _frame_head.unpack_from(frames, pos)
        start = pos + 7
        if index >= 2:
            if kind != FRAME_BODY:
                raise ValueError(f"frame {index} of a message has type {kind}")
            parts.append(frames[start : start + size])
        pos = start + size + 1
        index += 1
    return b"".join(parts)


def _method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    payload = (
        struct.pack(">HHH", BASIC_CLASS, BASIC_PUBLISH, 0)
        + short_string(exchange)
        + short_string(routing_key)
        + _u8(1 if mandatory else 0)
    )
    return _frame_head.pack(FRAME_METHOD, channel, len(payload)) + payload + FRAME_END


@dataclass
class FrameBuilder:
    """Builds the frames of event and command messages for one channel of one connection.

    ``channel`` and ``frame_max`` are the negotiated values (a new connection may differ: build
    a new builder and rebuild what is not yet confirmed). ``expiration_ms`` becomes the
    ``expiration`` property, ``persistent`` sets delivery mode 2, ``fmt`` is ``"msgpack"`` (the
    Spectacles msgpack string of the JSON text) or ``"json"`` (the JSON bytes as they are).
    """

    exchange: str
    expiration_ms: int
    channel: int = 1
    frame_max: int = DEFAULT_FRAME_MAX
    persistent: bool = False
    fmt: str = "msgpack"
    mandatory: bool = True
    generation: int = 0
    _methods: dict[str, bytes] = field(default_factory=dict, repr=False)
    _shards: dict[int, bytes] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.fmt not in ("msgpack", "json"):
            raise ValueError(f"unknown body format {self.fmt!r}")
        if self.frame_max <= FRAME_OVERHEAD:
            raise ValueError(f"frame_max {self.frame_max} is too small")
        self.body_max = self.frame_max - FRAME_OVERHEAD
        self._flags = FLAG_HEADERS | FLAG_EXPIRATION | FLAG_MESSAGE_ID | FLAG_TIMESTAMP
        if self.persistent:
            self._flags |= FLAG_DELIVERY_MODE
        # Between the headers table and the message id: delivery mode, expiration.
        self._middle = (b"\x02" if self.persistent else b"") + short_string(str(self.expiration_ms))
        self._msgpack = self.fmt == "msgpack"
        # Property bytes besides the headers table's cached prefix and the message id: flags,
        # seq, delivery mode and expiration, the id's length, the timestamp; plus the class,
        # weight and body size before them (the header frame's payload size).
        self._props_fixed = 12 + 2 + 4 + len(self._middle) + 1 + 8
        self._seq_middle = struct.Struct(f">i{len(self._middle)}sB").pack
        self._small_max = self.body_max - 5  # the largest msgpack header is 5 bytes

    @property
    def signature(self) -> tuple[int, int]:
        """What frames depend on besides the message: (channel, frame_max)."""
        return self.channel, self.frame_max

    def event(self, event: str, shard_id: int, seq: int | None, session: str, data: bytes) -> bytes:
        """All frames of one gateway event; ``data`` is the raw JSON text of ``d``."""
        method = self._methods.get(event)
        if method is None:
            method = _method_frame(self.channel, self.exchange, event, self.mandatory)
            if len(self._methods) < 4096:
                self._methods[event] = method
        n = len(data)
        prefix = self._shards.get(shard_id)
        if (
            prefix is None
            or seq is None
            or not _I32_MIN <= seq <= _I32_MAX
            or not 0 < n <= self._small_max
        ):
            return self._event(method, shard_id, seq, session, data)
        mid = f"{session}:{seq}".encode()
        if len(mid) > 255:  # not a session id of Discord's: message_id hashes it
            return self._event(method, shard_id, seq, session, data)
        # The common case, in three packs and one join: a shard seen before, an int32 seq, a
        # short message id, a body in one frame.
        now = int(time.time())
        if self._msgpack:
            if n < 32:
                size = n + 1
                tail = _tail_fix(now, 0xCE, FRAME_BODY, self.channel, size, 0xA0 | n)
            elif n < 65536:
                size = n + 3
                tail = _tail_16(now, 0xCE, FRAME_BODY, self.channel, size, 0xDA, n)
            else:
                size = n + 5
                tail = _tail_32(now, 0xCE, FRAME_BODY, self.channel, size, 0xDB, n)
        else:
            size = n
            tail = _tail_raw(now, 0xCE, FRAME_BODY, self.channel, size)
        return b"".join(
            (
                method,
                _content_head.pack(
                    FRAME_HEADER,
                    self.channel,
                    self._props_fixed + len(prefix) + len(mid),
                    BASIC_CLASS,
                    0,
                    size,
                    self._flags,
                ),
                prefix,
                self._seq_middle(seq, self._middle, len(mid)),
                mid,
                tail,
                data,
                FRAME_END,
            )
        )

    def _event(
        self, method: bytes, shard_id: int, seq: int | None, session: str, data: bytes
    ) -> bytes:
        """Any event: the general case of :meth:`event`, which also fills its cache."""
        if seq is not None and _I32_MIN <= seq <= _I32_MAX and shard_id in self._shards:
            table = self._shards[shard_id] + _i32(seq)
        else:
            table = event_headers_table(shard_id, seq, self.generation)
            if seq is not None and _I32_MIN <= seq <= _I32_MAX and 0 <= shard_id <= _I32_MAX:
                self._shards[shard_id] = table[:-4]
        mid = message_id(session, seq, shard_id)
        now = int(time.time())
        head = msgpack_header(len(data)) if self._msgpack else b""
        body_size = len(head) + len(data)
        props_size = 2 + len(table) + len(self._middle) + 1 + len(mid) + 8
        header = _content_head.pack(
            FRAME_HEADER, self.channel, 12 + props_size, BASIC_CLASS, 0, body_size, self._flags
        )
        parts: list[bytes | memoryview] = [
            method,
            header,
            table,
            self._middle,
            _u8(len(mid)),
            mid,
            _u64(now),
            FRAME_END,
        ]
        self._body_frames(parts, head, data)
        return b"".join(parts)

    def event_data(self, frames: bytes) -> bytes:
        """The raw JSON of ``d`` back out of an event's frames (for a rebuild)."""
        body = message_body(frames)
        return unwrap_msgpack_string(body) if self._msgpack else body

    def command(self, routing_key: str, body: bytes, *, exchange: str = "") -> bytes:
        """A bare message (a command handed on to another shard's queue): ``body`` as is,
        delivery mode as configured, no expiration (a command waits for its shard)."""
        method = _method_frame(self.channel, exchange, routing_key, self.mandatory)
        flags = FLAG_DELIVERY_MODE if self.persistent else 0
        props = _u8(2) if self.persistent else b""
        header = _content_head.pack(
            FRAME_HEADER, self.channel, 12 + 2 + len(props), BASIC_CLASS, 0, len(body), flags
        )
        parts: list[bytes | memoryview] = [method, header, props, FRAME_END]
        self._body_frames(parts, b"", body)
        return b"".join(parts)

    def _body_frames(self, parts: list[bytes | memoryview], head: bytes, body: bytes) -> None:
        """Body frames of ``head + body`` at most ``frame_max`` each, without copying ``body``
        (the one join of the caller copies it once); none for an empty body, as pika."""
        if not head and not body:
            return
        step = self.body_max
        channel = self.channel
        view = memoryview(body)
        first = min(step - len(head), len(body))  # the head goes in the first frame
        parts += (_frame_head.pack(FRAME_BODY, channel, len(head) + first), head, view[:first])
        parts.append(FRAME_END)
        for start in range(first, len(body), step):
            chunk = view[start : start + step]
            parts += (_frame_head.pack(FRAME_BODY, channel, len(chunk)), chunk, FRAME_END)
