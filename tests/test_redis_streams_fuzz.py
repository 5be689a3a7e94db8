"""Hostile Redis stream entries into a running worker (issue 10), with hypothesis.

Each example adds one entry, to ``<prefix>SEND`` or to the stream of the worker's shard, with
random fields: a ``data`` field holding random bytes, broken msgpack, JSON nested 50,000 deep,
300 KB, every key of a command with every wrong type, or no ``data`` at all, beside random other
fields. Nothing raises out of the broker's and the worker's boundaries: the reader stays up and
``connected``, every entry is acknowledged exactly once (the ids handed to ``XACK`` are counted,
and Redis' replies say each was pending), and each entry has exactly one outcome: dropped and
counted in ``gateway_input_dropped_total{source="redis"}``, written to the shard's websocket
(the simulator's ledger), or handed on to the stream of shard 1.

``FUZZ_EXAMPLES`` examples per property (200 by default).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import example, given
from hypothesis import strategies as st

from spectacles_gateway.simulator import Simulator

from .gwtest import running_worker, simulator
from .support.brokers import (
    FUZZ_EXAMPLES,
    LoopThread,
    dropped_by_reason,
    dropped_since,
    fuzz_settings,
    packet_bodies,
    redis_streams_broker,
    send_bodies,
)
from .test_redis_store import cleanup, settings_for, unique_prefix

KNOWN: list[tuple[str, dict[bytes, bytes]]] = [
    ("SEND", {b"data": '{"guild_id":"²³","packet":{"op":3,"d":{}}}'.encode()}),
    ("SEND", {b"data": b"[" * 10_000 + b"]" * 10_000}),
    ("SEND", {b"not-data": b"x"}),
    ("SEND:0", {b"data": b'{"op":3,"d":' * 5_000 + b"1" + b"}" * 5_000}),
]


def fields(bodies: st.SearchStrategy[bytes]) -> st.SearchStrategy[dict[bytes, bytes]]:
    """A ``data`` field beside random others, or random fields only."""
    others = st.dictionaries(st.binary(max_size=8), st.binary(max_size=32), max_size=3)
    return st.one_of(
        bodies.map(lambda body: {b"data": body}),
        st.tuples(bodies, others).map(lambda p: {**p[1], b"data": p[0]}),
        st.dictionaries(st.binary(max_size=8), st.binary(max_size=32), min_size=1, max_size=4),
    )


class Harness:
    """Simulator (2 shards) -> worker running shard 0 -> streams broker -> Redis, on a loop
    thread; entries added from this thread."""

    def __init__(self, loop: LoopThread, prefix: str) -> None:
        self.loop = loop
        self.prefix = prefix
        self.sim: Simulator = loop.enter(
            simulator(shard_count=2, max_concurrency=2, send_limit=(10**6, 60.0))
        )
        self.broker = redis_streams_broker(prefix, shard_ids=(0,))
        reader = self.broker.commands
        self.xacked: Counter[tuple[str, bytes]] = Counter()
        flush_acks = reader.flush_acks

        async def counted() -> bool:  # a spy: every id handed to XACK
            for stream, ids in reader._acks.items():
                self.xacked.update((stream, i) for i in ids)
            return await flush_acks()

        reader.flush_acks = counted  # type: ignore[method-assign]
        self.worker, _ = loop.enter(
            running_worker(self.sim, (0,), broker=self.broker, send_limit=10**6, send_period=60.0)
        )
        loop.wait(self._ready, 10, "shard 0 ready and the broker connected")
        self.before = dropped_by_reason("redis")
        self.fed = 0
        self.client = redis.Redis.from_url(settings_for(prefix).redis.dsn)

    def _ready(self) -> bool:
        runner = self.worker.runners.get(0)
        return runner is not None and bool(runner.ready) and self.broker.connected

    def feed(self, stream: str, entry: dict[bytes, bytes]) -> None:
        self.client.xadd(self.prefix + stream, entry)  # type: ignore[arg-type]
        self.fed += 1
        fed = self.fed
        self.loop.wait(lambda: self.broker.commands.acked >= fed, 10, f"the XACK of {entry!r:.80}")

    def outcomes(self) -> tuple[float, int, int]:
        dropped = sum(dropped_since(self.before, "redis").values())
        forwarded = int(self.client.xlen(f"{self.prefix}SEND:1"))  # type: ignore[arg-type]
        return dropped, len(self.sim.ledger.commands), forwarded

    def check(self) -> None:
        """Every entry had exactly one outcome and one XACK; nothing broke."""
        with contextlib.suppress(AssertionError):
            self.loop.wait(lambda: sum(self.outcomes()) >= self.fed, 10, "every outcome")
        dropped, sent, forwarded = self.outcomes()
        assert dropped + sent + forwarded == self.fed, (dropped, sent, forwarded, self.fed)
        assert self.broker.commands.acked == self.fed
        assert sum(self.xacked.values()) == self.fed and set(self.xacked.values()) == {1}
        for stream in ("SEND", "SEND:0"):
            pending: Any = self.client.xpending(self.prefix + stream, "gateway")
            assert pending["pending"] == 0
        assert self.broker.connected and self.broker.commands.restarts == 0
        assert self._ready()
        assert self.sim.ledger.violations == []
        assert dropped_since(self.before, "redis").get("internal_error", 0) == 0
        print(
            f"redis fuzz: {self.fed} entries: {dropped:.0f} dropped "
            f"{dict(sorted(dropped_since(self.before, 'redis').items()))}, {sent} sent, "
            f"{forwarded} handed on"
        )


@pytest.fixture
def harness() -> Iterator[Harness]:
    with cleanup(unique_prefix("fuzz")) as prefix, LoopThread() as loop:
        h = Harness(loop, prefix)
        try:
            yield h
        finally:
            h.client.close()


def test_hostile_entries_are_each_acknowledged_once_and_dropped_or_sent(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    entries = st.one_of(
        st.tuples(st.just("SEND"), fields(send_bodies)),
        st.tuples(st.just("SEND:0"), fields(packet_bodies)),
    )

    @fuzz_settings()
    @given(entries)
    def feed(item: tuple[str, dict[bytes, bytes]]) -> None:
        harness.feed(*item)

    for item in KNOWN:
        feed = example(item)(feed)
    caplog.set_level(logging.WARNING)
    feed()
    harness.check()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert harness.fed >= len(KNOWN) + FUZZ_EXAMPLES // 2  # hypothesis did run
