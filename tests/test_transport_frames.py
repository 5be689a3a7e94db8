"""The transport splits whole websocket frames itself (issue 14).

Whatever way the bytes are cut into reads, and whatever frames only websockets may handle
(ping, close, fragments, a masked or an oversized frame), the shard core gets the same messages
in the same order as through websockets' own parser, and websockets still answers and fails
what it must.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
from websockets.utils import accept_key

from spectacles_gateway.compression import make_decompressor
from spectacles_gateway.gate import LocalIdentifyGate
from spectacles_gateway.plan import DEFAULT_MAX_MESSAGE, WorkerPlan
from spectacles_gateway.protocol.events import Dispatch, Event
from spectacles_gateway.runner import ShardRunner
from spectacles_gateway.transport import GatewayConnection

from .support.transport import FakeTransport

TEXT, BINARY, CONT, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9


class Recorder:
    """The worker's side of a runner: what was published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, int | None]] = []
        self.other: list[Event] = []

    def publish(self, shard_id: int, dispatch: Dispatch) -> None:
        self.published.append((dispatch[0], dispatch[1]))

    def end_of_batch(self, shard_id: int) -> None:
        return None

    def shard_event(self, runner: ShardRunner, event: Event) -> None:
        self.other.append(event)

    def lease_expired(self, runner: ShardRunner) -> None:
        return None


Transport = FakeTransport


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = False, rsv: int = 0
) -> bytes:
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    return head + (b"\0\0\0\0" if mask else b"") + payload  # a zero mask leaves the data


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of what the client wrote after its HTTP request."""
    data = data[data.index(b"\r\n\r\n") + 4 :]
    out, pos = [], 0
    while pos < len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[pos : pos + 2])
            pos += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[pos : pos + 8])
            pos += 8
        key = data[pos : pos + 4]
        pos += 4
        out.append((opcode, bytes(b ^ key[i % 4] for i, b in enumerate(data[pos : pos + length]))))
        pos += length
    return out


def dispatch(seq: int, size: int = 40) -> bytes:
    d = {"id": str(seq), "content": "x" * size}
    return json.dumps({"op": 0, "t": "MESSAGE_CREATE", "s": seq, "d": d}).encode()


async def connect(
    max_size: int = DEFAULT_MAX_MESSAGE,
) -> tuple[GatewayConnection, Recorder, Transport, bytes]:
    plan = WorkerPlan(
        shard_ids=(0,),
        shard_count=1,
        token="simulated-token",
        intents=0,
        gateway_url="ws://127.0.0.1:9/",
        compress=None,
    )
    handler = Recorder()
    runner = ShardRunner(
        plan.shard_config(0), handler, LocalIdentifyGate(1), max_message_size=max_size
    )
    conn = GatewayConnection(
        runner,
        "ws://127.0.0.1:9/?v=10&encoding=json",
        make_decompressor(None, max_size),
        identify=True,
    )
    runner.connection = conn
    transport = Transport()
    conn.connection_made(transport)
    accept = accept_key(conn.request.headers["Sec-WebSocket-Key"]).encode()
    handshake = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    hello = b'{"op":10,"d":{"heartbeat_interval":41250},"s":null,"t":null}'
    ready = (
        b'{"op":0,"t":"READY","s":1,"d":{"session_id":"abc","resume_gateway_url":'
        b'"ws://127.0.0.1:9","v":10,"user":{},"guilds":[]}}'
    )
    return conn, handler, transport, handshake + frame(TEXT, hello) + frame(TEXT, ready)


def stream() -> tuple[bytes, list[int]]:
    """Dispatches 2..12 in every kind of frame the splitter must take or hand on."""
    parts = [frame(TEXT, dispatch(2)), frame(BINARY, dispatch(3))]
    parts.append(frame(PING, b"are you there"))
    parts.append(frame(TEXT, dispatch(4, 300)))  # 16-bit length
    parts.append(frame(TEXT, dispatch(5, 70_000)))  # 64-bit length
    whole = dispatch(6, 500)
    parts += [  # a message in three fragments, a ping between two of them
        frame(TEXT, whole[:100], fin=False),
        frame(CONT, whole[100:200], fin=False),
        frame(PING, b""),
        frame(CONT, whole[200:]),
    ]
    parts += [frame(TEXT, dispatch(seq)) for seq in range(7, 13)]
    return b"".join(parts), list(range(1, 13))


def cuts(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(how)
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice((1, 2, 3, 7, 64, 1000, 5000))
        out.append(data[pos : pos + n])
        pos += n
    return out


@pytest.mark.parametrize("how", ["whole", "bytes", "seed-1", "seed-2", "seed-3"])
async def test_every_cut_of_the_stream_gives_the_same_messages(how: str) -> None:
    conn, handler, transport, opening = await connect()
    data, seqs = stream()
    for piece in cuts(opening + data, how):
        conn.data_received(piece)
    assert handler.published == [("READY", 1)] + [("MESSAGE_CREATE", s) for s in seqs[1:]]
    frames = client_frames(bytes(transport.written))
    pongs = [payload for opcode, payload in frames if opcode == 0xA]
    assert pongs == [b"are you there", b""]  # websockets answered both pings
    assert conn.ws.state.name == "OPEN" and not conn.closing
    assert conn._split  # ... and the common frames were split here, not by websockets


async def test_a_close_frame_is_answered_and_nothing_after_it_is_taken() -> None:
    conn, handler, transport, opening = await connect()
    close = frame(CLOSE, struct.pack("!H", 4000) + b"bye")
    conn.data_received(opening + frame(TEXT, dispatch(2)) + close + frame(TEXT, dispatch(3)))
    assert handler.published == [("READY", 1), ("MESSAGE_CREATE", 2)]
    assert (CLOSE, struct.pack("!H", 4000) + b"bye") in client_frames(bytes(transport.written))
    assert conn.ws.state.name != "OPEN"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(TEXT, dispatch(3), mask=True), 1002),  # a server must not mask
        (frame(TEXT, dispatch(3), rsv=0x40), 1002),  # no extension was negotiated
        (frame(TEXT, dispatch(3, 1_100_000)), 1009),  # over the message limit
        (frame(CONT, dispatch(3)), 1002),  # a continuation of nothing
        # a whole message in the middle of a fragmented one:
        (frame(TEXT, b'{"op":0,', fin=False) + frame(TEXT, dispatch(3)), 1002),
    ],
    ids=["masked", "reserved-bit", "too-large", "stray-continuation", "interleaved"],
)
async def test_frames_websockets_must_refuse_fail_the_connection(bad: bytes, code: int) -> None:
    conn, handler, transport, opening = await connect(max_size=1 << 20)
    for piece in cuts(
        opening + frame(TEXT, dispatch(2)) + bad + frame(TEXT, dispatch(4)), "seed-4"
    ):
        conn.data_received(piece)
    assert handler.published == [("READY", 1), ("MESSAGE_CREATE", 2)]
    closes = [
        payload for opcode, payload in client_frames(bytes(transport.written)) if opcode == CLOSE
    ]
    assert closes and struct.unpack("!H", closes[0][:2])[0] == code
