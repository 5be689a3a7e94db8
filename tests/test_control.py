"""The control channel: its schema and framing (pure), and the supervisor's end of it over a real
socketpair, flooded (issue 15: nothing dropped, nothing cut in half, everything in order)."""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

import msgspec
import pytest

from spectacles_gateway.control import (
    Deliver,
    FrameError,
    FrameReader,
    Grant,
    Identified,
    IdentifyRequest,
    Relayed,
    ShardStatus,
    Start,
    Status,
    encode,
)
from spectacles_gateway.plan import WorkerPlan
from spectacles_gateway.protocol.shard import Session
from supervisor.channel import ControlChannel

PLAN = WorkerPlan(
    shard_ids=(0, 2),
    shard_count=4,
    token="a-secret-token",
    intents=513,
    gateway_url="wss://gateway.discord.gg",
    events=frozenset({"MESSAGE_CREATE"}),
    presence={"status": "idle", "activities": []},
)


def test_every_message_round_trips_in_any_pieces() -> None:
    messages = [
        Start(plan=PLAN, argv=["--shards", "0-3"], sessions={0: Session("s", 7, None), 2: None}),
        Grant(2),
        Relayed(123456),
        Deliver(b'{"shard_id":2,"packet":{"op":3,"d":{}}}'),
        IdentifyRequest(0),
        Identified(0, 12.5),
        Identified(2, None),
        Status(
            pid=42,
            broker=True,
            shards={0: ShardStatus("ready", True, 9, 41.5, None, None)},
            sessions={0: Session("s", 9, "wss://resume")},
            metrics=[("gateway_resumes", ("0",), 2.0), ("gateway_ping", ("0",), [1, 0, 3.5, 1])],
        ),
    ]
    stream = b"".join(encode(m) for m in messages)
    for step in (1, 3, 7, 64, len(stream)):
        reader = FrameReader()
        out = []
        for i in range(0, len(stream), step):
            out += reader.feed(stream[i : i + step])
        assert out == messages
    assert out[0].plan.token == PLAN.token  # type: ignore[union-attr]
    assert "a-secret-token" not in repr(out[0])  # a plan never shows its token


def test_a_bad_frame_is_reported_in_place_and_the_stream_goes_on() -> None:
    garbage = msgspec.msgpack.encode({"t": "no-such-message"})
    stream = encode(Grant(1)) + struct.pack(">I", len(garbage)) + garbage + encode(Grant(2))
    out = FrameReader().feed(stream)
    assert out[0] == Grant(1) and out[2] == Grant(2)
    assert isinstance(out[1], FrameError) and not out[1].fatal


def test_a_frame_larger_than_any_message_is_fatal() -> None:
    reader = FrameReader(max_frame=1024)
    (error,) = reader.feed(struct.pack(">I", 1 << 30) + b"xx")
    assert isinstance(error, FrameError) and error.fatal


def test_a_flooded_channel_delivers_every_message_whole_and_in_order() -> None:
    """The supervisor writes 20,000 grants and statuses (about 8 MiB) into a socket whose buffers
    are small while the worker side reads slowly: non-blocking sends fill the socket again and
    again; the channel keeps the rest and writes it as the socket accepts it."""
    parent, child = socket.socketpair()
    for sock in (parent, child):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    selector = selectors.DefaultSelector()
    channel = ControlChannel(parent, selector, lambda m: None, lambda: None)
    received: list[object] = []

    def worker_side() -> None:
        reader = FrameReader()
        child.settimeout(10)
        while len(received) < 20_000:
            data = child.recv(1500)
            if not data:
                return
            received.extend(reader.feed(data))
            time.sleep(0.0001)  # a slow reader

    reader_thread = threading.Thread(target=worker_side)
    reader_thread.start()
    big = Status(pid=1, broker=True, metrics=[("gateway_resumes", ("x" * 700,), 1.0)])
    sent = []
    for i in range(10_000):
        sent += [Grant(i), big]
        channel.send(Grant(i))
        channel.send(big)
    assert channel.backlog > 0  # the socket could not take it all at once
    deadline = time.monotonic() + 30
    while channel.backlog and time.monotonic() < deadline:
        for key, mask in selector.select(0.1):
            key.data(mask)
    reader_thread.join(30)
    assert channel.backlog == 0
    assert received == sent
    channel.close()
    child.close()


def test_a_worker_that_never_reads_shows_as_stalled() -> None:
    parent, child = socket.socketpair()
    selector = selectors.DefaultSelector()
    channel = ControlChannel(parent, selector, lambda m: None, lambda: None)
    blob = Deliver(b"x" * (1 << 20))
    for _ in range(20):
        channel.send(blob)
    assert channel.stalled  # over STALL_BYTES waiting: the supervisor kills and restarts it
    channel.close()
    child.close()


def test_drain_reads_what_a_dead_worker_wrote_last() -> None:
    parent, child = socket.socketpair()
    selector = selectors.DefaultSelector()
    got: list[object] = []
    channel = ControlChannel(parent, selector, got.append, lambda: None)
    child.sendall(encode(Identified(3, 1.0)) + encode(Status(pid=9, broker=False)))
    child.close()  # the worker died right after writing
    channel.drain()
    assert got == [Identified(3, 1.0), Status(pid=9, broker=False)]
    assert channel.closed


@pytest.mark.parametrize("size", [0, 1, 100])
def test_plan_shard_config_carries_the_limits(size: int) -> None:
    plan = msgspec.structs.replace(PLAN, command_queue_limit=size + 1, max_message_size=1 << 21)
    config = plan.shard_config(2)
    assert (config.shard_id, config.shard_count, config.command_queue_limit) == (2, 4, size + 1)
    assert plan.for_worker(3, (1,)).worker_id == 3
