"""Our gateway side by side with hikari, on the same simulator stream, in the same run.

Clients (each its own process, CPU read from /proc over the measured window):

- ``worker``: our worker alone (a ``Worker`` with the stdio broker writing JSON lines to a
  pipe), no supervisor;
- ``stdio``: ``spectacles-supervise`` on the stdio broker (the worker writes to the supervisor,
  which relays whole records to stdout): CPU of both, and of the supervisor's relay alone;
- ``amqp``: ``spectacles-supervise`` publishing to RabbitMQ with confirms (a pika consumer in
  another process drains the queue; neither it nor RabbitMQ is counted);
- ``hikari``: hikari's ``GatewayShardImpl`` (zstd-stream, uvloop, orjson when installed),
  counting every dispatch it hands to its event manager;
- ``bare``: the floor, not a product: per shard a uvloop protocol that splits websocket frames,
  zstd-decompresses each message and counts the dispatches, and nothing else (no JSON, no
  state, no output, no heartbeat timing); ``bare~S`` also rests S s after each turn that read
  something, as our worker does. What reading and decompressing alone cost on this machine at
  each shape: where a goal lies below the floor, no client can meet it here.

Shapes:

- ``saturated``: one shard, a burst of ``--events`` events written to the socket at once;
- ``paced``: one shard, ``--rate`` events/s (default 8,000), one per write and wake-up;
- ``many``: ``--shards`` shards (default 512) at 2 events/s each, all in one worker process.

The simulator runs in a process of its own with the ``realistic`` profile (``--profile``): a
busy bot's mix of events, seeded, so every client gets the same stream. Our clients publish
READY, GUILD_CREATE and every type of the mix; the benchmark reads every record they write (or
the AMQP consumer does) and checks that each shard's seqs follow one another: nothing lost,
duplicated or reordered. Printed per shape and client: CPU µs per event (process CPU over the
window / events), events/s, RSS, and the ratio of CPU per event to hikari's in the same run;
min-max over ``--runs`` repetitions (clients alternated within each repetition).

Needs ``pip install -e '.[bench]'`` (hikari, orjson, py-spy), RabbitMQ for ``amqp``.

Usage: python benchmarks/bench_peers.py [--quick] [--runs 3] [--shapes saturated,paced,many]
       [--clients worker,stdio,amqp,hikari,bare] [--events 200000] [--rate 8000] [--shards 512]
       [--window 10] [--profile realistic] [--amqp-url amqp://guest:guest@127.0.0.1:5672/%2F]
       [--profile-worker FILE] (py-spy of the worker alone in the ``many`` shape)
       [--profile-supervisor FILE] (py-spy of the supervisor on stdio in the ``many`` shape)
       [--base PYTHON] (the same clients from another checkout's venv, as ``<client>@base``)
       [--rests 0.01,0.05] (our worker and the bare client also as ``worker~S``, ``bare~S``,
       resting S s after a small flush / a turn that read)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simenv import context_switches, cpu_seconds, simulator_env

BIN = Path(sys.executable).parent
PAGE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: What our clients publish: everything the simulator sends in these shapes.
EVENTS = (
    "READY",
    "GUILD_CREATE",
    "MESSAGE_CREATE",
    "MESSAGE_UPDATE",
    "TYPING_START",
    "PRESENCE_UPDATE",
    "GUILD_MEMBER_UPDATE",
    "MESSAGE_REACTION_ADD",
)
#: GUILDS, GUILD_MEMBERS, GUILD_PRESENCES, GUILD_MESSAGES, _REACTIONS, _TYPING.
INTENTS = 1 | 2 | 256 | 512 | 1024 | 2048

SIM = r"""
import asyncio, json, sys
import uvloop
from spectacles_gateway.simulator import Simulator, SimulatorConfig

async def main():
    config = SimulatorConfig(**json.loads(sys.argv[1]))
    async with Simulator(config) as sim:
        print(json.dumps({"gateway": sim.gateway_url, "http": sim.http_base}), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd, *args = line.decode().split()
            out = {}
            if cmd == "mark":
                out = {"identifies": len(sim.ledger.identifies)}
            elif cmd == "ready":
                n, base = int(args[0]), int(args[1])
                while sum(r.outcome == "ready" for r in sim.ledger.identifies[base:]) < n:
                    await asyncio.sleep(0.02)
            elif cmd == "burst":
                sim.burst(0, int(args[0]))
            elif cmd == "rate":
                sim.set_rate(float(args[0]))
            elif cmd == "stats":
                out = sim.stats()
            print(json.dumps(out), flush=True)

uvloop.run(main())
"""

WORKER = r"""
import sys
import uvloop
from spectacles_gateway.brokers.stdio import StdioBroker
from spectacles_gateway.plan import WorkerPlan
from spectacles_gateway.worker import Worker

url, shards, intents, events = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
plan = WorkerPlan(shard_ids=tuple(range(shards)), shard_count=shards, token="simulated-token",
                  intents=intents, gateway_url=url, events=frozenset(events.split(",")),
                  max_concurrency=shards)
worker = Worker(plan, StdioBroker("json", stdout_fd=1))
if len(sys.argv) > 5:  # worker~SECONDS: another rest after a small flush (see --rests)
    worker.rest = float(sys.argv[5])
sys.exit(uvloop.run(worker.run()))
"""

HIKARI = r"""
import asyncio, sys, time
import hikari, uvloop
from hikari.api.shard import GatewayCompression
from hikari.impl import config as hikari_config
from hikari.impl.shard import GatewayShardImpl

url, shards, intents = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
count = 0
out = sys.stdout

class EventManager:
    def consume_raw_event(self, name, shard, payload):
        global count
        count += 1
        if count % 1000 == 0:
            out.write("%d %.6f\n" % (count, time.perf_counter()))
            out.flush()
    async def dispatch(self, event, *, return_tasks=False):
        return []

class EventFactory:
    def deserialize_connected_event(self, shard):
        return None
    def deserialize_disconnected_event(self, shard):
        return None

async def main():
    manager, factory = EventManager(), EventFactory()
    gateway = [GatewayShardImpl(
        token="simulated-token", url=url, intents=hikari.Intents(intents), shard_id=i,
        shard_count=shards, compression=GatewayCompression.TRANSPORT_ZSTD_STREAM,
        http_settings=hikari_config.HTTPSettings(),
        proxy_settings=hikari_config.ProxySettings(trust_env=False),
        event_manager=manager, event_factory=factory) for i in range(shards)]
    await asyncio.gather(*(s.start() for s in gateway))
    await asyncio.Event().wait()

uvloop.run(main())
"""

BARE = r"""
import asyncio, base64, json, os, struct, sys, time
import uvloop
try:
    from compression import zstd
except ImportError:
    from backports import zstd

url, shards, intents = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rest = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0  # bare~S: rest like our worker
resting = False
host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
count = 0
out = sys.stdout
conns = []

def frame(text):
    # A client frame: FIN + text, masked with a zero key (the payload as it is).
    data = text.encode()
    n = len(data)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + struct.pack(">H", n)
    return head + b"\0\0\0\0" + data

class Bare(asyncio.Protocol):
    # The floor: read, split frames, decompress, count. No JSON, no state, no output.
    def __init__(self, shard):
        self.shard, self.buf, self.open = shard, b"", False
        self.zstd = zstd.ZstdDecompressor()
        self.hello = True

    def connection_made(self, transport):
        self.t = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET /?v=10&encoding=json&compress=zstd-stream HTTP/1.1\r\n"
                         f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data):
        global count, resting
        if rest and not resting:
            resting = True
            asyncio.get_running_loop().call_soon(pause)
        buf = self.buf + data if self.buf else data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.open, buf = True, buf[end + 4:]
        pos, n = 0, len(buf)
        while n - pos >= 2:
            length, start = buf[pos + 1] & 0x7F, pos + 2
            if length == 126:
                length, start = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
            elif length == 127:
                length, start = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
            if start + length > n:
                break
            if buf[pos] & 0x0F == 2:
                text = self.zstd.decompress(buf[start:start + length])
                if self.hello:
                    self.hello = False
                    self.t.write(frame(json.dumps({"op": 2, "d": {
                        "token": "simulated-token", "intents": intents,
                        "properties": {"os": "linux", "browser": "bare", "device": "bare"},
                        "shard": [self.shard, shards]}})))
                elif text[:6] == b'{"t":"':  # a dispatch (its event name is a string)
                    count += 1
                    if count % 1000 == 0:
                        out.write("%d %.6f\n" % (count, time.perf_counter()))
                        out.flush()
            pos = start + length
        self.buf = buf[pos:] if pos < n else b""

def pause():
    # After a turn that read something, sleep: what arrives meanwhile is read in one turn.
    global resting
    resting = False
    time.sleep(rest)

async def main():
    loop = asyncio.get_running_loop()
    for i in range(shards):
        conns.append((await loop.create_connection(lambda i=i: Bare(i), host, int(port)))[1])
    while True:
        await asyncio.sleep(30)
        for c in conns:
            c.t.write(frame('{"op":1,"d":null}'))

uvloop.run(main())
"""

CONSUMER = r"""
import asyncio, sys, time
import pika, uvloop
from pika.adapters.asyncio_connection import AsyncioConnection

url, queue = sys.argv[1], sys.argv[2]
state = {"n": 0, "gaps": 0, "reordered": 0}
last = {}
out = sys.stdout

def on_message(ch, method, props, body):
    n = state["n"] = state["n"] + 1
    headers = props.headers or {}
    shard, seq = headers.get("shard_id"), headers.get("seq")
    if seq is not None:
        prev = last.get(shard)
        if prev is not None and seq != prev + 1:
            state["gaps" if seq > prev else "reordered"] += 1
        last[shard] = seq
    if n % 1000 == 0:
        out.write("%d %.6f\n" % (n, time.perf_counter()))
        out.flush()

async def main():
    loop = asyncio.get_running_loop()
    opened = loop.create_future()
    def on_channel(ch):
        ch.basic_qos(prefetch_count=2000)
        ch.basic_consume(queue, on_message, auto_ack=True,
                         callback=lambda _f: opened.set_result(None))
    conn = AsyncioConnection(pika.URLParameters(url),
                             on_open_callback=lambda c: c.channel(on_open_callback=on_channel))
    await opened
    out.write("ready\n"); out.flush()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        out.write("report %d %d %d\n" % (state["n"], state["gaps"], state["reordered"]))
        out.flush()
    conn.close()

uvloop.run(main())
"""

# --------------------------------------------------------------------------- /proc


def rss_mib(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


# --------------------------------------------------------------------------- the simulator


class SimProcess:
    """The simulator in a process of its own: one command line in, one JSON line out."""

    def __init__(self, proc: asyncio.subprocess.Process, urls: dict[str, str]) -> None:
        self.proc = proc
        self.gateway = urls["gateway"]
        self.http = urls["http"]
        self.lock = asyncio.Lock()

    @classmethod
    async def start(cls, **config: Any) -> SimProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SIM,
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        assert proc.stdout is not None
        return cls(proc, json.loads(await proc.stdout.readline()))

    async def ask(self, *words: object) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self.lock:
            self.proc.stdin.write((" ".join(map(str, words)) + "\n").encode())
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator process ended")
        result: dict[str, Any] = json.loads(line)
        return result

    async def events(self) -> int:
        return int((await self.ask("stats"))["events"])

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        await self.proc.wait()


# --------------------------------------------------------------------------- output readers

_RECORD = re.compile(rb'"shard_id":(\d+),"seq":(\d+)')


@dataclass
class Tally:
    """What a client delivered: count, first and last arrival, per-shard seq continuity."""

    count: int = 0
    first: float = 0.0
    first_count: int = 0
    last: float = 0.0
    gaps: int = 0
    reordered: int = 0
    checked: bool = False
    seqs: dict[int, int] = field(default_factory=dict)

    def mark(self, count: int, now: float) -> None:
        if not self.first:
            self.first, self.first_count = now, count
        self.count, self.last = count, now

    def rate(self) -> float:
        span = self.last - self.first
        return (self.count - self.first_count) / span if span > 0 else 0.0

    def seq_summary(self) -> str:
        if not self.checked:
            return "n/a"
        return (
            "ok"
            if not (self.gaps or self.reordered)
            else (f"{self.gaps} gaps, {self.reordered} reordered")
        )


async def read_records(stream: asyncio.StreamReader, tally: Tally) -> None:
    """JSON lines of our stdio broker: count them and check each shard's seqs."""
    tally.checked = True
    rest = b""
    seqs = tally.seqs
    while chunk := await stream.read(1 << 20):
        now = time.perf_counter()
        data = rest + chunk
        end = data.rfind(b"\n") + 1
        rest = data[end:]
        lines = data.count(b"\n", 0, end)
        for shard_b, seq_b in _RECORD.findall(data, 0, end):
            shard, seq = int(shard_b), int(seq_b)
            prev = seqs.get(shard)
            if prev is not None and seq != prev + 1:
                if seq > prev:
                    tally.gaps += 1
                else:
                    tally.reordered += 1
            seqs[shard] = seq
        if lines:
            tally.mark(tally.count + lines, now)


async def read_counts(
    stream: asyncio.StreamReader, tally: Tally, reports: asyncio.Queue[str]
) -> None:
    """``<count> <perf_counter>`` lines (hikari, the AMQP consumer), and ``report`` lines."""
    while line := await stream.readline():
        if line.startswith(b"report"):
            await reports.put(line.decode())
            continue
        if line.startswith(b"ready"):
            await reports.put("ready")
            continue
        count, at = line.split()
        tally.mark(int(count), float(at))


# --------------------------------------------------------------------------- one client run


@dataclass
class Result:
    cpu_us: float  # product CPU per event (all our processes, or hikari's)
    rate: float
    rss: float  # MiB, all our processes
    parts: dict[str, float]  # CPU µs/event by process
    rss_parts: dict[str, float]
    seq: str
    events: int
    note: str = ""
    wakes: dict[str, float] = field(default_factory=dict)  # context switches/s by process


def gateway_env(sim: SimProcess, shards: int) -> dict[str, str]:
    return simulator_env(
        sim.http,
        SUPERVISOR_WORKERS="1",
        DISCORD_EVENTS=",".join(EVENTS),
        DISCORD_RAW_INTENTS=str(INTENTS),
        DISCORD_SHARD_COUNT=str(shards),
    )


class Client:
    """One measured client process (and, for AMQP, its consumer and queue)."""

    def __init__(self, name: str, sim: SimProcess, shards: int, args: argparse.Namespace) -> None:
        self.name = name
        # "<kind>@base": the same client from the --base checkout's interpreter; "worker~S":
        # our worker resting S seconds after a small flush (--rests).
        kind, _, variant = name.partition("@")
        self.kind, _, self.rest = kind.partition("~")
        self.python = Path(args.base) if variant == "base" else Path(sys.executable)
        self.sim = sim
        self.shards = shards
        self.args = args
        self.tally = Tally()
        self.reports: asyncio.Queue[str] = asyncio.Queue()
        self.proc: asyncio.subprocess.Process | None = None
        self.consumer: asyncio.subprocess.Process | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.group = ""
        self.rabbit: Any = None

    async def start(self) -> None:
        base = (await self.sim.ask("mark"))["identifies"]
        env = gateway_env(self.sim, self.shards)
        url = self.sim.gateway
        if self.kind == "worker":
            argv = [str(self.python), "-c", WORKER, url, str(self.shards), str(INTENTS),
                    ",".join(EVENTS), *([self.rest] if self.rest else [])]  # fmt: skip
        elif self.kind == "hikari":
            argv = [sys.executable, "-c", HIKARI, url, str(self.shards), str(INTENTS)]
        elif self.kind == "bare":
            argv = [sys.executable, "-c", BARE, url, str(self.shards), str(INTENTS),
                    *([self.rest] if self.rest else [])]  # fmt: skip
        else:
            argv = [str(self.python.parent / "spectacles-supervise")]
        if self.kind == "amqp":
            await self._start_amqp(env)
        stdout = asyncio.subprocess.DEVNULL if self.kind == "amqp" else asyncio.subprocess.PIPE
        # From a neutral directory: each interpreter imports the code of its own checkout (a
        # `-c` script or `-m` worker would import the current directory's first).
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=stdout, stdin=asyncio.subprocess.DEVNULL, env=env, limit=1 << 20, cwd="/"
        )
        if self.proc.stdout is not None:
            reader = (
                read_records(self.proc.stdout, self.tally)
                if self.kind in ("worker", "stdio")
                else read_counts(self.proc.stdout, self.tally, self.reports)
            )
            self.tasks.append(asyncio.create_task(reader))
        await asyncio.wait_for(self.sim.ask("ready", self.shards, base), 120)

    async def _start_amqp(self, env: dict[str, str]) -> None:
        import pika

        self.group = f"bench-peers-{uuid.uuid4().hex[:8]}"
        env.update(BROKER_TYPE="amqp", AMQP_URL=self.args.amqp_url, BROKER_GROUP=self.group)
        self.rabbit = pika.BlockingConnection(pika.URLParameters(self.args.amqp_url))
        ch = self.rabbit.channel()
        ch.exchange_declare(self.group, "direct", durable=True)
        queue = f"{self.group}:events"
        ch.queue_declare(queue, durable=True)
        for name in EVENTS:
            ch.queue_bind(queue, self.group, name)
        self.consumer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CONSUMER, self.args.amqp_url, queue,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.consumer.stdout is not None
        self.tasks.append(
            asyncio.create_task(read_counts(self.consumer.stdout, self.tally, self.reports))
        )
        assert await self.reports.get() == "ready"

    def pids(self) -> dict[str, int]:
        assert self.proc is not None
        if self.kind in ("stdio", "amqp"):
            kids = children(self.proc.pid)
            return {"supervisor": self.proc.pid, **{f"worker{i}": p for i, p in enumerate(kids)}}
        return {self.kind: self.proc.pid}

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids().items()}

    def switches(self) -> dict[str, int]:
        return {name: context_switches(pid) for name, pid in self.pids().items()}

    async def seq_check(self) -> str:
        if self.kind in ("hikari", "bare"):
            return "n/a"
        if self.kind == "amqp":
            assert self.consumer is not None and self.consumer.stdin is not None
            self.consumer.stdin.write(b"report\n")
            await self.consumer.stdin.drain()
            _, _count, gaps, reordered = (await self.reports.get()).split()
            return "ok" if gaps == reordered == "0" else f"{gaps} gaps, {reordered} reordered"
        return self.tally.seq_summary()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.consumer is not None:
            assert self.consumer.stdin is not None
            self.consumer.stdin.close()
            try:
                await asyncio.wait_for(self.consumer.wait(), 5)
            except TimeoutError:
                self.consumer.kill()
                await self.consumer.wait()
        for task in self.tasks:
            task.cancel()
        if self.rabbit is not None:
            ch = self.rabbit.channel()
            ch.queue_delete(f"{self.group}:events")
            for name in ("SEND", *map(str, range(self.shards))):
                with contextlib.suppress(Exception):
                    ch.queue_delete(f"{self.group}:{name}")
            ch.exchange_delete(self.group)
            self.rabbit.close()


def summarize(
    client: Client, cpu0: dict[str, float], cpu1: dict[str, float], events: int, rate: float
) -> tuple[float, dict[str, float]]:
    parts = {k: (cpu1[k] - cpu0.get(k, cpu1[k])) / max(events, 1) * 1e6 for k in cpu1}
    return sum(parts.values()), parts


async def measure_saturated(client: Client, events: int) -> Result:
    await asyncio.sleep(1.0)  # GUILD_CREATEs and the first heartbeat pass
    start_count = client.tally.count
    client.tally.first = 0.0  # the rate runs from the first arrival of the burst
    cpu0 = client.cpu()
    own0 = time.process_time()
    await client.sim.ask("burst", events)
    target = start_count + events
    deadline = time.monotonic() + 120
    while client.tally.count < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{client.kind}: {client.tally.count - start_count}/{events}")
        await asyncio.sleep(0.005)
    cpu1 = client.cpu()
    own = (time.process_time() - own0) / events * 1e6
    cpu, parts = summarize(client, cpu0, cpu1, events, 0.0)
    rss = {k: rss_mib(p) for k, p in client.pids().items()}
    note = f"(the reader: {own:.2f} us/event)"
    return Result(cpu, client.tally.rate(), sum(rss.values()), parts, rss,
                  await client.seq_check(), events, note)  # fmt: skip


async def measure_window(client: Client, rate: float, window: float) -> Result:
    await asyncio.sleep(1.0)
    await client.sim.ask("rate", rate)
    await asyncio.sleep(1.0)  # every stream started; steady state
    e0, t0, cpu0 = await client.sim.events(), time.perf_counter(), client.cpu()
    sw0 = client.switches()
    await asyncio.sleep(window)
    e1, t1, cpu1 = await client.sim.events(), time.perf_counter(), client.cpu()
    sw1 = client.switches()
    wakes = {k: (sw1[k] - sw0.get(k, sw1[k])) / (t1 - t0) for k in sw1}
    stats = await client.sim.ask("stats")
    await client.sim.ask("rate", 0)
    written = e1 - e0
    late = f"sim: {stats['late_writes']} late writes, {stats['skipped']} skipped"
    cpu, parts = summarize(client, cpu0, cpu1, written, 0.0)
    rss = {k: rss_mib(p) for k, p in client.pids().items()}
    # Every event written must arrive (whole output; the check covers the window).
    total = await client.sim.events()
    deadline = time.monotonic() + 10
    if client.kind != "hikari":
        while client.tally.count < _delivered_floor(client, total) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    return Result(cpu, written / (t1 - t0), sum(rss.values()), parts, rss,
                  await client.seq_check(), written, late, wakes)  # fmt: skip


def _delivered_floor(client: Client, total: int) -> int:
    return total  # the generated events at least (READY and GUILD_CREATEs come on top)


# --------------------------------------------------------------------------- shapes


SHAPES = ("saturated", "paced", "many")
CLIENTS = ("worker", "stdio", "amqp", "hikari", "bare")


def sim_config(shape: str, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    base = {"profile": args.profile, "seed": args.seed, "identify_window": 0.0,
            "record_traffic": False, "guilds_per_shard": 1, "other_host": ""}  # fmt: skip
    if shape == "many":
        return dict(base, shard_count=args.shards, max_concurrency=args.shards), args.shards
    return dict(base, shard_count=1), 1


async def run_shape(shape: str, args: argparse.Namespace) -> dict[str, list[Result]]:
    config, shards = sim_config(shape, args)
    results: dict[str, list[Result]] = {c: [] for c in args.clients}
    failures: dict[str, list[str]] = {c: [] for c in args.clients}
    for _run in range(args.runs):
        for kind in args.clients:
            # A simulator per client run: every client gets the same seeded stream.
            sim = await SimProcess.start(**config)
            client = Client(kind, sim, shards, args)
            try:
                result = await measure(shape, client, kind, _run, args)
            except Exception as exc:  # one failed run (RabbitMQ restarted, ...)
                failures[kind].append(f"{type(exc).__name__}: {exc}")
                print(f"  [{shape} run {_run + 1}] {kind}: FAILED ({type(exc).__name__}: {exc})",
                      file=sys.stderr, flush=True)  # fmt: skip
            else:
                results[kind].append(result)
                print(f"  [{shape} run {_run + 1}] {kind:11s} {result.cpu_us:7.2f} us/event "
                      f"{result.rate:9.0f} ev/s rss {result.rss:6.1f} MiB seq {result.seq} "
                      f"{result.note}", file=sys.stderr, flush=True)  # fmt: skip
            finally:
                with contextlib.suppress(Exception):
                    await client.stop()
                await sim.stop()
    for kind, failed in failures.items():
        for reason in failed:
            print(f"  ({shape}: a run of {kind} failed and is left out: {reason})")
    return results


async def measure(
    shape: str, client: Client, kind: str, run: int, args: argparse.Namespace
) -> Result:
    await client.start()
    if shape == "saturated":
        return await measure_saturated(client, args.events)
    if shape == "paced":
        return await measure_window(client, args.rate, args.window)
    suffix = ".base" if kind.endswith("@base") else ""
    if args.profile_worker and client.kind == "worker" and run == 0:
        await profile_many(client, args, args.profile_worker + suffix, "worker")
    if args.profile_supervisor and client.kind == "stdio" and run == 0:
        await profile_many(client, args, args.profile_supervisor + suffix, "supervisor")
    return await measure_window(client, 2.0, args.window)


async def profile_many(client: Client, args: argparse.Namespace, output: str, part: str) -> None:
    """py-spy (if installed) of one process of a client (the worker alone, or the supervisor
    on stdio) while its shards get 2 events/s each."""
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(spy).exists():
        print("py-spy not installed: no profile", file=sys.stderr)
        return
    pid = client.pids()[part]
    await client.sim.ask("rate", 2.0)
    await asyncio.sleep(1.0)
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--duration", str(int(args.window)), "--rate", "1000",
        *args.spy_flags.split(),
        "--format", "raw", "--output", output,
        *(() if "--native" in args.spy_flags else ("--nonblocking",)),
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await proc.wait()
    await client.sim.ask("rate", 0)
    print(f"profile written to {output}", file=sys.stderr)


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return (
        fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"
    )


def report(shape: str, results: dict[str, list[Result]], args: argparse.Namespace) -> None:
    titles = {
        "saturated": f"1 shard saturated: a burst of {args.events} events",
        "paced": f"1 shard paced at {args.rate:.0f} events/s",
        "many": f"{args.shards} shards x 2 events/s in one process",
    }
    print(f"\n{titles[shape]} ({args.profile} profile), min-max of {args.runs} runs")
    print(f"  {'client':11s} {'CPU us/event':>14s} {'events/s':>15s} {'RSS MiB':>13s} "
          f"{'x hikari':>11s}  seq  (CPU split us/event; RSS split MiB)")  # fmt: skip
    hikari = results.get("hikari")
    for kind, runs in results.items():
        if not runs:
            continue
        ratio = "-"
        if hikari and kind != "hikari":
            ratio = span([r.cpu_us / h.cpu_us for r, h in zip(runs, hikari, strict=False)])
        split = ""
        if len(runs[0].parts) > 1:
            split = "  (" + ", ".join(
                f"{k} {span([r.parts.get(k, 0.0) for r in runs])}" for k in runs[0].parts
            ) + "; " + ", ".join(
                f"{k} {span([r.rss_parts.get(k, 0.0) for r in runs], '{:.1f}')}"
                for k in runs[0].rss_parts
            ) + ")"  # fmt: skip
        if runs[0].wakes:
            split += "  wake-ups/s: " + ", ".join(
                f"{k} {span([r.wakes.get(k, 0.0) for r in runs], '{:.0f}')}" for k in runs[0].wakes
            )
        seqs = sorted({r.seq for r in runs})
        print(f"  {kind:11s} {span([r.cpu_us for r in runs]):>14s} "
              f"{span([r.rate for r in runs], '{:.0f}'):>15s} "
              f"{span([r.rss for r in runs], '{:.1f}'):>13s} {ratio:>11s}  "
              f"{'/'.join(seqs)}{split}")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, fewer events")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=8000.0)
    parser.add_argument("--shards", type=int, default=512)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--profile", default="realistic", choices=("realistic", "uniform"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--amqp-url", default=DEFAULT_URL)
    parser.add_argument(
        "--base",
        default="",
        metavar="PYTHON",
        help="also run our clients (as worker@base, ...) with this interpreter: a checkout's "
        "venv, measured in the same run for a before/after comparison",
    )
    parser.add_argument(
        "--rests",
        default="",
        metavar="SECONDS,...",
        help="also run our worker (as worker~S) resting S seconds after a small flush instead "
        "of worker.REST: latency against CPU per event, in the same run",
    )
    parser.add_argument("--profile-worker", default="", metavar="FILE")
    parser.add_argument("--profile-supervisor", default="", metavar="FILE")
    parser.add_argument("--spy-flags", default="", help="more py-spy flags, e.g. --native")
    args = parser.parse_args()
    if args.quick:
        args.events = min(args.events, 50_000)
        args.window = min(args.window, 3.0)
        args.runs = 1 if "--runs" not in sys.argv else args.runs
    args.clients = [c for c in args.clients.split(",") if c]
    shapes = [s for s in args.shapes.split(",") if s]
    for name in [*args.clients, *shapes]:
        if name.partition("~")[0] not in CLIENTS + SHAPES:  # worker~0.05: a rest of its own
            parser.error(f"unknown client or shape {name!r}")
    for kind in ("worker", "bare"):
        if args.rests and kind in args.clients:
            at = args.clients.index(kind) + 1
            args.clients[at:at] = [f"{kind}~{float(r):g}" for r in args.rests.split(",") if r]
    if args.base:
        args.clients = [
            name
            for kind in args.clients
            for name in (
                (kind,) if kind in ("hikari", "bare") or "~" in kind else (f"{kind}@base", kind)
            )
        ]
    print(f"bench_peers: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"clients {','.join(args.clients)}, seed {args.seed}")  # fmt: skip
    all_results = {}
    for shape in shapes:
        all_results[shape] = await run_shape(shape, args)
        report(shape, all_results[shape], args)
    if "saturated" in all_results and "many" in all_results:
        print("\nmany / saturated, product CPU per event (goal <= 2):")
        for kind in args.clients:
            sat, many = all_results["saturated"][kind], all_results["many"][kind]
            if sat and many:
                ratios = [m.cpu_us / s.cpu_us for s, m in zip(sat, many, strict=False)]
                print(f"  {kind:11s} {span(ratios)}")
    print()
    for variant in ("@base", ""):
        worker, stdio = f"worker{variant}", f"stdio{variant}"
        one = [r.rss for shape in ("paced",) for r in all_results.get(shape, {}).get(worker, [])]
        many_rss = [r.rss for r in all_results.get("many", {}).get(worker, [])]
        if one and many_rss:
            per = [(m - min(one)) * 1024 / (args.shards - 1) for m in many_rss]
            print(f"{worker}: RSS {span(one, '{:.1f}')} MiB with 1 shard (paced), "
                  f"{span(many_rss, '{:.1f}')} MiB with {args.shards} (2 events/s each): "
                  f"{span(per, '{:.0f}')} KiB per extra shard")  # fmt: skip
        sup = [r.rss_parts.get("supervisor", 0.0) for shape in all_results.values()
               for r in shape.get(stdio, [])]  # fmt: skip
        if sup:
            print(f"{stdio}: supervisor RSS {span(sup, '{:.1f}')} MiB")


if __name__ == "__main__":
    asyncio.run(main())
