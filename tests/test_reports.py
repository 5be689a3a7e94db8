"""A worker's once-a-second report (issue 14): the metric series that changed go in every
report while they are few; hundreds of busy shards' series at most every METRICS_EVERY seconds,
and the final report carries whatever is left."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from spectacles_gateway.telemetry import Counter, Registry
from spectacles_gateway.workerproc import MANY_SERIES, METRICS_EVERY, Reports, metrics_due

from .support.shard import connected_ready, dispatch, j
from .support.shard import make as make_core


def test_few_series_go_every_time_many_at_most_every_few_seconds() -> None:
    assert metrics_due(1, 0.0)
    assert metrics_due(MANY_SERIES, 0.0)
    assert not metrics_due(MANY_SERIES + 1, 1.0)
    assert metrics_due(MANY_SERIES + 1, METRICS_EVERY)


def make() -> tuple[Reports, Counter, list[float]]:
    registry = Registry()
    packets = Counter("packets", "per shard", ["shard"], registry=registry)
    worker: Any = SimpleNamespace(
        status_changes=lambda: ({}, {}), broker=SimpleNamespace(connected=True)
    )
    now = [100.0]
    return Reports(worker, clock=lambda: now[0], registry=registry), packets, now


def test_many_changed_series_wait_and_nothing_is_lost() -> None:
    """Over MANY_SERIES changed series go at most every METRICS_EVERY seconds, MANY_SERIES a
    report (no report is thousands of series), and every count arrives."""
    reports, packets, now = make()
    shards = range(2 * MANY_SERIES + 1)
    for shard in shards:
        packets.labels(shard).inc()
    sent: dict[tuple[str, ...], float] = {}

    def second() -> int:
        now[0] += 1.0
        metrics = reports.status().metrics
        assert len(metrics) <= MANY_SERIES
        sent.update((labels, value) for _, labels, value in metrics)
        return len(metrics)

    now[0] -= 1.0
    assert [second(), second(), second()] == [MANY_SERIES, MANY_SERIES, 1]  # the first: all
    assert set(sent.values()) == {1.0}
    for shard in shards:
        packets.labels(shard).inc()
    for _ in range(int(METRICS_EVERY) - 3):
        assert second() == 0  # held back: too many at once
        for shard in shards:
            packets.labels(shard).inc()
    assert [second(), second(), second(), second()] == [MANY_SERIES, MANY_SERIES, 1, 0]
    assert len(sent) == len(shards)
    assert set(sent.values()) == {METRICS_EVERY - 1}  # every count, none lost


def test_few_series_go_at_once_and_the_final_report_takes_the_rest() -> None:
    reports, packets, now = make()
    packets.labels(0).inc()
    assert [labels for _, labels, _ in reports.status().metrics] == [("0",)]
    now[0] += 1.0
    packets.labels(1).inc()
    assert [labels for _, labels, _ in reports.status().metrics] == [("1",)]
    for shard in range(MANY_SERIES + 1):
        packets.labels(shard).inc()
    now[0] += 1.0
    assert reports.status().metrics == []
    assert len(reports.status(final=True).metrics) == MANY_SERIES + 1


def test_packet_counters_add_what_each_round_took() -> None:
    """The once-a-second round adds what a real core counted since the last round, through
    counters it looks up once (this label is this test's alone)."""
    from spectacles_gateway import metrics
    from spectacles_gateway.observation import Observation

    round_ = Observation()
    round_.counter_label = "test-reports"
    round_._received_series = {}
    round_._sent_series = {}
    core = make_core()
    connected_ready(core)  # HELLO, READY, and an IDENTIFY sent
    seq = 1
    confirmed = []
    for dispatches, acks in ((2, 0), (7, 1), (0, 1), (15, 2)):
        for _ in range(dispatches):
            seq += 1
            core.receive(dispatch(seq), 1.0)
        for _ in range(acks):
            core.receive(j({"op": 11}), 1.0)
        core.confirm(seq, "sess-1")
        confirmed.append(round_._record_counts(7, core.take_counts()))
    label = "test-reports"
    assert metrics.packets_received.labels("MESSAGE_CREATE", "0", label).value() == 24
    assert metrics.packets_received.labels("", "11", label).value() == 4
    assert metrics.packets_received.labels("READY", "0", label).value() == 1
    assert metrics.packets_sent.labels("", "2", label).value() == 1
    assert confirmed == [2, 7, 0, 15]
    assert set(round_._received_series) == {
        (label, "", 10),
        (label, "READY", 0),
        (label, "MESSAGE_CREATE", 0),
        (label, "", 11),
    }


def test_many_busy_shards_counts_wait_in_their_cores_and_none_is_lost() -> None:
    """Over FEW_BUSY busy shards, the round notes every status each second but moves the
    counts into the counters at most every COUNTS_EVERY seconds (or at the end)."""
    from spectacles_gateway import metrics
    from spectacles_gateway.observation import COUNTS_EVERY, FEW_BUSY, Observation

    label = "test-reports-many"
    round_ = Observation()
    round_.counter_label = label
    round_._received_series = {}
    round_._sent_series = {}
    round_._published = {}
    round_._latencies = []
    round_._status_changes = {}
    round_._uncounted = set()
    round_._counted_at = float("-inf")
    now = [0.0]
    round_._clock = lambda: now[0]
    round_.broker = SimpleNamespace(name="stdio")  # type: ignore[assignment]
    cores = {
        shard: make_core(shard_id=shard, shard_count=FEW_BUSY + 1) for shard in range(FEW_BUSY + 1)
    }
    for core in cores.values():
        connected_ready(core)
    runners: Any = {
        s: SimpleNamespace(stats=c.stats, take_counts=c.take_counts, session=c.session)
        for s, c in cores.items()
    }
    round_.runners = runners
    series = metrics.packets_received.labels("MESSAGE_CREATE", "0", label)

    def second(seq: int, shards: range) -> None:
        for shard in shards:
            cores[shard].receive(dispatch(seq), now[0])
        round_._changed = set(shards)
        round_.observe()
        status = round_.status_changes()[0]
        assert set(status) == set(shards) and {s.seq for s in status.values()} == {seq}

    second(2, range(FEW_BUSY + 1))  # the first round counts
    assert series.value() == FEW_BUSY + 1
    for seq in range(3, 3 + int(COUNTS_EVERY) - 1):
        now[0] += 1.0
        second(seq, range(FEW_BUSY + 1))
        assert series.value() == FEW_BUSY + 1  # waiting in the cores
    now[0] += 1.0
    second(20, range(5))  # few busy now, but the shards still to count are many: it is time
    assert series.value() == (FEW_BUSY + 1) * int(COUNTS_EVERY) + 5
    now[0] += 1.0
    second(21, range(FEW_BUSY))  # few: counted at once
    assert series.value() == (FEW_BUSY + 1) * int(COUNTS_EVERY) + 5 + FEW_BUSY
    now[0] += 1.0
    second(22, range(FEW_BUSY + 1))
    now[0] += 1.0
    round_._changed = set()
    round_.observe(final=True)  # the end: everything
    assert series.value() == (FEW_BUSY + 1) * (int(COUNTS_EVERY) + 1) + 5 + FEW_BUSY
