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
    reports, packets, now = make()
    for shard in range(MANY_SERIES + 1):
        packets.labels(shard).inc()
    assert len(reports.status().metrics) == MANY_SERIES + 1  # the first report: everything
    for second in range(1, int(METRICS_EVERY)):
        now[0] += 1.0
        for shard in range(MANY_SERIES + 1):
            packets.labels(shard).inc()
        assert reports.status().metrics == [], second  # held back: too many at once
    now[0] += 1.0
    sent = reports.status().metrics
    assert len(sent) == MANY_SERIES + 1
    assert {value for _, _, value in sent} == {METRICS_EVERY}  # every count, none lost


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
        confirmed.append(round_._record_counts(7, core.take_counts(), 0.05))
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
