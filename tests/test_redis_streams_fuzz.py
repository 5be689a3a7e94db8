"""Hostile Redis stream entries into a running worker (issue 10), with hypothesis.

Each example adds one entry, to ``<prefix>SEND`` or to the stream of the worker's shard, with
random fields: a ``data`` field holding random bytes, broken msgpack, JSON nested 50,000 deep,
300 KB, every key of a command with every wrong type, or no ``data`` at all, beside random other
fields. Nothing raises out of the broker's and the worker's boundaries: the reader stays up and
``connected``, every entry is acknowledged exactly once (the ids handed to ``XACK`` are counted,
and Redis' replies say each was pending), and each entry has exactly one outcome: dropped and
counted in ``gateway_input_dropped_total{source="redis"}``, written to the shard's websocket
(the simulator's ledger), or handed on to the stream of shard 1.

``HYPOTHESIS_MAX_EXAMPLES`` examples per property (200 by default).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import strategies as st

from .support.brokers import (
    KNOWN_BODIES,
    FuzzHarness,
    LoopThread,
    packet_bodies,
    redis_streams_broker,
    run_fuzz,
    send_bodies,
)
from .support.redis import cleanup, settings_for, unique_prefix

KNOWN = [
    *[("SEND" if key == "SEND" else "SEND:0", {b"data": body}) for key, body in KNOWN_BODIES],
    ("SEND", {b"not-data": b"x"}),
]


def fields(bodies: st.SearchStrategy[bytes]) -> st.SearchStrategy[dict[bytes, bytes]]:
    """A ``data`` field beside random others, or random fields only."""
    others = st.dictionaries(st.binary(max_size=8), st.binary(max_size=32), max_size=3)
    return st.one_of(
        bodies.map(lambda body: {b"data": body}),
        st.tuples(bodies, others).map(lambda p: {**p[1], b"data": p[0]}),
        st.dictionaries(st.binary(max_size=8), st.binary(max_size=32), min_size=1, max_size=4),
    )


class Harness(FuzzHarness):
    """Entries added to ``<prefix>SEND`` or ``<prefix>SEND:0`` from the test's thread."""

    what = "entries"

    def __init__(self, loop: LoopThread, prefix: str) -> None:
        broker = redis_streams_broker(prefix, shard_ids=(0,))
        self.reader = reader = broker.commands
        self.xacked: Counter[tuple[str, bytes]] = Counter()
        flush_acks = reader.flush_acks

        async def counted() -> bool:  # a spy: every id handed to XACK
            for stream, ids in reader._acks.items():
                self.xacked.update((stream, i) for i in ids)
            return await flush_acks()

        reader.flush_acks = counted  # type: ignore[method-assign]
        super().__init__(loop, broker)
        self.prefix = prefix
        self.client = redis.Redis.from_url(settings_for(prefix).redis.dsn)

    def _write(self, target: str, record: Any) -> None:
        self.client.xadd(self.prefix + target, record)

    def acked(self) -> int:
        return self.reader.acked  # what Redis says it acknowledged

    def forwarded(self) -> int:
        return int(self.client.xlen(f"{self.prefix}SEND:1"))  # type: ignore[arg-type]

    def check(self) -> None:
        super().check()
        assert sum(self.xacked.values()) == self.fed and set(self.xacked.values()) == {1}
        for stream in ("SEND", "SEND:0"):
            pending: Any = self.client.xpending(self.prefix + stream, "gateway")
            assert pending["pending"] == 0
        assert self.reader.restarts == 0


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
    caplog.set_level(logging.WARNING)
    entries = st.one_of(
        st.tuples(st.just("SEND"), fields(send_bodies)),
        st.tuples(st.just("SEND:0"), fields(packet_bodies)),
    )
    run_fuzz(harness, entries, KNOWN)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
