"""Playing the worker's part for a broker under test, and helpers for tests against RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pika
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spectacles_gateway import metrics
from spectacles_gateway.brokers.amqp import AmqpBroker
from spectacles_gateway.brokers.base import Ack, Broker, Progress
from spectacles_gateway.brokers.redis_streams import RedisStreamsBroker
from spectacles_gateway.brokers.wire import SENDABLE_OPS, msgpack_string
from spectacles_gateway.metrics import REGISTRY
from spectacles_gateway.redis_link import redis_client
from spectacles_gateway.simulator import Simulator

from ..gwtest import running_worker, simulator, t
from .redis import REDIS_URL, settings_for

T = TypeVar("T")


def _nothing(*args: object) -> None:
    return None


class Driver:
    """Takes a broker's :class:`Progress` (after each flush, and when the broker wakes us) and
    hands it to callbacks shaped like the worker's handling of it."""

    def __init__(
        self,
        broker: Broker,
        *,
        confirm: Callable[[int, str, int], None] = _nothing,
        pause: Callable[[], None] = _nothing,
        resume: Callable[[], None] = _nothing,
        commands: Callable[[bytes, Ack], None] | None = None,
        shard_commands: Callable[[int, bytes, Ack], None] | None = None,
        fail: Callable[[str], None] = _nothing,
    ) -> None:
        self.broker = broker
        self.confirm = confirm
        self.pause = pause
        self.resume = resume
        self.commands = commands
        self.shard_commands = shard_commands
        self.fail = fail
        self._scheduled = False
        broker.set_wakeup(self._wake)

    def flush(self) -> None:
        self.apply(self.broker.flush())

    def _wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        self._scheduled = False
        self.apply(self.broker.take_progress())

    def apply(self, progress: Progress | None) -> None:
        if progress is None:
            return
        for shard_id, (session, seq) in progress.confirmed.items():
            self.confirm(shard_id, session, seq)
        if progress.paused is True:
            self.pause()
        elif progress.paused is False:
            self.resume()
        for inbound in progress.commands:
            if inbound.shard_id is None:
                if self.commands is not None:
                    self.commands(inbound.body, inbound.ack)
                else:
                    inbound.ack()
            elif self.shard_commands is not None:
                self.shard_commands(inbound.shard_id, inbound.body, inbound.ack)
            else:
                inbound.ack()
        if progress.failed is not None:
            self.fail(progress.failed)


# ------------------------------------------------------------------------------ RabbitMQ

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PRESENCE = {"status": "idle", "since": None, "activities": [], "afk": False}


def unique_group() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def channel() -> Iterator[Any]:
    """A short-lived pika channel (blocking): one per operation, so any thread may use it."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def declare_event_queue(group: str, event: str = "MESSAGE_CREATE") -> str:
    """What a Spectacles consumer declares: the exchange and ``<group>:<event>`` bound."""
    queue = f"{group}:{event}"
    with channel() as ch:
        ch.exchange_declare(group, "direct", durable=True)
        ch.queue_declare(queue, durable=True)
        ch.queue_bind(queue, group, event)
    return queue


def depth(queue: str) -> int:
    with channel() as ch:
        return int(ch.queue_declare(queue, passive=True).method.message_count)


def drain(queue: str) -> list[tuple[Any, bytes]]:
    """Every message in ``queue`` as (properties, body), acked."""
    out: list[tuple[Any, bytes]] = []
    with channel() as ch:
        ch.basic_qos(prefetch_count=1000)
        for method, props, body in ch.consume(queue, inactivity_timeout=0.5):
            if method is None:
                break
            out.append((props, body))
            ch.basic_ack(method.delivery_tag)
        ch.cancel()
    return out


def publish(group: str, routing_key: str, body: bytes) -> None:
    with channel() as ch:
        ch.confirm_delivery()
        ch.basic_publish(group, routing_key, body)


def delete_group(group: str, queues: Sequence[str] = (), shards: int = 4) -> None:
    names = [*queues, f"{group}:SEND", *(f"{group}:{i}" for i in range(shards))]
    with channel() as ch:
        for name in names:
            ch.queue_delete(name)
        ch.exchange_delete(group)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def shard_ready(worker: Any, shard_id: int = 0) -> bool:
    runner = worker.runners.get(shard_id)
    return runner is not None and bool(runner.ready)


def amqp_broker(group: str, shard_ids: tuple[int, ...] = (0,), **options: Any) -> AmqpBroker:
    options.setdefault("reconnect_base", 0.1)
    options.setdefault("reconnect_cap", 1.0)
    return AmqpBroker(AMQP_URL, group=group, shard_ids=shard_ids, **options)


@contextlib.asynccontextmanager
async def gateway(
    sim: Simulator, group: str, shard_ids: tuple[int, ...] = (0,), **options: Any
) -> AsyncIterator[tuple[Any, AmqpBroker]]:
    broker = amqp_broker(group, shard_ids, **options)
    async with running_worker(sim, shard_ids, broker=broker) as (worker, _):
        yield worker, broker


# ------------------------------------------------------------------------------ Redis streams


def redis_streams_broker(prefix: str, url: str | None = None, **kwargs: Any) -> RedisStreamsBroker:
    """A streams broker on ``prefix`` (its streams, ``<prefix>SEND``, group ``gateway``) with
    its two clients, as :meth:`RedisStreamsBroker.from_settings` builds them."""
    url = url or REDIS_URL
    settings = settings_for(prefix, url=url)
    kwargs.setdefault("stream_prefix", prefix)
    kwargs.setdefault("group", "gateway")
    return RedisStreamsBroker(
        redis_client(settings), redis_client(settings, max_connections=1), url=url, **kwargs
    )


# ------------------------------------------------------------------------------ fuzzing

#: Hypothesis examples per property: 200 in CI; HYPOTHESIS_MAX_EXAMPLES=20000 for a long run
#: (the variable of tests/test_fuzz.py and scripts/fuzz.py).
FUZZ_EXAMPLES = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "200"))


def fuzz_settings() -> settings:
    """The settings of the broker fuzz tests: every example drives real servers, so no
    deadline, no example database in the working tree, and a bounded number of examples."""
    return settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        report_multiple_bugs=False,
    )


class LoopThread:
    """An event loop in a thread of its own, for (synchronous) hypothesis tests that drive
    the asynchronous gateway: :meth:`run` a coroutine there and wait for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop")
        self.stack = contextlib.AsyncExitStack()

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.stack.aclose(), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(t(timeout))

    def enter(self, manager: contextlib.AbstractAsyncContextManager[T]) -> T:
        """Enter ``manager`` on the loop; it is left when this object is."""
        return self.run(self.stack.enter_async_context(manager))

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` (it may read what the loop writes) for ``t(timeout)`` seconds."""
        deadline = time.monotonic() + t(timeout)
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {t(timeout):.1f} s waiting for {what}")
            time.sleep(0.002)


def dropped_by_reason(source: str) -> dict[str, float]:
    """``gateway_input_dropped_total`` of ``source``, by reason."""
    children = list(metrics.input_dropped.children.items())
    return {labels[1]: child.value() for labels, child in children if labels[0] == source}


def dropped_since(before: dict[str, float], source: str) -> dict[str, float]:
    now = dropped_by_reason(source)
    return {r: v - before.get(r, 0.0) for r, v in now.items() if v != before.get(r, 0.0)}


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
)
#: Any JSON value, nested a little.
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
#: Snowflakes as Discord writes them, and everything else: big, negative, non-ASCII digits.
snowflakes = (
    st.integers(0, 2**64 - 1).map(str)
    | st.integers(-(2**70), 2**70)
    | st.text(alphabet="0123456789²³¹٣߃", max_size=24)
    | json_values
)
#: Packets: valid ones (ops the simulator takes, an object d), forbidden and unknown ops, ops of
#: the wrong type, missing keys, not an object. (A valid op with a d that is not an object is
#: sent as it is, and the simulator closes the connection for it, as Discord would: a reconnect
#: per example would only slow the run, and lose the commands written meanwhile.)
_ops = st.sampled_from([3, 4, 43])
_wrong_ops = _scalars.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
packets = st.one_of(
    st.fixed_dictionaries({"op": _ops, "d": json_objects}),
    st.fixed_dictionaries(
        {
            "op": st.sampled_from([1, 2, 6, 0, 5, 7, 9, 10, 11])
            | st.integers(-(2**70), 2**70).filter(lambda op: op not in SENDABLE_OPS),
            "d": json_values,
        }
    ),
    st.fixed_dictionaries({"op": _wrong_ops | st.lists(_scalars, max_size=2), "d": json_values}),
    st.fixed_dictionaries({}, optional={"op": _ops, "x": json_values}),
    st.fixed_dictionaries({"d": json_values}, optional={"x": json_values}),
    json_values.filter(lambda v: not isinstance(v, dict)),
)
#: Commands that are sent (or handed on to shard 1): valid, addressed every way.
valid_commands = st.fixed_dictionaries(
    {"packet": st.fixed_dictionaries({"op": st.sampled_from([3, 4]), "d": json_objects})},
    optional={
        "guild_id": st.integers(0, 2**64 - 1).map(str) | st.integers(0, 2**64 - 1),
        "shard_id": st.sampled_from([0, 1]),
    },
)
#: SEND commands: packet, guild_id, shard_id, in every shape.
send_commands = st.fixed_dictionaries(
    {"packet": packets},
    optional={
        "guild_id": snowflakes,
        "shard_id": st.integers(-2, 3) | json_values,
        "extra": json_values,
    },
)


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _broken_msgpack(parts: tuple[int, bytes, bytes]) -> bytes:
    header, length, rest = parts
    return bytes((header,)) + length + rest


def _nested(parts: tuple[int, bool]) -> bytes:
    depth, as_object = parts
    if as_object:
        return b'{"packet":' * depth + b"1" + b"}" * depth
    return b"[" * depth + b"]" * depth


def hostile_bodies(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Command bodies: ``documents`` as JSON (plain, in a msgpack string, or spoiled), random
    bytes, broken msgpack headers, deep nesting, and huge ones around the 64 KiB limit."""
    encoded = documents.map(_json)
    return st.one_of(
        encoded,
        encoded.map(msgpack_string),
        st.tuples(encoded, st.binary(min_size=1, max_size=4)).map(lambda p: p[0] + p[1]),
        st.tuples(st.binary(max_size=4), encoded).map(lambda p: msgpack_string(p[0] + p[1])),
        st.binary(max_size=300),
        st.tuples(
            st.sampled_from([0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6, 0xA5, 0xBF]),
            st.binary(max_size=4),
            st.binary(max_size=40),
        ).map(_broken_msgpack),
        st.tuples(st.integers(50, 50_000), st.booleans()).map(_nested),
        st.integers(1, 300_000).map(lambda n: b'"' + b"x" * n + b'"'),
        st.integers(4_000, 70_000).map(
            lambda n: _json({"shard_id": 0, "packet": {"op": 3, "d": {"x": "y" * n}}})
        ),
    )


#: Bodies for ``SEND`` and for a per-shard queue or stream (bare packets).
send_bodies = hostile_bodies(send_commands | valid_commands | json_values)
packet_bodies = hostile_bodies(packets)


class FuzzHarness:
    """Simulator (2 shards) -> a worker running shard 0 -> ``broker``, on a loop thread; the
    test feeds one record per example from its own thread (:meth:`feed`) and calls
    :meth:`check` at the end. A subclass writes the record (:meth:`_write`) and tells how many
    records were acknowledged (:meth:`acked`) and handed on to shard 1 (:meth:`forwarded`)."""

    what = "records"

    def __init__(self, loop: LoopThread, broker: Broker) -> None:
        self.loop = loop
        self.broker = broker
        self.sim: Simulator = loop.enter(
            simulator(shard_count=2, max_concurrency=2, send_limit=(10**6, 60.0))
        )
        self.worker, _ = loop.enter(
            running_worker(self.sim, (0,), broker=broker, send_limit=10**6, send_period=60.0)
        )
        loop.wait(self.ready, 10, "shard 0 ready and the broker connected")
        self.before = dropped_by_reason(broker.name)
        self.fed = 0

    def ready(self) -> bool:
        runner = self.worker.runners.get(0)
        return runner is not None and bool(runner.ready) and self.broker.connected

    def _write(self, target: str, record: Any) -> None:
        raise NotImplementedError

    def acked(self) -> int:
        raise NotImplementedError

    def forwarded(self) -> int:
        raise NotImplementedError

    def feed(self, target: str, record: Any) -> None:
        """Write ``record`` to ``target`` and wait until it was acknowledged."""
        self._write(target, record)
        self.fed += 1
        fed = self.fed
        self.loop.wait(lambda: self.acked() >= fed, 10, f"the ack of {record!r:.80}")

    def dropped(self) -> dict[str, float]:
        return dropped_since(self.before, self.broker.name)

    def outcomes(self) -> tuple[float, int, int]:
        """Dropped and counted, written to the shard's websocket, handed on to shard 1."""
        return sum(self.dropped().values()), len(self.sim.ledger.commands), self.forwarded()

    def check(self) -> None:
        """Every record had exactly one outcome and was acknowledged once; nothing broke."""
        with contextlib.suppress(AssertionError):
            self.loop.wait(lambda: sum(self.outcomes()) >= self.fed, 10, "every outcome")
        dropped, sent, forwarded = self.outcomes()
        assert dropped + sent + forwarded == self.fed, (dropped, sent, forwarded, self.fed)
        assert self.acked() == self.fed
        assert self.ready()
        assert self.sim.ledger.violations == []
        assert self.dropped().get("internal_error", 0) == 0
        print(
            f"{self.broker.name} fuzz: {self.fed} {self.what}: {dropped:.0f} dropped "
            f"{dict(sorted(self.dropped().items()))}, {sent} sent, {forwarded} handed on"
        )


#: Found by reading and kept as explicit examples: non-ASCII digits that pass str.isdigit()
#: (issue 10), deep nesting (a RecursionError in the decoder).
KNOWN_BODIES = [
    ("SEND", '{"guild_id":"²³","packet":{"op":3,"d":{}}}'.encode()),
    ("SEND", b"[" * 10_000 + b"]" * 10_000),
    ("0", b'{"op":3,"d":' * 5_000 + b"1" + b"}" * 5_000),
]


def run_fuzz(
    harness: FuzzHarness, records: st.SearchStrategy[tuple[str, Any]], known: list[Any]
) -> None:
    """Feed ``records`` (and the ``known`` ones first) to ``harness``; then check it."""

    @fuzz_settings()
    @given(records)
    def feed(item: tuple[str, Any]) -> None:
        harness.feed(*item)

    for item in known:
        feed = example(item)(feed)
    feed()
    harness.check()
    assert harness.fed >= len(known) + FUZZ_EXAMPLES // 2  # hypothesis did run


# ------------------------------------------------------------------------------ poison


GOOD_SEND = json.dumps({"shard_id": 0, "packet": {"op": 3, "d": PRESENCE}}).encode()
#: A body that triggers a bug of ours (:func:`inject_poison`).
POISON = json.dumps({"shard_id": 0, "packet": {"op": 3, "d": {"poison": True}}}).encode()


def inject_poison(broker: Broker, monkeypatch: Any) -> None:
    """A bug of ours that one body triggers while the broker takes it (the seam: handing the
    command over); every other body goes through."""
    take: Callable[..., None] = broker._command

    def command(body: bytes, ack: Callable[[], None], shard_id: int | None = None) -> None:
        if POISON in body:
            raise RuntimeError("a bug that this body triggers")
        take(body, ack, shard_id)

    monkeypatch.setattr(broker, "_command", command)
