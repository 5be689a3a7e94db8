"""A worker's once-a-second report (issue 14): the metric series that changed go in every
report while they are few; hundreds of busy shards' series at most every METRICS_EVERY seconds,
and the final report carries whatever is left."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from spectacles_gateway.telemetry import Counter, Registry
from spectacles_gateway.workerproc import MANY_SERIES, METRICS_EVERY, Reports, metrics_due

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


def shard_stats(count: int, sent: int) -> Any:
    """A real core's snapshot, with these packet counts."""
    received = {("MESSAGE_CREATE", 0): count, ("", 11): sent}
    return replace(make_core().stats(), packets_received=received, packets_sent={1: sent})


def test_packet_counters_move_by_each_rounds_difference() -> None:
    """The once-a-second round adds what each shard counted since the last round, through
    counters it looks up once (this label is this test's alone)."""
    from spectacles_gateway import metrics
    from spectacles_gateway.observation import Observation

    round_ = Observation()
    round_.counter_label = "test-reports"
    round_._received_series = {}
    round_._sent_series = {}
    old = None
    for count, sent in ((3, 1), (10, 1), (10, 2), (25, 4)):
        new = shard_stats(count, sent)
        round_._record_stats(7, new, old)
        old = new
    label = "test-reports"
    assert metrics.packets_received.labels("MESSAGE_CREATE", "0", label).value() == 25
    assert metrics.packets_received.labels("", "11", label).value() == 4
    assert metrics.packets_sent.labels("", "1", label).value() == 4
    assert set(round_._received_series) == {(label, "MESSAGE_CREATE", 0), (label, "", 11)}
