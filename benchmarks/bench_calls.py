"""Python-level calls per event on the ingest path: transport -> core -> worker -> stdio broker.

Counts every Python function call (``sys.setprofile`` "call" events, C functions excluded) made
while one ``data_received`` handles a read that holds 1 event, and one that holds 50 (and the
worker's flush of its broker that the read scheduled), on a real
``GatewayConnection`` fed with Discord-framed zstd-stream bytes (no socket: the bytes are handed
to the protocol as the event loop would). The broker is the stdio broker writing to /dev/null.

The count is exact and repeatable, so it catches a layer that adds calls per event even on a
noisy machine. Usage: python benchmarks/bench_calls.py [--reads 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
from pathlib import Path
from typing import Any

import msgspec
from websockets.utils import accept_key

from spectacles_gateway.simulator import new_zstd_compressor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.transport import FakeTransport

EVENT = msgspec.json.encode(
    {"id": "1" * 18, "channel_id": "2" * 18, "content": "x" * 900, "author": {"id": "3" * 18}}
)


def frame(data: bytes) -> bytes:
    n = len(data)
    if n < 126:
        return bytes((0x82, n)) + data
    if n < 65536:
        return struct.pack("!BBH", 0x82, 126, n) + data
    return struct.pack("!BBQ", 0x82, 127, n) + data


class Feed:
    def __init__(self) -> None:
        self.zstd = new_zstd_compressor()
        self.seq = 0

    def message(self, payload: bytes) -> bytes:
        import zstandard

        c = self.zstd
        return frame(c.compress(payload) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))

    def dispatch(self) -> bytes:
        self.seq += 1
        return self.message(b'{"t":"MESSAGE_CREATE","s":%d,"op":0,"d":%b}' % (self.seq, EVENT))


async def build() -> tuple[Any, Feed]:
    from spectacles_gateway import runner as runner_module
    from spectacles_gateway import transport, worker
    from spectacles_gateway.brokers.stdio import StdioBroker
    from spectacles_gateway.compression import make_decompressor
    from spectacles_gateway.gate import LocalIdentifyGate

    fd = os.open(os.devnull, os.O_WRONLY)
    broker = StdioBroker(stdout_fd=fd)
    plan = worker.WorkerPlan(
        shard_ids=(0,),
        shard_count=1,
        token="simulated-token",
        intents=0,
        gateway_url="ws://127.0.0.1:9/",
        events=frozenset({"MESSAGE_CREATE"}),
    )
    w = worker.Worker(plan, broker, gate=LocalIdentifyGate(1))
    w.bind_broker()
    await broker.start()
    runner = runner_module.ShardRunner(plan.shard_config(0), w, w.gate)
    w.runners[0] = runner
    conn = transport.GatewayConnection(
        runner, "ws://127.0.0.1:9/?v=10", make_decompressor("zstd-stream"), identify=True
    )
    runner.connection = conn
    conn.connection_made(FakeTransport(keep=False))
    accept = accept_key(conn.request.headers["Sec-WebSocket-Key"]).encode()
    feed = Feed()
    handshake = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    hello = feed.message(b'{"t":null,"s":null,"op":10,"d":{"heartbeat_interval":41250}}')
    feed.seq = 1
    ready = feed.message(
        b'{"t":"READY","s":1,"op":0,"d":{"session_id":"abc","resume_gateway_url":'
        b'"ws://127.0.0.1:9","v":10,"user":{},"guilds":[]}}'
    )
    conn.data_received(handshake + hello + ready)
    return conn, feed


def count_calls(conn: Any, data: bytes) -> int:
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        conn.data_received(data)
        flush(conn)
    finally:
        sys.setprofile(None)
    return calls


def flush(conn: Any) -> None:
    """The worker flushes its broker once per turn of the event loop (a callback it scheduled):
    run it now, so that it is counted with the read that asked for it."""
    worker = conn.handler
    if getattr(worker, "_wake_scheduled", False):
        worker._on_wake()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    conn, feed = await build()
    for _ in range(20):  # warm caches (event name cache, first-use paths)
        conn.data_received(feed.dispatch())
        flush(conn)
    single = [count_calls(conn, feed.dispatch()) for _ in range(args.reads)]
    batch = [
        count_calls(conn, b"".join(feed.dispatch() for _ in range(50)))
        for _ in range(max(1, args.reads // 10))
    ]
    print(f"calls for a read of 1 event:  min {min(single)}  max {max(single)}")
    print(
        f"calls for a read of 50 events: min {min(batch)}  max {max(batch)}  "
        f"({min(batch) / 50:.1f} per event)"
    )


if __name__ == "__main__":
    asyncio.run(main())
