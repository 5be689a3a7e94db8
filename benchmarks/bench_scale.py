"""Scale benchmark (issue 15): K shards in one host through the simulator.

    .venv/bin/python benchmarks/bench_scale.py                  # 512 shards, one worker
    .venv/bin/python benchmarks/bench_scale.py --shards 2500    # by hand: a few minutes

``spectacles-supervise`` (stdio broker, its output read and counted here) runs against the
simulator in its own process (``--max-concurrency`` buckets: Discord's minimum start-up is
``ceil(K / max_concurrency) - 1`` windows of 5 s). Prints, one line each:

- the time from the supervisor's start to every shard READY, next to Discord's minimum;
- idle CPU of the supervisor and its workers over ``--idle`` seconds with every shard
  connected (heartbeats only, at Discord's 41.25 s), as % of one core, and per 1,000 shards;
- resident memory: supervisor, workers, and the workers' per shard;
- ``/metrics`` and ``/status`` (summary, ``?shards=1``, ``?shards=columns``): bytes and the
  best of 3 times;
- events at ``--rate`` per shard per second, each shard's at its own phase (independent
  arrivals, not all in step): CPU microseconds per event of the relay (supervisor) and of the
  workers, idle cost taken out;
- ``HUP`` (every worker replaced, every shard back READY) and ``TERM`` (exit) times, and the
  identifies either caused (0 is the goal).

The programs come from the interpreter's own directory (and run in ``/``: a checkout in the
working directory would shadow the installed package in ``python -m`` children before
``-P``), so the same script measures another
checkout with that checkout's virtualenv: ``/path/to/base/.venv/bin/python
benchmarks/bench_scale.py``. CPU comes from ``/proc/PID/task/*/schedstat`` (nanoseconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from simenv import simulator_env

BIN = Path(sys.executable).parent
PAGE = os.sysconf("SC_PAGE_SIZE")
TOKEN = "simulated-token"


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` (``schedstat``: nanoseconds, not 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def get(url: str, timeout: float = 30.0) -> tuple[bytes, float]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
    return body, time.perf_counter() - started


def post(url: str) -> None:
    request = urllib.request.Request(url, method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


class Counter(threading.Thread):
    """Reads the supervisor's stdout (one JSON line per event) and counts lines."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines = 0

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read(1 << 16), b""):
            self.lines += chunk.count(b"\n")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.k: int = args.shards
        self.port = 0
        self.sim: subprocess.Popen[bytes] | None = None
        self.gw: subprocess.Popen[bytes] | None = None
        self.control = ""
        self.counter: Counter | None = None

    # ------------------------------------------------------------------ processes

    def start_simulator(self) -> dict[str, str]:
        a = self.args
        self.sim = subprocess.Popen(
            [
                str(BIN / "python"), "-m", "spectacles_gateway.simulator",
                "--shards", str(self.k), "--max-concurrency", str(a.max_concurrency),
                "--log-level", "WARNING", "--seed", "15",
                "--heartbeat-interval", str(a.heartbeat_ms),
                "--session-start-limit", str(max(1000, 4 * self.k)),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/",
        )  # fmt: skip
        assert self.sim.stdout is not None
        urls: dict[str, str] = json.loads(self.sim.stdout.readline())
        self.control = urls["http_base"].removesuffix("/api/v10") + "/control"
        return urls

    def start_gateway(self, urls: dict[str, str]) -> None:
        a = self.args
        self.port = free_port()
        env = simulator_env(
            urls["http_base"],
            inherit=False,
            DISCORD_TOKEN=TOKEN,
            PROMETHEUS_ADDRESS=f"127.0.0.1:{self.port}",
            LOG_LEVEL="info",
        )
        if a.series:
            env["PROMETHEUS_SHARD_SERIES"] = a.series
        self.log = open(a.log, "wb")  # noqa: SIM115
        self.gw = subprocess.Popen(
            [
                str(BIN / "spectacles-supervise"), "--shards", f"0-{self.k - 1}",
                "--shard-count", str(self.k), "--workers", str(a.workers),
            ],
            stdout=subprocess.PIPE, stderr=self.log, env=env, cwd="/",
        )  # fmt: skip
        self.counter = Counter(self.gw.stdout)
        self.counter.start()

    def status(self, query: str = "") -> dict[str, Any]:
        body, _ = get(f"http://127.0.0.1:{self.port}/status{query}")
        return dict(json.loads(body))

    def sim_stats(self) -> dict[str, Any]:
        body, _ = get(self.control + "/stats")
        return dict(json.loads(body))

    def pids(self) -> list[int]:
        assert self.gw is not None
        return [self.gw.pid, *self.worker_pids()]

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["pid"]]

    def wait_ready(self, timeout: float, old: set[int] = frozenset()) -> float:  # type: ignore[assignment]
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                s = self.status()
            except OSError:
                time.sleep(0.05)
                continue
            pids = {w["pid"] for w in s["workers"]}
            if s["progress"]["ready"] == self.k and not pids & old and all(pids):
                return time.monotonic() - started
            time.sleep(0.05)
        raise SystemExit(f"not ready within {timeout:.0f} s; see {self.args.log}")

    def cpu(self, pids: list[int]) -> list[float]:
        return [cpu_seconds(p) for p in pids]

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        a = self.args
        k = self.k
        print(f"bench_scale: {k} shards, {a.workers} worker(s), max_concurrency "
              f"{a.max_concurrency}, series {a.series or 'default'}, {sys.executable}")  # fmt: skip
        urls = self.start_simulator()
        spawned = time.monotonic()
        self.start_gateway(urls)
        self.wait_ready(a.timeout)
        took = time.monotonic() - spawned
        minimum = (math.ceil(k / a.max_concurrency) - 1) * 5.0
        print(f"start: all {k} READY in {took:.1f} s (Discord's minimum {minimum:.0f} s)")

        time.sleep(a.settle)
        pids = self.pids()
        # Three windows: a one-off (the first full garbage collection after start-up, some
        # 190 ms at 2,500 shards) shows as one window apart from the others.
        windows: list[tuple[float, float]] = []
        for _ in range(3):
            before = self.cpu(pids)
            t0 = time.monotonic()
            time.sleep(a.idle / 3)
            spent = [x - y for x, y in zip(self.cpu(pids), before, strict=True)]
            elapsed = time.monotonic() - t0
            windows.append((spent[0] / elapsed, sum(spent[1:]) / elapsed))
        idle_sup, idle_workers = min(windows, key=sum)
        totals = sorted(100 * (s + w) for s, w in windows)
        print(
            f"idle: {totals[0]:.2f} % of a core (supervisor {100 * idle_sup:.2f} %, workers "
            f"{100 * idle_workers:.2f} %), {totals[0] * 1000 / k:.2f} % per 1,000 shards; "
            f"windows of {a.idle / 3:.0f} s: " + ", ".join(f"{x:.2f}" for x in totals) + " %"
        )
        sup_rss, worker_rss = rss(pids[0]), sum(rss(p) for p in pids[1:])
        print(
            f"rss: supervisor {sup_rss / 2**20:.1f} MiB, workers {worker_rss / 2**20:.1f} MiB "
            f"({worker_rss / k / 1024:.0f} KiB per shard, base included)"
        )

        base = f"http://127.0.0.1:{self.port}"
        for path in (a.metrics_path, "/status", "/status?shards=1", "/status?shards=columns"):
            times, size = [], 0
            for _ in range(3):
                body, seconds = get(base + path)
                times.append(seconds)
                size = len(body)
            print(f"{path}: {size / 1024:.1f} KiB, {1000 * min(times):.1f} ms "
                  f"(best of 3; worst {1000 * max(times):.1f} ms)")  # fmt: skip

        if a.rate > 0:
            self.events(pids, idle_sup, idle_workers)

        assert self.gw is not None
        identifies = self.sim_stats()["identifies_ready"]
        old = set(self.worker_pids())
        t0 = time.monotonic()
        self.gw.send_signal(signal.SIGHUP)
        self.wait_ready(a.timeout, old)
        hup = time.monotonic() - t0
        extra = self.sim_stats()["identifies_ready"] - identifies
        print(f"HUP: every worker replaced, all READY again in {hup:.1f} s, {extra} identifies")

        t0 = time.monotonic()
        self.gw.send_signal(signal.SIGTERM)
        code = self.gw.wait(a.timeout)
        print(f"TERM: exit {code} in {time.monotonic() - t0:.1f} s")

    def events(self, pids: list[int], idle_sup: float, idle_workers: float) -> None:
        a = self.args
        assert self.counter is not None
        post(f"{self.control}/rate?rate={a.rate}")
        time.sleep(2.0)  # every shard's generator running, the pipes warm
        lines = self.counter.lines
        before = self.cpu(pids)
        t0 = time.monotonic()
        time.sleep(a.seconds)
        spent = [x - y for x, y in zip(self.cpu(pids), before, strict=True)]
        elapsed = time.monotonic() - t0
        events = self.counter.lines - lines
        post(f"{self.control}/rate?rate=0")
        if not events:
            print("events: none arrived")
            return
        relay = max(0.0, spent[0] - idle_sup * elapsed) / events * 1e6
        worker = max(0.0, sum(spent[1:]) - idle_workers * elapsed) / events * 1e6
        print(
            f"events: {events / elapsed:.0f}/s ({a.rate:g} per shard, independent phases) "
            f"over {elapsed:.0f} s: relay {relay:.1f} us/event, workers {worker:.1f} us/event "
            "(idle taken out)"
        )

    def close(self) -> None:
        for proc in (self.gw, self.sim):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def free_port() -> int:
    """A free TCP port on loopback (closed again: the supervisor binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shards", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-concurrency", type=int, default=0, help="default: --shards")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after READY")
    parser.add_argument("--rate", type=float, default=1.0, help="events/s per shard (0: none)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of events")
    parser.add_argument("--heartbeat-ms", type=int, default=41250, help="Discord's: 41250")
    parser.add_argument("--series", choices=("all", "minimal"), default=None)
    parser.add_argument("--metrics-path", default="/metrics")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--log", default="/tmp/bench_scale.log", help="the supervisor's stderr")
    args = parser.parse_args()
    args.max_concurrency = args.max_concurrency or args.shards
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.close()


if __name__ == "__main__":
    main()
