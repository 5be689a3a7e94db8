"""Nothing a client sends can stop the gateway (issue 10), through the real supervisor.

stdin lines that used to stop it (exit 78 that systemd then refuses to restart, or exit 1), a
few thousand fuzzed lines between valid commands while four shards stream, the HTTP listener
out of file descriptors or flooded by clients, and a supervisor killed with events still in its
relay buffer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import pytest
from hypothesis.errors import NonInteractiveExampleWarning

from spectacles_gateway.brokers.wire import CommandError
from spectacles_gateway.records import parse_stdin_record

from .gwproc import BIN, free_port, gateway, gateway_env, metric, scrape
from .gwtest import ready_count, simulator, t, wait_until
from .test_fuzz import stdin_records


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(p) for p in text]
    return out


def command(shard: int, n: int) -> bytes:
    packet = {"op": 3, "d": {"since": None, "activities": [], "status": "idle", "afk": n}}
    return json.dumps({"event": "SEND", "data": {"shard_id": shard, "packet": packet}}).encode()


async def test_stdin_lines_that_used_to_stop_the_gateway_are_dropped_and_counted() -> None:
    port = free_port()
    killers = [
        # passes str.isdigit(), then int() raised ValueError: the run loop exited 78
        '{"event":"SEND","data":{"guild_id":"١٢٣٤","packet":{"op":3,"d":{}}}}'.encode(),
        # a thousand levels deep: RecursionError, exit 1
        b'{"event":"SEND","data":' + b"[" * 1000 + b"]" * 1000 + b"}",
        b"[" * 100_000,
        b"\xff\xfe\x00garbage",
    ]
    async with simulator(shard_count=2, rate=20) as sim:
        env = gateway_env(sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}")
        async with gateway(env, stdin=True) as gw:
            await wait_until(lambda: ready_count(sim.ledger) == 2, 30, "2 shards ready")
            assert gw.process.stdin is not None
            for line in killers:
                gw.process.stdin.write(line + b"\n")
            gw.process.stdin.write(command(1, 1) + b"\n")  # a good one after them
            await gw.process.stdin.drain()
            await wait_until(lambda: len(sim.ledger.commands) == 1, 10, "the good command")
            n = len(gw.ids())
            await wait_until(lambda: len(gw.ids()) > n + 20, 10, "events still flowing")

            def dropped() -> float:
                return metric(scrape(port), "gateway_input_dropped_total", source="stdio")

            await wait_until(lambda: dropped() == len(killers), 10, "the drops counted")
            code = await gw.stop()
        assert code == 0, gw.log()[-2000:]
        assert "configuration error" not in gw.log()
        assert sim.ledger.commands[0].shard_id == 1


@pytest.mark.slow
async def test_four_shards_stream_while_thousands_of_hostile_lines_arrive() -> None:
    """Every valid command reaches its shard, nothing is lost on stdout, memory stays bounded,
    SIGTERM still ends with 0."""
    hostile: list[bytes] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        while len(hostile) < 3000:
            line = stdin_records.example().replace(b"\n", b" ")
            try:  # keep what the gateway must refuse (a random valid command would be sent)
                parse_stdin_record(line, "json")
            except CommandError:
                hostile.append(line)
    bound_kib = 200 * 1024  # supervisor and each worker (a worker idles near 30 MiB)
    async with simulator(shard_count=4, max_concurrency=4, rate=100) as sim:
        env = gateway_env(sim, SUPERVISOR_WORKERS="2")
        async with gateway(env, stdin=True) as gw:
            await wait_until(lambda: ready_count(sim.ledger) == 4, 30, "4 shards ready")
            assert gw.process.stdin is not None
            sent: dict[int, list[int]] = {s: [] for s in range(4)}
            peak: dict[int, int] = {}
            pids = [gw.process.pid, *children(gw.process.pid)]
            for i, line in enumerate(hostile):
                gw.process.stdin.write(line + b"\n")
                if i % 30 == 0:
                    shard = (i // 30) % 4
                    sent[shard].append(i)
                    gw.process.stdin.write(command(shard, i) + b"\n")
                if i % 100 == 0:
                    await gw.process.stdin.drain()
                    for pid in pids:
                        peak[pid] = max(peak.get(pid, 0), rss_kib(pid))
            await gw.process.stdin.drain()
            expected = sum(len(v) for v in sent.values())

            def received() -> dict[int, list[int]]:
                got: dict[int, list[int]] = {s: [] for s in range(4)}
                for record in sim.ledger.commands:
                    d = record.d
                    if record.op == 3 and isinstance(d, dict) and isinstance(d.get("afk"), int):
                        got[record.shard_id or 0].append(d["afk"])
                return got

            await wait_until(
                lambda: sum(map(len, received().values())) >= expected,
                60,
                "every valid command at its shard",
                gw.log,
            )
            sim.pause_dispatch()
            events = set(sim.ledger.events_sent())
            await wait_until(lambda: set(gw.ids()) >= events, 30, "every event on stdout")
            for pid in pids:
                peak[pid] = max(peak.get(pid, 0), rss_kib(pid))
            code = await gw.stop()
        assert code == 0, gw.log()[-3000:]
        assert received() == sent  # each on the right shard, in order
        assert max(peak.values()) < bound_kib, peak
        print(f"hostile stdin: {len(hostile)} lines, {expected} valid; peak RSS KiB {peak}")


async def test_the_http_listener_survives_running_out_of_file_descriptors() -> None:
    port = free_port()
    async with simulator(shard_count=1) as sim:
        env = gateway_env(
            sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}", PROMETHEUS_MAX_CLIENTS="1000"
        )
        # A low open-file limit for the supervisor (and its worker): accept() hits EMFILE. Just
        # enough for a worker's one shard (spectacles_gateway.limits), not for the flood.
        wrapper = (
            "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100)); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            wrapper,
            str(BIN / "spectacles-supervise"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        assert process.stderr is not None
        stderr = process.stderr
        log: list[str] = []

        async def read_log() -> None:
            async for line in stderr:
                log.append(line.decode(errors="replace"))

        reader = asyncio.create_task(read_log())
        try:
            await wait_until(lambda: ready_count(sim.ledger) == 1, 30, "ready")
            await wait_until(lambda: _get(port, "/healthz") == 200, 10, "the listener")
            # More than the process can hold, connected without waiting: once the listen
            # backlog is full, a handshake completes only when the kernel retries it, so the
            # flood is held until the supervisor has said it ran out.
            flood: list[socket.socket] = []
            try:
                for _ in range(160):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    flood.append(s)
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                await wait_until(
                    lambda: any("accept() failed" in line for line in log), 20, "EMFILE"
                )
                await asyncio.sleep(t(0.5))
                assert process.returncode is None
            finally:
                for s in flood:
                    s.close()
            await wait_until(lambda: _get(port, "/healthz") == 200, 10, "answers again")
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), t(15)) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await asyncio.wait_for(reader, 10)
        text = "".join(log)
        assert "too low for 1 workers and 1000 HTTP clients" in text  # said, and it ran


async def test_clients_beyond_the_cap_are_refused_and_slow_ones_dropped() -> None:
    port = free_port()
    async with simulator(shard_count=1) as sim:
        env = gateway_env(sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}", PROMETHEUS_MAX_CLIENTS="2")
        async with gateway(env) as gw:
            await wait_until(lambda: _get(port, "/healthz") == 200, 30, "the listener")
            slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
            await asyncio.sleep(t(0.2))
            extra = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert extra.recv(100) == b""  # closed at once: two clients already
            started = time.monotonic()
            assert slow[0].recv(100) == b""  # dropped after 5 s of silence
            assert 4.0 < time.monotonic() - started < t(8.0)
            assert _get(port, "/healthz") == 200
            for s in (*slow, extra):
                s.close()
            assert await gw.stop() == 0


def _get(port: int, path: str) -> int:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            head = s.recv(64)
        return int(head.split()[1]) if head else 0
    except OSError:
        return 0


async def test_the_simulate_child_dies_with_a_killed_supervisor() -> None:
    env = {"PATH": os.environ.get("PATH", ""), "DISCORD_EVENTS": "MESSAGE_CREATE"}
    async with gateway(env, "--simulate") as gw:
        await wait_until(lambda: len(gw.lines) > 2, 30, "events from the simulator")
        kids = children(gw.process.pid)
        simulators = [p for p in kids if b"simulator" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(simulators) == 1
        gw.process.kill()
        await gw.process.wait()
        await wait_until(lambda: not Path(f"/proc/{simulators[0]}").exists(), 10, "it exits")
