"""Worker ingest benchmark: events/s and worker CPU per event, and memory per idle shard.

Runs the gateway simulator in this process and the measured clients as subprocesses, so the CPU
figures are the client's alone (read from /proc). In one run it measures:

1. baseline: a bare ``websockets`` client loop (recv -> zstd -> msgspec envelope), the reference
   the issue names;
2. worker: ``spectacles-supervise`` (one shard, stdio JSON lines to a pipe), the same burst;
3. memory: RSS of a worker with 1 ready shard and with 100 ready shards, per extra shard.

Usage: python benchmarks/bench_worker.py [--events 200000] [--size 1024] [--repeat 3] [--shards 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from simenv import cpu_seconds, simulator_env

from spectacles_gateway.simulator import Simulator, SimulatorConfig

BIN = Path(sys.executable).parent
PAGE = os.sysconf("SC_PAGE_SIZE")

BASELINE = r"""
import asyncio, sys
import msgspec, uvloop, zstandard
from websockets.asyncio.client import connect

class Env(msgspec.Struct):
    op: int
    d: msgspec.Raw = msgspec.Raw(b"null")
    s: int | None = None
    t: str | None = None

decode = msgspec.json.Decoder(Env).decode

async def main(url):
    async with connect(url + "?v=10&encoding=json&compress=zstd-stream", max_size=None,
                       compression=None, proxy=None) as ws:
        dec = zstandard.ZstdDecompressor().decompressobj()
        n = 0
        while True:
            env = decode(dec.decompress(await ws.recv()))
            if env.op == 10:
                await ws.send('{"op":2,"d":{"token":"simulated-token","intents":513,'
                              '"properties":{"os":"linux","browser":"b","device":"d"},'
                              '"shard":[0,1]}}')
            elif env.op == 0 and env.t == "MESSAGE_CREATE":
                n += 1
                if n % 1000 == 0:
                    sys.stdout.write("%d\n" % n); sys.stdout.flush()

uvloop.run(main(sys.argv[1]))
"""


def gateway_env(sim: Simulator) -> dict[str, str]:
    """The environment that points one worker of ``spectacles-supervise`` at ``sim``."""
    return simulator_env(sim.http_base, SUPERVISOR_WORKERS="1")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the supervisor's workers; the simulator runs in-process)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def tree_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of ``pid`` itself, CPU seconds of its children)."""
    return cpu_seconds(pid), sum(cpu_seconds(c) for c in children(pid))


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


async def count_lines(stream: asyncio.StreamReader, box: list[float]) -> None:
    """box = [lines, time of first line, time of last line]; for the baseline, the last number."""
    while chunk := await stream.read(1 << 16):
        now = time.perf_counter()
        if not box[1]:
            box[1] = now
        box[0] += chunk.count(b"\n")
        box[2] = now


async def run_client(
    sim: Simulator, kind: str, events: int, size: int
) -> tuple[float, float, float]:
    """(events/s, CPU µs per event of the process doing the work, CPU µs per event of the
    supervisor relaying stdout; 0 for the baseline) for one burst."""
    env = gateway_env(sim)
    if kind == "worker":
        argv = [str(BIN / "spectacles-supervise")]
    else:
        argv = [sys.executable, "-c", BASELINE, sim.gateway_url]
    before = sim.ledger.identify_count()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, env=env
    )
    assert proc.stdout is not None
    box = [0.0, 0.0, 0.0]
    reader = asyncio.create_task(count_lines(proc.stdout, box))
    while sum(1 for r in sim.ledger.identifies[before:] if r.outcome == "ready") < 1:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # let GUILD_CREATEs and the first heartbeat pass
    box[:] = [0.0, 0.0, 0.0]
    own0, kids0 = tree_cpu(proc.pid)
    sim.burst(0, events, size)
    target = events if kind == "worker" else events // 1000
    while box[0] < target:
        await asyncio.sleep(0.005)
    own1, kids1 = tree_cpu(proc.pid)
    wall = box[2] - box[1]
    proc.terminate()
    await proc.wait()
    reader.cancel()
    rate = events / wall if wall > 0 else float("inf")
    if kind == "worker":  # the shard runs in the child; the parent relays its stdout
        return rate, (kids1 - kids0) / events * 1e6, (own1 - own0) / events * 1e6
    return rate, (own1 - own0) / events * 1e6, 0.0


async def memory(shards: int) -> tuple[float, float, float]:
    """(RSS MiB with 1 shard ready, RSS MiB with N ready, KiB per extra shard)."""
    results = []
    for n in (1, shards):
        config = SimulatorConfig(shard_count=n, max_concurrency=n, identify_window=0.0)
        async with Simulator(config) as sim:
            env = gateway_env(sim)
            proc = await asyncio.create_subprocess_exec(
                str(BIN / "spectacles-supervise"),
                stdout=asyncio.subprocess.DEVNULL,
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
            while sum(1 for r in sim.ledger.identifies if r.outcome == "ready") < n:
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.0)
            results.append(sum(rss_bytes(c) for c in children(proc.pid)))  # the worker
            proc.terminate()
            await proc.wait()
    one, many = results
    return one / 2**20, many / 2**20, (many - one) / (shards - 1) / 1024


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shards", type=int, default=100)
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float, float]]] = {"baseline": [], "worker": []}
    # identify_window=0: each run is a new process without a shared identify gate.
    config = SimulatorConfig(shard_count=1, guilds_per_shard=1, identify_window=0.0)
    async with Simulator(config) as sim:
        for _ in range(args.repeat):
            for kind in ("baseline", "worker"):  # alternated, so drift hits both alike
                results[kind].append(await run_client(sim, kind, args.events, args.size))
    print(
        f"burst of {args.events} MESSAGE_CREATE events of ~{args.size} B, zstd-stream, "
        f"medians of {args.repeat}"
    )
    med = {}
    for kind, runs in results.items():
        rate = statistics.median(r for r, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        relay = statistics.median(x for _, _, x in runs)
        med[kind] = cpu
        label = "bare loop (websockets+zstd+msgspec)" if kind == "baseline" else "worker (stdio)"
        extra = f"  + {relay:.2f} us in the supervisor's stdout relay" if relay else ""
        print(f"  {label:36s} {rate:10.0f} events/s  {cpu:6.2f} us CPU/event{extra}")
    print(f"  worker / baseline CPU per event: {med['worker'] / med['baseline']:.2f}")
    one, many, per = await memory(args.shards)
    print(
        f"memory: worker RSS {one:.1f} MiB with 1 shard ready, {many:.1f} MiB with "
        f"{args.shards}; {per:.0f} KiB per extra idle connected shard"
    )


if __name__ == "__main__":
    asyncio.run(main())
