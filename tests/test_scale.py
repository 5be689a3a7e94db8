"""Scale (issue 15): 512 shards in one worker with ``max_concurrency`` 512 start, restart on HUP
and stop on TERM as one shard would; per-shard metric series can be kept to state and latency.

The whole supervisor runs as a subprocess against the simulator; nothing is timed but the
start-up bound the issue sets (scaled by the suite's time factor) and the shutdown timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from .gwproc import BIN, Gateway, duration, free_port, gateway, gateway_env, metric, metrics_when
from .gwproc import status as get_status
from .gwtest import simulator, t, wait_until

SHARDS = 512
#: Log lines that would mean something was lost or dropped on the way.
LOST = re.compile(r"lost|dropp|overflow|stalled|EMFILE|Too many open files", re.IGNORECASE)


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=t(5)) as response:
        return bytes(response.read())


async def _ready(port: int) -> int:
    try:
        body = await asyncio.to_thread(get_status, port)
    except OSError:
        return -1
    return int(body["progress"]["ready"])


@pytest.mark.alone  # 512 sockets, and its start-up is timed
async def test_512_shards_one_worker_start_hup_and_term() -> None:
    port = free_port()
    async with simulator(shard_count=SHARDS, max_concurrency=SHARDS) as sim:
        env = gateway_env(
            sim,
            PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
            PROMETHEUS_SHARD_SERIES="minimal",
            DISCORD_SHUTDOWN_TIMEOUT=duration(10),
        )
        started = time.monotonic()
        async with gateway(env, "--shards", f"0-{SHARDS - 1}", "--workers", "1") as gw:
            ready = -1

            async def all_ready() -> bool:
                nonlocal ready
                ready = await _ready(port)
                return ready == SHARDS

            await wait_until(all_ready, 10, f"all {SHARDS} shards READY", gw.log, interval=0.1)
            took = time.monotonic() - started
            assert took <= t(10), took
            assert len(sim.ledger.identifies) == SHARDS
            assert {r.outcome for r in sim.ledger.identifies} == {"ready"}

            # The status summary stays small; the detail is there on request.
            summary = await asyncio.to_thread(_get, port, "/status")
            assert len(summary) < 4096 and "shards" not in json.loads(summary)
            detail = await asyncio.to_thread(get_status, port, shards=True)
            assert len(detail["shards"]) == SHARDS
            assert all(entry["ready"] for entry in detail["shards"].values())

            # HUP: the worker is replaced and every shard resumes; nobody identifies again.
            old_pid = detail["workers"][0]["pid"]
            gw.process.send_signal(signal.SIGHUP)

            async def replaced() -> bool:
                body = await asyncio.to_thread(get_status, port)
                pid = body["workers"][0]["pid"]
                return bool(pid) and pid != old_pid and body["progress"]["ready"] == SHARDS

            await wait_until(replaced, 30, "the worker replaced, every shard back", gw.log)
            await wait_until(lambda: len(sim.ledger.resumes) >= SHARDS, 10, "resumes", gw.log)
            assert len(sim.ledger.identifies) == SHARDS  # 0 identifies on HUP

            # TERM: stopped within the shutdown timeout, cleanly.
            stop_started = time.monotonic()
            code = await gw.stop(signal.SIGTERM, timeout=15)
            assert code == 0, gw.log()[-3000:]
            assert time.monotonic() - stop_started <= t(10)
        log = gw.log()
        assert "all 512 shards are ready" in log
        assert not [line for line in log.splitlines() if LOST.search(line)], log[-3000:]


async def test_minimal_shard_series_keep_state_and_latency_per_shard() -> None:
    port = free_port()
    async with simulator(
        shard_count=4, max_concurrency=4, rate=20, heartbeat_interval_ms=500
    ) as sim:
        env = gateway_env(
            sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}", PROMETHEUS_SHARD_SERIES="minimal"
        )
        async with gateway(env, "--workers", "2") as gw:
            text = await metrics_when(
                port,
                lambda s: (
                    metric(s, "gateway_shards_alive") == 4
                    and metric(s, "gateway_ping_count") >= 4
                    and len(re.findall(r"^gateway_shard_latency_ms\{", s, re.MULTILINE)) == 4
                    and metric(s, "gateway_packets_received", t="MESSAGE_CREATE") >= 20
                ),
                20,
                "four shards alive, heartbeats acknowledged, events counted",
                gw.log,
            )
            await _stop(gw)
    alive = set(re.findall(r'^gateway_shards_alive\{id="(\d+)"\} 1', text, re.MULTILINE))
    assert alive == {"0", "1", "2", "3"}
    latency = set(re.findall(r'^gateway_shard_latency_ms\{id="(\d+)"\}', text, re.MULTILINE))
    assert latency == {"0", "1", "2", "3"}
    pinged = set(re.findall(r'^gateway_ping_count\{id="([^"]*)"\}', text, re.MULTILINE))
    assert pinged == {"w0", "w1"}  # the histogram per worker
    for family in ("gateway_packets_received", "gateway_packets_sent", "gateway_identifies_total"):
        shards = set(re.findall(rf'^{family}\{{.*shard="([^"]*)"', text, re.MULTILINE))
        assert shards == {"w0", "w1"}, (family, shards)
    assert metric(text, "gateway_identifies_total") == 4


async def _stop(gw: Gateway) -> None:
    assert await gw.stop() == 0, gw.log()[-2000:]


async def test_workers_run_the_supervisors_code_whatever_the_working_directory(
    tmp_path: Path,
) -> None:
    """Started from a directory holding another ``spectacles_gateway`` (a checkout of another
    version, say), the workers still run the supervisor's own package: ``python -P``."""
    shadow = tmp_path / "spectacles_gateway"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('the shadow package was imported')\n")
    async with simulator(shard_count=1) as sim:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "spectacles-supervise"), env=gateway_env(sim), cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await wait_until(lambda: len(sim.ledger.identifies) == 1, 20, "the shard identified")
        finally:
            proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), t(20))
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"shadow" not in err
