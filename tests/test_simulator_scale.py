"""Scale (issue 15): 2,500 concurrent shard connections on one simulator process, identify
rules kept at max_concurrency 16 and 512, the open-file limit raised at start, and the
simulator's own CPU with every shard idle (heartbeats only)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.gwtest import t
from tests.simclient import http_get

TOKEN = "simulated-token"
SHARDS = 2500
HANDSHAKE = (
    "GET /?v=10&encoding=json&compress=zstd-stream HTTP/1.1\r\nHost: {host}\r\n"
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: c3BlY3RhY2xlcy1zY2FsZQ==\r\n\r\n"
)


def text_frame(payload: dict[str, Any]) -> bytes:
    """A masked (key 0) websocket text frame, as a client must send."""
    data = json.dumps(payload).encode()
    assert len(data) < 65536
    head = (
        bytes((0x81, 0x80 | 126)) + len(data).to_bytes(2, "big")
        if len(data) > 125
        else (bytes((0x81, 0x80 | len(data))))
    )
    return head + b"\x00\x00\x00\x00" + data


class RawShard(asyncio.Protocol):
    """A shard that does the least a client must: upgrade, IDENTIFY, heartbeat.

    It decodes what it receives (zstd-stream) only until its session is READY, then drops
    the decompressor and just counts bytes: thousands of live zstd contexts would cost the
    test more than the simulator."""

    def __init__(self, shard_id: int, host: str) -> None:
        loop = asyncio.get_running_loop()
        self.shard_id = shard_id
        self.host = host
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.outcome: asyncio.Future[str] = loop.create_future()
        self.lost = False
        self.received = 0
        self._buf = b""
        self._zstd: Any = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(HANDSHAKE.format(host=self.host).encode())

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.outcome.done() and self.upgraded.done():
            return  # READY: nothing more to look at
        self._buf += data
        if not self.upgraded.done():
            head, sep, rest = self._buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(AssertionError(head[:200]))
                return
            self.upgraded.set_result(None)
            self._zstd = zstandard.ZstdDecompressor().decompressobj()
            self._buf = rest
        while (message := self._frame()) is not None:
            text = self._zstd.decompress(message)
            if b'"t":"READY"' in text[:40]:
                self._zstd, self._buf = None, b""
                self.outcome.set_result("ready")
                return
            if text.startswith(b'{"t":null,"s":null,"op":9'):
                self.outcome.set_result("invalid_session")

    def _frame(self) -> bytes | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        size, start = buf[1] & 0x7F, 2
        if size >= 126:
            start = 4 if size == 126 else 10
            size = int.from_bytes(buf[2:start], "big")
        if len(buf) < start + size:
            return None
        self._buf = buf[start + size :]
        return buf[start : start + size]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def send(self, payload: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(text_frame(payload))

    async def identify(self, count: int) -> str:
        """IDENTIFY; returns ``ready`` or ``invalid_session`` (op 9)."""
        loop = asyncio.get_running_loop()
        self.outcome = loop.create_future()
        props = {"os": "linux", "browser": "scale", "device": "scale"}
        d = {"token": TOKEN, "intents": 1, "shard": [self.shard_id, count], "properties": props}
        self.send({"op": 2, "d": d})
        return await asyncio.wait_for(self.outcome, t(30))


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


class Cli:
    """The simulator CLI in its own process; its stderr is read as it comes (a full pipe
    would stop it)."""

    def __init__(self, proc: asyncio.subprocess.Process, urls: dict[str, str]) -> None:
        self.proc = proc
        self.urls = urls
        self.stderr = bytearray()
        self._reader = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr += chunk

    async def stop(self) -> str:
        if self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        await self._reader
        return self.stderr.decode(errors="replace")


async def start_cli(*args: str, soft: int | None = None, hard: int | None = None) -> Cli:
    """The simulator CLI in its own process (with an open-file limit set before it starts)."""
    limits = (soft, hard) if soft is not None else None
    code = (
        "import resource, sys\n"
        f"limits = {limits!r}\n"
        "if limits: resource.setrlimit(resource.RLIMIT_NOFILE, limits)\n"
        "from spectacles_gateway.simulator.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, "--log-level", "INFO",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), t(30))
    assert line, (await proc.communicate())[1].decode()[-2000:]
    return Cli(proc, json.loads(line))


@pytest.fixture
async def clis() -> AsyncIterator[list[Cli]]:
    started: list[Cli] = []
    yield started
    for cli in started:
        await cli.stop()


async def stats(urls: dict[str, str]) -> dict[str, Any]:
    status, body = await http_get(urls["http_base"].removesuffix("/api/v10") + "/control/stats")
    assert status == 200
    return dict(body)


async def wait_stats(urls: dict[str, str], predicate: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + t(timeout)
    while True:
        now = await stats(urls)
        if predicate(now):
            return now
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.2)


@pytest.mark.alone  # 2,500 sockets and most of the machine
@pytest.mark.parametrize(("max_concurrency", "window"), [(16, 0.05), (512, 2.0)])
async def test_2500_shards_on_one_simulator(
    clis: list[Cli], max_concurrency: int, window: float
) -> None:
    cli = await start_cli(
        "--shards", str(SHARDS), "--max-concurrency", str(max_concurrency),
        "--identify-window", str(window), "--guilds-per-shard", "1", "--zstd-level", "1",
        "--session-start-limit", "5000",
        soft=1024, hard=min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 16384),
    )  # fmt: skip
    clis.append(cli)
    proc, urls = cli.proc, cli.urls
    assert open_files_limit(proc.pid) >= SHARDS * 2  # the soft limit was raised to the hard
    cpu0, rss0 = proc_stat(proc.pid)

    loop = asyncio.get_running_loop()
    host = urls["gateway_url"].split("//", 1)[1].rstrip("/")
    address, port = host.rsplit(":", 1)
    shards = [RawShard(i, host) for i in range(SHARDS)]
    started = time.monotonic()
    for chunk in range(0, SHARDS, 250):
        await asyncio.gather(
            *(
                loop.create_connection(lambda s=s: s, address, int(port))
                for s in shards[chunk : chunk + 250]
            )
        )
    await asyncio.gather(*(s.upgraded for s in shards))
    connected = time.monotonic() - started

    # Two rounds at once break the rules: in each bucket one IDENTIFY wins, one gets op 9 ...
    outcomes = await asyncio.gather(*(s.identify(SHARDS) for s in shards[: 2 * max_concurrency]))
    ready = {s.shard_id for s, o in zip(shards, outcomes, strict=False) if o == "ready"}
    assert sorted(i % max_concurrency for i in ready) == list(range(max_concurrency))
    assert outcomes.count("invalid_session") == max_concurrency

    # ... then each bucket at its pace: the next identify a window after the last READY.
    async def bucket(members: list[RawShard]) -> None:
        for shard in members:
            await asyncio.sleep(window * 1.1)
            assert await shard.identify(SHARDS) == "ready"

    await asyncio.gather(
        *(
            bucket([s for s in shards[b::max_concurrency] if s.shard_id not in ready])
            for b in range(max_concurrency)
        )
    )
    after = await stats(urls)
    rounds = -(-SHARDS // max_concurrency)
    ready_in = time.monotonic() - started
    assert after["identifies_refused"] == max_concurrency  # the paced ones were all accepted
    assert after["sessions_attached"] == after["connections"] == SHARDS
    assert not any(s.lost for s in shards)

    # Idle: heartbeats only, each shard at its own phase of the 41.25 s interval.
    interval = 41.25
    for shard in shards:
        loop.call_later(random.random() * interval, beat, loop, shard, interval)
    cpu1, rss1 = proc_stat(proc.pid)
    idle = t(10.0)
    await asyncio.sleep(idle)
    cpu2, rss2 = proc_stat(proc.pid)
    idle_share = (cpu2 - cpu1) / idle
    print(
        f"\n{SHARDS} shards, max_concurrency {max_concurrency}: connected in {connected:.1f} s, "
        f"all READY in {ready_in:.1f} s ({rounds} rounds of {window} s); simulator RSS "
        f"{rss0 / 2**20:.0f} MiB -> {rss2 / 2**20:.0f} MiB "
        f"({(rss2 - rss0) / SHARDS / 1024:.0f} KiB a shard), start-up CPU {cpu1 - cpu0:.2f} s, "
        f"idle CPU {idle_share:.2%} of a core over {idle:.0f} s"
    )
    assert idle_share < 0.05
    final = await stats(urls)
    assert final["violations"] == max_concurrency  # the early identifies, nothing else
    assert final["connections"] == SHARDS
    for shard in shards:
        assert shard.transport is not None
        shard.transport.abort()


def beat(loop: asyncio.AbstractEventLoop, shard: RawShard, interval: float) -> None:
    if shard.lost:
        return
    shard.send({"op": 1, "d": None})
    loop.call_later(interval, beat, loop, shard, interval)


async def test_a_hard_limit_too_low_is_said(clis: list[Cli]) -> None:
    cli = await start_cli("--shards", "2500", soft=64, hard=512)
    clis.append(cli)
    assert open_files_limit(cli.proc.pid) == 512  # raised to the hard limit, no further
    text = await cli.stop()
    assert "open-file limit raised from 64 to 512" in text
    assert "open-file limit 512 is too low for 5000 connections (needs 5064)" in text
