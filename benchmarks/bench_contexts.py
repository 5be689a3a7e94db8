"""What one event costs in-process when it is alone on its shard (issue 14), without sockets,
wake-ups or an event loop: the decompressor, the shard core and the stdio record, for one shard
and for many shards taking turns.

The same realistic events (the simulator's corpus, compressed by the simulator's zstd-stream
compressor, a flush per message as Discord does) go through ``--shards`` real decompression
contexts and shard cores in turn, one event per shard per turn, as 512 shards at a few events a
second each arrive; and through one context and core, as a saturated shard's do. Each stage is
timed on its own (a stage's cost includes the cache misses of its own state) and in a row.
Printed: microseconds per event for each, and the ratio of many to one: what switching between
shards' state costs before any system call.

Usage: python benchmarks/bench_contexts.py [--shards 512] [--events 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from spectacles_gateway.brokers.wire import json_line
from spectacles_gateway.compression import ZstdStream
from spectacles_gateway.protocol.events import Dispatch
from spectacles_gateway.protocol.shard import ShardConfig, ShardProtocol
from spectacles_gateway.simulator.connection import new_zstd_compressor
from spectacles_gateway.simulator.corpus import corpus

HELLO = b'{"t":null,"s":null,"op":10,"d":{"heartbeat_interval":41250}}'
READY = (
    b'{"op":0,"t":"READY","s":1,"d":{"v":10,"session_id":"s%d","user":{"id":"1"},'
    b'"guilds":[],"resume_gateway_url":"wss://example.invalid"}}'
)
FLUSH_BLOCK = 1  # zstandard.COMPRESSOBJ_FLUSH_BLOCK


def ready_core(shard: int, shards: int) -> ShardProtocol:
    config = ShardConfig(
        shard_id=shard,
        shard_count=shards,
        token="simulated-token",
        intents=-1 & 0x3FFFFFF,
        gateway_url="wss://example.invalid/",
        events=None,
    )
    core = ShardProtocol(config, rand=lambda: 0.5)
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(HELLO, 0.0)
    core.receive(READY % shard, 0.0)
    core.events_received()
    return core


def frames(shards: int, events: int) -> list[tuple[int, bytes, bytes]]:
    """(shard, compressed frame, JSON) of ``events`` events, shards taking turns."""
    pool = corpus(1)
    compressors = [new_zstd_compressor(3) for _ in range(shards)]
    out = []
    for i in range(events):
        shard = i % shards
        seq = 2 + i // shards
        index = i % len(pool.templates)
        if pool.event(index) == "GUILD_CREATE":
            index += 1  # a large one now and then would dwarf the rest here
        payload = pool.encode(seq, (1 << 40) + i, index, 1000 + shard)
        c = compressors[shard]
        out.append((shard, c.compress(payload) + c.flush(FLUSH_BLOCK), payload))
    return out


def timed(run: Callable[[], None], count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


def measure(shards: int, events: int, repeat: int) -> dict[str, float]:
    stream = frames(shards, events)
    figures: dict[str, float] = {}

    def decompress() -> None:
        streams = [ZstdStream() for _ in range(shards)]
        for shard, frame, _ in stream:
            streams[shard].feed(frame)

    def core() -> None:
        cores = [ready_core(s, shards) for s in range(shards)]
        for shard, _, payload in stream:
            c = cores[shard]
            c.receive(payload, 1.0)
            c.events_received()

    def whole() -> None:
        streams = [ZstdStream() for _ in range(shards)]
        cores = [ready_core(s, shards) for s in range(shards)]
        out = []
        for shard, frame, _ in stream:
            c = cores[shard]
            c.receive(streams[shard].feed(frame) or b"", 1.0)
            for event in c.events_received():
                if type(event) is Dispatch:
                    out.append(json_line(event.event, shard, event.seq, event.data))
            if len(out) > 256:
                out.clear()

    # Setting up contexts and cores is inside the timing for every stage alike; it is
    # small next to the events (a few ms for 512 against a second of events).
    figures["decompress"] = timed(decompress, events, repeat)
    figures["core"] = timed(core, events, repeat)
    figures["in a row"] = timed(whole, events, repeat)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=512)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    one = measure(1, args.events, args.repeat)
    many = measure(args.shards, args.events, args.repeat)
    print(f"bench_contexts: {args.events} realistic events, best of {args.repeat}, us/event")
    print(f"  {'stage':12} {'1 shard':>9} {f'{args.shards} shards':>11} {'ratio':>6}")
    for stage in one:
        print(f"  {stage:12} {one[stage]:9.2f} {many[stage]:11.2f} {many[stage] / one[stage]:6.2f}")


if __name__ == "__main__":
    main()
