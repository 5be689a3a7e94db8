"""A worker's once-a-second report (issue 14): the metric series that changed go in every
report while they are few; hundreds of busy shards' series at most every METRICS_EVERY seconds,
and the final report carries whatever is left."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from spectacles_gateway.telemetry import Counter, Registry
from spectacles_gateway.workerproc import MANY_SERIES, METRICS_EVERY, Reports, metrics_due


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
