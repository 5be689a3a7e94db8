"""The supervisor as a real process tree with real signals, against the simulator."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

from .gwproc import (
    duration,
    free_port,
    gateway,
    gateway_env,
    health,
    metric,
    metrics_when,
    status,
    worker_pids,
)
from .gwtest import ready_count, simulator, t, wait_until


def all_ready(port: int, expect: int) -> bool:
    try:
        info = status(port, shards=True)
    except OSError:
        return False
    ready = sum(1 for s in info["shards"].values() if s.get("ready"))
    assert info["progress"]["ready"] == ready  # the summary counts the same
    return ready == expect


async def test_kill9_one_worker_its_shards_resume_and_no_event_is_lost() -> None:
    port = free_port()
    async with simulator(shard_count=4, max_concurrency=4, rate=100) as sim:
        env = gateway_env(sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}", SUPERVISOR_WORKERS="2")
        async with gateway(env) as gw:
            await wait_until(lambda: all_ready(port, 4), 30, "4 shards ready")
            await wait_until(lambda: len(gw.ids()) > 200, 20, "events")
            before = await asyncio.to_thread(worker_pids, port)
            victim = before[1]
            victim_shards = {
                int(k) for k, v in status(port, shards=True)["shards"].items() if v["worker"] == 1
            }
            os.kill(victim, signal.SIGKILL)
            await wait_until(
                lambda: worker_pids(port).get(1) not in (None, victim) and all_ready(port, 4),
                30,
                "worker 1 back and ready",
            )
            n = len(gw.ids())
            await wait_until(lambda: len(gw.ids()) > n + 200, 20, "events after the restart")
            sim.pause_dispatch()
            expected = set(sim.ledger.events_sent())
            await wait_until(lambda: set(gw.ids()) >= expected, 20, "every event")
            code = await gw.stop()
        log = gw.log()
        assert code == 0, log[-2000:]
        assert sim.ledger.identify_count() == 4, log[-3000:]  # no new identify
        for shard in victim_shards:
            assert sim.ledger.resume_count(shard, success=True) >= 1
        ids = gw.ids()
        assert set(ids) >= set(sim.ledger.events_sent())  # nothing lost
        assert "killed by SIGKILL" in log and "restarting in" in log
        duplicates = sum(c - 1 for c in Counter(ids).values())
        print(f"kill -9: {len(ids)} events on stdout, {duplicates} duplicates (replayed)")


async def test_hup_rolling_restart_no_identify_no_loss() -> None:
    port = free_port()
    async with simulator(shard_count=4, max_concurrency=4, rate=100) as sim:
        env = gateway_env(sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}", SUPERVISOR_WORKERS="2")
        async with gateway(env) as gw:
            await wait_until(lambda: all_ready(port, 4), 30, "4 shards ready")
            before = await asyncio.to_thread(worker_pids, port)
            gw.process.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: (
                    all(worker_pids(port).get(w) not in (None, pid) for w, pid in before.items())
                    and all_ready(port, 4)
                ),
                60,
                "every worker replaced",
            )
            n = len(gw.ids())
            await wait_until(lambda: len(gw.ids()) > n + 100, 20, "events after")
            sim.pause_dispatch()
            expected = set(sim.ledger.events_sent())
            await wait_until(lambda: set(gw.ids()) >= expected, 20, "every event")
            code = await gw.stop()
        assert code == 0
        assert sim.ledger.identify_count() == 4
        assert sim.ledger.resume_count(success=True) == 4  # each shard resumed once
        ids = gw.ids()
        assert set(ids) == set(sim.ledger.events_sent())
        duplicates = [id_ for id_, n in Counter(ids).items() if n > 1]
        # A graceful hand-over: not even a duplicate.
        assert not duplicates, f"{len(duplicates)} duplicates\n{gw.log()[-6000:]}"
        assert "rolling restart" in gw.log()


async def test_sixteen_shards_four_buckets_start_as_fast_as_discord_allows() -> None:
    port = free_port()
    async with simulator(shard_count=16, max_concurrency=4, identify_window=5.0) as sim:
        env = gateway_env(sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}", SUPERVISOR_WORKERS="4")
        loop = asyncio.get_running_loop()
        async with gateway(env) as gw:
            started = loop.time()
            await wait_until(lambda: ready_count(sim.ledger) == 16, 40, "16 shards ready")
            took = loop.time() - started
            info = await asyncio.to_thread(status, port)
            await gw.stop()
        assert not sim.ledger.violations, sim.ledger.violations
        assert len(info["workers"]) == 4
        times = sorted(r.time for r in sim.ledger.identifies)
        print(
            f"16 shards, max_concurrency 4, 4 workers: all READY {took:.2f} s after start; "
            f"identifies span {times[-1] - times[0]:.2f} s"
        )
        # Three identify windows of 5 s (the rule), then start-up, margins and READY (slack).
        assert 15.0 <= took <= 15.0 + t(3.0), took
        assert "identified" in gw.log()  # progress lines


async def test_bad_token_at_identify_no_respawn_loop_exit_78_one_error_line() -> None:
    async with simulator() as sim:
        async with gateway(gateway_env(sim)) as gw:
            await wait_until(lambda: len(sim.ledger.http) >= 1, 20, "/gateway/bot")
            sim.config.token = "the-token-was-reset"
            code = await asyncio.wait_for(gw.process.wait(), t(30))
            await asyncio.gather(*gw.tasks)
        log = gw.log()
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert code == 78, log
        assert len(sim.ledger.connections) == 1  # no respawn, no reconnect
        assert len(errors) == 1, errors
        assert "4004" in errors[0] and "token" in errors[0]


async def test_metrics_aggregate_workers_and_do_not_double_count_after_a_restart() -> None:
    port = free_port()
    async with simulator(shard_count=4, max_concurrency=4, rate=50) as sim:
        env = gateway_env(sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}", SUPERVISOR_WORKERS="4")
        async with gateway(env) as gw:
            await wait_until(lambda: all_ready(port, 4), 30, "ready")
            # Workers report once a second: wait for the reports that carry every shard's events.
            text = await metrics_when(
                port,
                lambda m: all(
                    metric(m, "gateway_packets_received", shard=str(s), op="0") > 0
                    for s in range(4)
                ),
                10,
                "every shard's events in the metrics",
                gw.log,
            )
            for shard in range(4):
                assert metric(text, "gateway_shards_alive", id=str(shard)) == 1
                assert metric(text, "gateway_packets_received", shard=str(shard), op="0") > 0
            assert metric(text, "gateway_total_shards") == 4
            assert metric(text, "gateway_session_starts_remaining") == 1000 - 4
            assert metric(text, "gateway_broker_connected") == 1
            assert metric(text, "gateway_workers") == 4
            pids = await asyncio.to_thread(worker_pids, port)
            os.kill(pids[2], signal.SIGKILL)
            await wait_until(
                lambda: worker_pids(port).get(2) not in (None, pids[2]) and all_ready(port, 4),
                30,
                "worker 2 back",
            )
            # The new worker's report of its resume (its shard is alive again in the same one).
            after = await metrics_when(
                port,
                lambda m: metric(m, "gateway_resumes_total") >= 1,
                10,
                "the new worker's resume in the metrics",
                gw.log,
            )
            ready = await asyncio.to_thread(health, port)
            await gw.stop()
        assert sum(metric(after, "gateway_shards_alive", id=str(s)) for s in range(4)) == 4
        assert metric(after, "gateway_workers") == 4
        assert metric(after, "gateway_worker_restarts_total", reason="sigkill") == 1
        assert metric(after, "gateway_resumes_total") >= 1
        assert ready == (200, 200)


async def test_a_stalled_worker_is_killed_and_restarted() -> None:
    port = free_port()
    async with simulator(shard_count=2, max_concurrency=2, rate=20) as sim:
        env = gateway_env(
            sim,
            PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
            SUPERVISOR_WORKERS="2",
            SUPERVISOR_STALL_TIMEOUT=duration(3),
        )
        async with gateway(env) as gw:
            await wait_until(lambda: all_ready(port, 2), 30, "ready")
            pids = await asyncio.to_thread(worker_pids, port)
            os.kill(pids[0], signal.SIGSTOP)  # its event loop stops: no more heartbeats
            await wait_until(
                lambda: worker_pids(port).get(0) not in (None, pids[0]) and all_ready(port, 2),
                30,
                "worker 0 replaced",
            )
            await gw.stop()
        log = gw.log()
        assert "event loop is stuck" in log
        assert "stalled" in log
        assert sim.ledger.identify_count() == 2  # it resumed
