"""Redis Sentinel figures (issue 11), against a real master, replica and Sentinel started on
loopback (:mod:`tests.support.sentinel`, a master is down after 400 ms).

1. **Following the master.** A client of the product (:func:`redis_client`) writes a counter
   every 5 ms; the master fails over (``SENTINEL FAILOVER``, or ``kill -9`` of its
   ``redis-server``). Printed per run: the time until every Sentinel names the new master, and
   until the client's writes land on the new master.
2. **The cost of WAIT.** What ``WAIT 1`` (a write acknowledged by the replica before the caller
   is told) would add to the fleet's lease renewal (8 leases, one pipeline) and to a session
   write (the store's Lua script for one shard): median and 99th percentile of each, with and
   without, in the same run.

    .venv/bin/python benchmarks/bench_sentinel.py [--runs 3] [--ops 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spectacles_gateway.fleet.keys import FleetKeys
from spectacles_gateway.fleet.leases import LeaseBook
from spectacles_gateway.redis_link import REDIS_ERRORS, redis_client
from spectacles_gateway.redis_store import RedisStore
from tests.support.sentinel import SentinelSet, sentinel_set, sentinel_settings


async def follow(group: SentinelSet, how: str) -> tuple[float, float]:
    client = redis_client(sentinel_settings(group, "bench:"), name="bench-follow")
    written = 0
    stop = False

    async def writer() -> None:
        nonlocal written
        while not stop:
            try:
                await client.set("counter", written + 1)
                written += 1
            except REDIS_ERRORS:
                pass
            await asyncio.sleep(0.005)

    task = asyncio.create_task(writer())
    while written < 50:
        await asyncio.sleep(0.01)
    start = time.monotonic()
    old = group.failover() if how == "failover" else group.kill_master()
    new = await asyncio.to_thread(group.wait_new_master, old, 60)
    agreed = time.monotonic() - start
    landed = float("nan")
    with group.server(new) as r:
        while time.monotonic() - start < 60:
            value = r.get("counter")
            if value is not None and int(value) >= written - 1:  # the writer's latest
                landed = time.monotonic() - start
                break
            await asyncio.sleep(0.005)
    stop = True
    await task
    await client.aclose()
    return agreed, landed


async def timed(op: object, ops: int) -> tuple[float, float]:
    assert callable(op)
    samples = []
    for _ in range(ops):
        began = time.perf_counter()
        await op()
        samples.append(time.perf_counter() - began)
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6


async def wait_cost(group: SentinelSet, ops: int) -> dict[str, tuple[float, float]]:
    settings = sentinel_settings(group, "bench-wait:")
    client = redis_client(settings, name="bench-wait")
    keys = FleetKeys("bench-wait:", "bench")
    book = LeaseBook(client, keys, "me", 10.0)
    owned = {s: await book.claim(s) for s in range(8)}  # (with WAIT where the code has it)
    store = RedisStore(client, prefix="bench-wait:", session_ttl=300)
    entry_args = [0, 300_000, "1", "session", "1", 1, "1", "wss://x", 8]

    async def renew_pipeline(wait: bool) -> list[object]:
        async with client.pipeline(transaction=False) as pipe:
            for shard, epoch in owned.items():
                await book._renew(
                    keys=[keys.lease(shard)], args=[book.value(epoch), book.lease_ms], client=pipe
                )
            if wait:
                pipe.execute_command("WAIT", 1, 1000)
            replies: list[object] = await pipe.execute()
        return replies

    async def renew() -> None:
        await renew_pipeline(False)

    async def renew_wait() -> None:
        assert int(str((await renew_pipeline(True))[-1])) == 1

    async def save() -> None:
        async with client.pipeline(transaction=False) as pipe:
            await store._write_script(keys=[*store.keys(0), "-"], args=entry_args, client=pipe)
            await pipe.execute()

    async def save_wait() -> None:
        async with client.pipeline(transaction=False) as pipe:
            await store._write_script(keys=[*store.keys(0), "-"], args=entry_args, client=pipe)
            pipe.execute_command("WAIT", 1, 1000)
            replies = await pipe.execute()
        assert int(replies[-1]) == 1

    out = {}
    for name, op in (
        ("renew 8 leases", renew),
        ("renew 8 leases + WAIT 1", renew_wait),
        ("save a session", save),
        ("save a session + WAIT 1", save_wait),
    ):
        await timed(op, 100)  # warm up
        out[name] = await timed(op, ops)
    await client.aclose()
    return out


def span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()
    for how in ("failover", "kill"):
        agreed, landed = [], []
        for run in range(args.runs):
            with sentinel_set(1) as group:
                a, w = await follow(group, how)
            agreed.append(a)
            landed.append(w)
            print(f"{how} run {run + 1}: Sentinels agree {a:.2f} s, writes on new master {w:.2f} s")
        print(f"{how}: Sentinels agree {span(agreed)} s, writes on the new master {span(landed)} s")
    costs: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.runs):
        with sentinel_set(1) as group:
            for name, figures in (await wait_cost(group, args.ops)).items():
                costs.setdefault(name, []).append(figures)
    for name, runs in costs.items():
        medians = [m for m, _ in runs]
        p99s = [p for _, p in runs]
        print(f"{name}: median {span(medians)} µs, p99 {span(p99s)} µs over {args.runs} runs")


if __name__ == "__main__":
    asyncio.run(main())
