"""AMQP publishing benchmark: the worker against a plain pika publisher, through RabbitMQ.

In one run, alternating, with the same consumer draining the same queue each time:

(a) plain pika: ``AsyncioConnection`` on uvloop, publisher confirms with a window of 1000 in
    flight, stock ``basic_publish`` of the same bodies and properties the worker sends;
(b) worker: the simulator's ``burst()`` on one shard -> ``spectacles-supervise`` (a subprocess,
    ``BROKER_TYPE=amqp``) -> RabbitMQ.

The consumer (a pika subprocess, ``auto_ack``) drains ``<group>:MESSAGE_CREATE``; a rate is the
number of events over the time from the start (publisher start, or the burst) until the
consumer has them all. CPU per event is read from /proc: the publisher process for (a), the
whole ``spectacles-supervise`` process tree (supervisor and forked workers) for (b). With
``--no-consumer`` the queue is left undrained (purged between runs) and the rates are the
publishers' own confirmed rates, which shows the publishers rather than RabbitMQ and the
consumer.

``--placement`` instead compares where pika runs, in this process without the simulator: the
worker's pre-built frames and confirm bookkeeping, batches of 200 events handed over as one
socket read would, at most 10000 unconfirmed, published (i) through ``AsyncioConnection`` on
the uvloop loop that produces them, as the broker does, and (ii) through a ``SelectConnection``
in a dedicated thread, batches handed over with a deque and ``add_callback_threadsafe``,
confirms handed back with ``call_soon_threadsafe``. Reported: messages/s and process CPU per
message.

Usage: python benchmarks/bench_amqp.py [--events 50000] [--size 1024] [--repeat 3]
       [--url amqp://guest:guest@127.0.0.1:5672/%2F] [--no-consumer] [--placement]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pika
from simenv import cpu_seconds, simulator_env

from spectacles_gateway.brokers.wire import msgpack_string
from spectacles_gateway.simulator import Simulator, SimulatorConfig
from spectacles_gateway.simulator.events import MessageFactory

BIN = Path(sys.executable).parent
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

CONSUMER = r"""
import sys, time
import pika, uvloop, asyncio
from pika.adapters.asyncio_connection import AsyncioConnection

url, queue, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def main():
    done = asyncio.get_running_loop().create_future()
    state = {"n": 0, "first": 0.0}
    def on_message(ch, method, props, body):
        n = state["n"] = state["n"] + 1
        if n == 1:
            state["first"] = time.time()
        if n >= expected and not done.done():
            done.set_result(time.time())
    def on_channel(ch):
        ch.basic_qos(prefetch_count=2000)
        ch.basic_consume(queue, on_message, auto_ack=True,
                         callback=lambda _f: print("ready", flush=True))
    def on_open(conn):
        conn.channel(on_open_callback=on_channel)
    conn = AsyncioConnection(pika.URLParameters(url), on_open_callback=on_open)
    last = await done
    print("done %d %.6f %.6f" % (state["n"], state["first"], last), flush=True)
    conn.close()
    await asyncio.sleep(0.2)

uvloop.run(main())
"""

PUBLISHER = r"""
import sys, time
import pika, uvloop, asyncio
from pika.adapters.asyncio_connection import AsyncioConnection
from pika import spec

url, group, path = sys.argv[1], sys.argv[2], sys.argv[3]
bodies = open(path, "rb").read().split(b"\n--8<--\n")
WINDOW = 1000

async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    st = {"sent": 0, "acked": 0, "ch": None, "t0": 0.0}
    n = len(bodies)
    def pump():
        ch = st["ch"]
        while st["sent"] < n and st["sent"] - st["acked"] < WINDOW:
            i = st["sent"]
            props = pika.BasicProperties(
                expiration="120000", headers={"shard_id": 0, "seq": i + 1},
                message_id="bench-session:%d" % (i + 1), timestamp=int(time.time()))
            ch.basic_publish(group, "MESSAGE_CREATE", bodies[i], props, mandatory=True)
            st["sent"] += 1
    def on_confirm(frame):
        m = frame.method
        if m.multiple:
            st["acked"] = m.delivery_tag
        else:
            st["acked"] = max(st["acked"], m.delivery_tag)
        if st["acked"] >= n and not done.done():
            done.set_result(time.time())
        else:
            pump()
    def on_select(_f):
        print("ready", flush=True)
        sys.stdin.readline()
        st["t0"] = time.time()
        pump()
    def on_channel(ch):
        st["ch"] = ch
        ch.confirm_delivery(on_confirm, callback=on_select)
    def on_open(conn):
        conn.channel(on_open_callback=on_channel)
    conn = AsyncioConnection(pika.URLParameters(url), on_open_callback=on_open)
    end = await done
    print("done %.6f %.6f" % (st["t0"], end), flush=True)
    conn.close()
    await asyncio.sleep(0.2)

uvloop.run(main())
"""


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


class Rabbit:
    def __init__(self, url: str, group: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        self.group = group
        self.queue = f"{group}:MESSAGE_CREATE"
        self.ch.exchange_declare(group, "direct", durable=True)
        self.ch.queue_declare(self.queue, durable=True)
        self.ch.queue_bind(self.queue, group, "MESSAGE_CREATE")

    def purge(self) -> None:
        self.ch.queue_purge(self.queue)

    def depth(self) -> int:
        return int(self.ch.queue_declare(self.queue, passive=True).method.message_count)

    def delete(self) -> None:
        for name in ("MESSAGE_CREATE", "SEND", "0"):
            self.ch.queue_delete(f"{self.group}:{name}")
        self.ch.exchange_delete(self.group)
        self.conn.close()


async def start_consumer(url: str, queue: str, expected: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONSUMER, url, queue, str(expected), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    assert line.startswith(b"ready"), line
    return proc


async def consumer_done(proc: asyncio.subprocess.Process) -> float:
    """The time the consumer got the last event."""
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    await proc.wait()
    parts = line.split()
    assert parts and parts[0] == b"done", line
    return float(parts[3])


class _Envelope(msgspec.Struct):
    d: msgspec.Raw


def make_data(events: int, size: int) -> list[bytes]:
    """The raw JSON of ``d`` of ``events`` simulated MESSAGE_CREATEs of ~``size`` bytes."""
    decode = msgspec.json.Decoder(_Envelope).decode
    factory = MessageFactory([81_384_788_765_712_384])
    first = 1_000_000 << 22
    return [bytes(decode(factory.encode(i + 1, first + i, size)).d) for i in range(events)]


async def run_plain(
    url: str, rabbit: Rabbit, path: Path, events: int, consume: bool
) -> tuple[float, float]:
    consumer = await start_consumer(url, rabbit.queue, events) if consume else None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PUBLISHER,
        url,
        rabbit.group,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert (await proc.stdout.readline()).startswith(b"ready")
    cpu0 = cpu_seconds(proc.pid)
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    line = await proc.stdout.readline()
    cpu1 = cpu_seconds(proc.pid)
    await proc.wait()
    _, t0, confirmed_at = line.split()
    end = await consumer_done(consumer) if consumer is not None else float(confirmed_at)
    rabbit.purge()
    return events / (end - float(t0)), (cpu1 - cpu0) / events * 1e6


async def run_worker(
    url: str, rabbit: Rabbit, sim: Simulator, events: int, size: int, consume: bool
) -> tuple[float, float]:
    env = simulator_env(
        sim.http_base,
        BROKER_TYPE="amqp",
        BROKER_GROUP=rabbit.group,
        AMQP_URL=url,
        BROKER_BUFFER="20000",
    )
    before = sim.ledger.identify_count()
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "spectacles-supervise"),
        stdout=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
    )
    while sum(1 for r in sim.ledger.identifies[before:] if r.outcome == "ready") < 1:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # GUILD_CREATEs, first heartbeat, the broker set up
    rabbit.purge()
    consumer = await start_consumer(url, rabbit.queue, events) if consume else None
    pids = tree(proc.pid)
    cpu0 = tree_cpu(pids)
    t0 = time.time()
    sim.burst(0, events, size)
    if consumer is not None:
        end = await consumer_done(consumer)
    else:
        while rabbit.depth() < events:
            await asyncio.sleep(0.01)
        end = time.time()
    cpu1 = tree_cpu(pids)
    proc.terminate()
    await proc.wait()
    rabbit.purge()
    return events / (end - t0), (cpu1 - cpu0) / events * 1e6


PLACEMENT_BATCH = 200
PLACEMENT_WINDOW = 10_000


async def placement_asyncio(url: str, group: str, bodies: list[bytes]) -> tuple[float, float]:
    """Pika on the producing loop, as :class:`AmqpBroker` runs it."""
    from pika.adapters.asyncio_connection import AsyncioConnection

    from spectacles_gateway.brokers.amqp import ConfirmTracker
    from spectacles_gateway.brokers.amqp_frames import FrameBuilder

    loop = asyncio.get_running_loop()
    builder = FrameBuilder(exchange=group, expiration_ms=120000)
    tracker = ConfirmTracker(lambda shard, session, seq: None)
    ready: asyncio.Future[object] = loop.create_future()
    wake = asyncio.Event()

    def on_confirm(frame: object) -> None:
        method = frame.method  # type: ignore[attr-defined]
        tracker.settle(method.delivery_tag, method.multiple, True)
        wake.set()

    def on_channel(ch: object) -> None:
        ch.confirm_delivery(on_confirm, callback=lambda _f: ready.set_result(ch))  # type: ignore[attr-defined]

    conn = AsyncioConnection(
        pika.URLParameters(url),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        custom_ioloop=loop,
    )
    await ready
    cpu0, t0 = process_cpu(), time.perf_counter()
    for start in range(0, len(bodies), PLACEMENT_BATCH):
        while tracker.unconfirmed >= PLACEMENT_WINDOW:
            wake.clear()
            await wake.wait()
        for seq in range(start + 1, min(start + PLACEMENT_BATCH, len(bodies)) + 1):
            frames = builder.event("MESSAGE_CREATE", 0, seq, "session", bodies[seq - 1])
            tracker.add(0, seq, "session", "MESSAGE_CREATE", frames)
        conn._adapter_emit_data(b"".join(tracker.take_pending()))
        await asyncio.sleep(0)
    while tracker.unconfirmed:
        wake.clear()
        await wake.wait()
    t1, cpu1 = time.perf_counter(), process_cpu()
    conn.close()
    await asyncio.sleep(0.2)
    return len(bodies) / (t1 - t0), (cpu1 - cpu0) / len(bodies) * 1e6


async def placement_thread(url: str, group: str, bodies: list[bytes]) -> tuple[float, float]:
    """Pika in a thread of its own, with a clean hand-off both ways."""
    import collections
    import threading

    from pika.adapters.select_connection import SelectConnection

    from spectacles_gateway.brokers.amqp import ConfirmTracker
    from spectacles_gateway.brokers.amqp_frames import FrameBuilder

    loop = asyncio.get_running_loop()
    builder = FrameBuilder(exchange=group, expiration_ms=120000)
    tracker = ConfirmTracker(lambda shard, session, seq: None)
    ready = threading.Event()
    wake = asyncio.Event()
    box: dict[str, object] = {}
    outbox: collections.deque[bytes] = collections.deque()
    confirms: collections.deque[tuple[int, bool]] = collections.deque()
    scheduled = [False]

    def settle() -> None:  # on the loop
        scheduled[0] = False
        while confirms:
            tag, multiple = confirms.popleft()
            tracker.settle(tag, multiple, True)
        wake.set()

    def on_confirm(frame: object) -> None:  # pika's thread
        method = frame.method  # type: ignore[attr-defined]
        confirms.append((method.delivery_tag, method.multiple))
        if not scheduled[0]:
            scheduled[0] = True
            loop.call_soon_threadsafe(settle)

    def on_channel(ch: object) -> None:
        ch.confirm_delivery(on_confirm, callback=lambda _f: ready.set())  # type: ignore[attr-defined]

    def write() -> None:  # pika's thread
        conn = box["conn"]
        while outbox:
            conn._adapter_emit_data(outbox.popleft())  # type: ignore[attr-defined]

    def run() -> None:
        conn = SelectConnection(
            pika.URLParameters(url),
            on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        )
        box["conn"] = conn
        conn.ioloop.start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    await asyncio.to_thread(ready.wait)
    conn: Any = box["conn"]
    cpu0, t0 = process_cpu(), time.perf_counter()
    for start in range(0, len(bodies), PLACEMENT_BATCH):
        while tracker.unconfirmed >= PLACEMENT_WINDOW:
            wake.clear()
            await wake.wait()
        for seq in range(start + 1, min(start + PLACEMENT_BATCH, len(bodies)) + 1):
            frames = builder.event("MESSAGE_CREATE", 0, seq, "session", bodies[seq - 1])
            tracker.add(0, seq, "session", "MESSAGE_CREATE", frames)
        outbox.append(b"".join(tracker.take_pending()))
        conn.ioloop.add_callback_threadsafe(write)
        await asyncio.sleep(0)
    while tracker.unconfirmed:
        wake.clear()
        await wake.wait()
    t1, cpu1 = time.perf_counter(), process_cpu()
    conn.ioloop.add_callback_threadsafe(conn.close)
    await asyncio.sleep(0.3)
    conn.ioloop.add_callback_threadsafe(conn.ioloop.stop)
    await asyncio.to_thread(thread.join, 5)
    return len(bodies) / (t1 - t0), (cpu1 - cpu0) / len(bodies) * 1e6


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def placement(args: argparse.Namespace) -> None:
    import uvloop

    group = f"bench-{uuid.uuid4().hex[:8]}"
    rabbit = Rabbit(args.url, group)
    bodies = make_data(args.events, args.size)
    results: dict[str, list[tuple[float, float]]] = {"asyncio": [], "thread": []}
    try:
        for _ in range(args.repeat):
            for kind, run in (("asyncio", placement_asyncio), ("thread", placement_thread)):
                results[kind].append(uvloop.run(run(args.url, group, bodies)))
                rabbit.purge()
    finally:
        rabbit.delete()
    print(
        f"where pika runs: {args.events} events of ~{args.size} B, batches of "
        f"{PLACEMENT_BATCH}, {PLACEMENT_WINDOW} unconfirmed at most, medians of {args.repeat}"
    )
    for kind, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        label = (
            "AsyncioConnection on the loop" if kind == "asyncio" else "SelectConnection in a thread"
        )
        print(f"  {label:30s} {rate:8.0f} msg/s  {cpu:6.2f} us CPU/msg")


async def main(args: argparse.Namespace) -> None:
    consume = not args.no_consumer

    group = f"bench-{uuid.uuid4().hex[:8]}"
    rabbit = Rabbit(args.url, group)
    bodies_path = Path(f"/tmp/{group}.bodies")
    bodies = [msgpack_string(d) for d in make_data(args.events, args.size)]
    bodies_path.write_bytes(b"\n--8<--\n".join(bodies))
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "worker": []}
    config = SimulatorConfig(shard_count=1, guilds_per_shard=1, identify_window=0.0)
    try:
        async with Simulator(config) as sim:
            for _ in range(args.repeat):
                results["plain"].append(
                    await run_plain(args.url, rabbit, bodies_path, args.events, consume)
                )
                results["worker"].append(
                    await run_worker(args.url, rabbit, sim, args.events, args.size, consume)
                )
    finally:
        bodies_path.unlink(missing_ok=True)
        rabbit.delete()
    how = "consumer drained" if consume else "publisher confirmed, no consumer"
    print(
        f"{args.events} MESSAGE_CREATE events of ~{args.size} B through RabbitMQ ({how}), "
        f"medians of {args.repeat}"
    )
    med: dict[str, tuple[float, float]] = {}
    for kind, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        med[kind] = (rate, cpu)
        label = (
            "plain pika publisher, confirms"
            if kind == "plain"
            else "simulator -> worker -> RabbitMQ"
        )
        runs_text = ", ".join(f"{r:.0f}" for r, _ in runs)
        print(f"  {label:34s} {rate:8.0f} events/s  {cpu:6.1f} us CPU/event  ({runs_text})")
    print(f"  worker / plain rate: {med['worker'][0] / med['plain'][0]:.2f} (target >= 0.85)")
    print(f"  worker CPU per published, confirmed event: {med['worker'][1]:.1f} us (goal <= 25)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL))
    parser.add_argument("--no-consumer", action="store_true")
    parser.add_argument("--placement", action="store_true")
    arguments = parser.parse_args()
    if arguments.placement:
        placement(arguments)
    else:
        asyncio.run(main(arguments))
