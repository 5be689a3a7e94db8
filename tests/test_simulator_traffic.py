"""Generated traffic (issue 14): the realistic profile, per-shard phases and jitter, and a
paced 8,000 events/s on one shard, over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zstandard
from websockets.asyncio.client import connect

from spectacles_gateway.simulator import Simulator, SimulatorConfig
from spectacles_gateway.simulator.corpus import INTENT_OF, Corpus, measure, profile_stream
from tests.gwtest import t
from tests.simclient import SimClient, http_get
from tests.support.simulators import SimulatorPool

ALL_INTENTS = 53_608_447


async def identified(
    pool: SimulatorPool, sim: Simulator, shard: tuple[int, int] = (0, 1), intents: int = ALL_INTENTS
) -> SimClient:
    return (await pool.identify(sim, shard, intents))[0]


# --- the realistic corpus ---------------------------------------------------------------------


def test_realistic_profile_compresses_a_few_to_one_and_uniform_forty() -> None:
    realistic = measure(profile_stream(SimulatorConfig(profile="realistic", seed=1), 20_000))
    uniform = measure(profile_stream(SimulatorConfig(), 20_000))
    print(f"\nrealistic: {realistic}\nuniform:   {uniform}")
    assert 3.0 < realistic["zstd_ratio"] < 10.0
    assert uniform["zstd_ratio"] > 30.0
    assert 300 < realistic["p50"] < realistic["p90"] < realistic["p99"] < realistic["max"]
    assert realistic["max"] > 100_000  # the occasional large GUILD_CREATE
    assert uniform["max"] - uniform["p50"] < 16  # one size (the seq digits vary)


def test_the_pool_repeats_from_its_seed() -> None:
    one, again, other = Corpus(seed=5, pool=256), Corpus(seed=5, pool=256), Corpus(6, pool=256)
    assert [t.text for t in one.templates] == [t.text for t in again.templates]
    assert [t.text for t in one.templates] != [t.text for t in other.templates]
    kinds = {t.event for t in one.templates}
    assert kinds == set(INTENT_OF)
    payload = json.loads(one.encode(7, 1_300_000_000_000_000_000, 3, 1_100_000_000_000_000_000))
    assert payload["s"] == 7 and payload["d"]["id"] == "1300000000000000000"
    assert payload["d"]["guild_id"] == "1100000000000000000"


def decoded(frames: list[bytes | str]) -> list[bytes]:
    """A connection's messages decoded again from its first frame, as the JSON bytes sent."""
    decompress = zstandard.ZstdDecompressor().decompressobj().decompress
    return [decompress(f) for f in frames if isinstance(f, bytes)]


async def test_realistic_events_on_the_wire_and_replayed_byte_for_byte(
    sim_pool: SimulatorPool,
) -> None:
    sim = await sim_pool.start(shard_count=2, profile="realistic", seed=3, rate=400)
    client = await identified(sim_pool, sim, shard=(1, 2))
    session_id = sim.session_ids(1)[0]
    got = await client.recv_dispatches(250, timeout=t(15))
    generated = [p for p in got if "_simulated" not in p["d"]]  # not the READY guilds
    kinds = {p["t"] for p in generated}
    assert {"MESSAGE_CREATE", "TYPING_START", "PRESENCE_UPDATE"} <= kinds
    assert len(kinds) >= 5
    ids = [p["d"]["id"] for p in generated]
    assert len(set(ids)) == len(ids)
    assert set(ids) <= set(sim.ledger.events_sent(1))
    assert all((int(p["d"]["guild_id"]) >> 22) % 2 == 1 for p in generated)  # shard 1's guilds

    original = decoded(client.frames)
    last_seq = client.last_seq
    assert last_seq is not None and json.loads(original[-1])["s"] == last_seq
    client.abort()
    await sim.wait_for(lambda ledger: ledger.connections[0].closed_at is not None, t(5))
    resumed = await sim_pool.connect(sim.resume_url)
    await resumed.hello()
    await resumed.resume(session_id, last_seq - 50)
    await resumed.recv_until(lambda p: p.get("t") == "RESUMED", timeout=t(10))
    replayed = decoded(resumed.frames)[1:51]  # after HELLO
    assert replayed == original[-50:]  # regenerated from (seq, id, template), byte for byte


async def test_realistic_events_follow_the_sessions_intents(sim_pool: SimulatorPool) -> None:
    sim = await sim_pool.start(profile="realistic", rate=300)
    client = await identified(sim_pool, sim, intents=513)  # GUILDS | GUILD_MESSAGES
    got = await client.recv_dispatches(150, timeout=t(15))
    kinds = {p["t"] for p in got}
    assert kinds <= {"MESSAGE_CREATE", "MESSAGE_UPDATE", "GUILD_CREATE"}
    assert "MESSAGE_CREATE" in kinds and "MESSAGE_UPDATE" in kinds


# --- phases and jitter ------------------------------------------------------------------------


async def arrivals(clients: list[SimClient], seconds: float) -> list[list[float]]:
    """Arrival times of MESSAGE_CREATEs per client, over ``seconds``."""
    out: list[list[float]] = [[] for _ in clients]

    async def read(index: int, client: SimClient) -> None:
        while True:
            payload = await client.recv(timeout=60)
            if payload.get("t") == "MESSAGE_CREATE":
                out[index].append(time.monotonic())

    tasks = [asyncio.create_task(read(i, c)) for i, c in enumerate(clients)]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return out


def circular_phases(times: list[list[float]], interval: float) -> list[float]:
    base = min(ts[0] for ts in times)
    return sorted(statistics.median((x - base) % interval for x in ts) for ts in times)


async def test_each_shard_at_its_own_phase(sim_pool: SimulatorPool) -> None:
    shards, rate = 8, 10.0
    sim = await sim_pool.start(shard_count=shards, max_concurrency=shards, rate=rate, jitter=0.0)
    clients = [await identified(sim_pool, sim, (i, shards)) for i in range(shards)]
    times = await arrivals(clients, t(2.5))
    assert all(len(ts) >= 15 for ts in times), [len(ts) for ts in times]
    interval = 1 / rate
    # jitter 0: each shard strictly periodic ...
    for ts in times:
        gaps = [b - a for a, b in itertools.pairwise(ts)]
        assert abs(statistics.median(gaps) - interval) < 0.01
    # ... but at its own phase: in step, all eight would share one phase.
    phases = circular_phases(times, interval)
    widest_gap = max(
        [b - a for a, b in itertools.pairwise(phases)] + [interval - phases[-1] + phases[0]]
    )
    assert widest_gap < interval * 0.75, phases  # spread around the circle, not one cluster


async def test_jitter_moves_arrivals(sim_pool: SimulatorPool) -> None:
    spreads = {}
    for jitter in (0.0, 0.4):
        sim = await sim_pool.start(rate=20.0, jitter=jitter)
        client = await identified(sim_pool, sim)
        (times,) = await arrivals([client], t(2.0))
        gaps = [b - a for a, b in itertools.pairwise(times)]
        spreads[jitter] = statistics.pstdev(gaps)
        client.abort()
        await sim.stop()
    # uniform +-40 % of 50 ms: a standard deviation of about 11.5 ms
    assert spreads[0.4] > 0.007 and spreads[0.4] > 2 * spreads[0.0], spreads


# --- a paced 8,000/s --------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_paced_8000_per_second_one_event_per_message(tmp_path: Path) -> None:
    """The simulator CLI in its own process, a raw client here: what it sustains."""
    rate, seconds = 8000, t(3.0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spectacles_gateway.simulator", "--rate", str(rate),
        "--jitter", "0", "--heartbeat-interval", "60000", "--log-level", "WARNING",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        urls = json.loads(await asyncio.wait_for(proc.stdout.readline(), t(20)))
        query = "?v=10&encoding=json&compress=zstd-stream"
        async with connect(urls["gateway_url"] + query, max_size=None, proxy=None) as ws:
            decompress = zstandard.ZstdDecompressor().decompressobj().decompress
            identify = {"token": "simulated-token", "intents": 513, "shard": [0, 1],
                        "properties": {"os": "linux", "browser": "t", "device": "t"}}  # fmt: skip
            decompress(await ws.recv())
            await ws.send(json.dumps({"op": 2, "d": identify}))
            count = 0
            while b'"GUILD_CREATE"' not in decompress(await ws.recv())[:40]:
                pass
            cpu0, t0 = proc_cpu(proc.pid), time.monotonic()
            while time.monotonic() - t0 < seconds:
                if decompress(await ws.recv()).startswith(b'{"t":"MESSAGE_CREATE"'):
                    count += 1
            elapsed, cpu = time.monotonic() - t0, proc_cpu(proc.pid) - cpu0
            status, stats = await http_get(
                urls["http_base"].removesuffix("/api/v10") + "/control/stats"
            )
        assert status == 200
        received = count / elapsed
        share = stats["late_writes"] / max(stats["writes"], 1)
        assert stats["writes"] == stats["events"]  # one event per write, always
        print(
            f"\npaced {rate}/s: received {received:.0f}/s, simulator wrote "
            f"{stats['events_per_second']:.0f}/s, {share:.1%} of writes late by > 1 interval, "
            f"lateness mean {stats['mean_late_us']} us, worst {stats['max_late_ms']} ms, "
            f"simulator CPU "
            f"{cpu / elapsed:.1%} of a core ({cpu / max(count, 1) * 1e6:.1f} us/event)"
        )
        assert received > rate * 0.5
    finally:
        proc.terminate()
        await proc.wait()


def measure_cli(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "spectacles_gateway.simulator", *args],
        capture_output=True,
        check=True,
        timeout=t(60),
    )
    return dict(json.loads(out.stdout))


def test_cli_profile_and_seed() -> None:
    first = measure_cli("--profile", "realistic", "--seed", "2", "--measure-corpus", "3000")
    again = measure_cli("--profile", "realistic", "--seed", "2", "--measure-corpus", "3000")
    other = measure_cli("--profile", "realistic", "--seed", "9", "--measure-corpus", "3000")
    uniform = measure_cli("--profile", "uniform", "--measure-corpus", "3000")
    assert first == again and first != other
    assert (first["profile"], first["seed"], first["events"]) == ("realistic", 2, 3000)
    assert first["zstd_ratio"] < 10 < uniform["zstd_ratio"]
    bad = subprocess.run(
        [sys.executable, "-m", "spectacles_gateway.simulator", "--profile", "bursty"],
        check=False,
        capture_output=True,
        timeout=t(60),
    )
    assert bad.returncode == 2 and b"invalid choice: 'bursty'" in bad.stderr
