"""Metrics without shared files: per-process registries, the supervisor's sum, the text format."""

from __future__ import annotations

import re
import tracemalloc

import pytest

from spectacles_gateway import metrics
from spectacles_gateway.telemetry import Aggregator, Counter, Gauge, Histogram, Registry, render


def families() -> tuple[Registry, Counter, Gauge, Gauge, Histogram]:
    r = Registry()
    c = Counter("x_events", "Events.", ["kind"], registry=r)
    g = Gauge("x_alive", "Alive.", ["id"], registry=r, mode="max")
    low = Gauge("x_connected", "Connected.", registry=r, mode="min")
    h = Histogram("x_ping", "Ping.", ["id"], registry=r, buckets=(10, 100))
    return r, c, g, low, h


def test_changes_are_reported_once_as_absolute_values() -> None:
    r, c, g, _, h = families()
    c.labels("a").inc()
    c.labels("a").inc(2)
    g.labels("0").set(1)
    h.labels("0").observe(5)
    h.labels("0").observe(50)
    changes = {(name, labels): value for name, labels, value in r.changes()}
    assert changes == {
        ("x_events", ("a",)): 3.0,
        ("x_alive", ("0",)): 1.0,
        ("x_ping", ("0",)): [1, 1, 0, 55.0, 2],
    }
    assert r.changes() == []  # nothing changed since
    g.labels("0").set(1)  # the same value is no change
    assert r.changes() == []


def test_the_supervisor_sums_workers_and_keeps_what_dead_ones_counted() -> None:
    r, c, g, low, h = families()
    agg = Aggregator(r.families)
    agg.update(0, [("x_events", ("a",), 5.0), ("x_alive", ("0",), 1.0), ("x_connected", (), 1.0)])
    agg.update(1, [("x_events", ("a",), 7.0), ("x_alive", ("1",), 1.0), ("x_connected", (), 0.0)])
    agg.update(1, [("x_ping", ("1",), [1, 0, 0, 3.0, 1])])
    values = agg.combined()
    assert values[("x_events", ("a",))] == 12.0
    assert values[("x_connected", ())] == 0.0  # min over workers
    agg.retire(1)  # worker 1 died: its counter stays, its gauges go
    agg.update(1, [("x_events", ("a",), 1.0)])  # the new process counts from zero
    values = agg.combined()
    assert values[("x_events", ("a",))] == 13.0  # never goes backwards
    assert ("x_alive", ("1",)) not in values
    assert values[("x_ping", ("1",))] == [1, 0, 0, 3.0, 1]
    assert agg.update(0, [("nope", (), 1.0)]) == 1  # unknown families are counted, not kept


def test_a_removed_series_is_removed_at_the_supervisor_too() -> None:
    r, _, g, _, _ = families()
    agg = Aggregator(r.families)
    g.labels("7").set(1)
    agg.update(0, r.changes())
    assert agg.combined()[("x_alive", ("7",))] == 1.0
    g.remove("7")  # the shard moved to another worker or host
    agg.update(0, r.changes())
    assert ("x_alive", ("7",)) not in agg.combined()


def test_the_text_format() -> None:
    r, c, g, low, h = families()
    c.labels('we"ird\n').inc()
    low.set(1)
    h.labels("0").observe(50)
    h.labels("0").observe(500)
    text = render(r.families, Aggregator(r.families).combined(r)).decode()
    assert "# TYPE x_events counter\n" in text
    assert 'x_events_total{kind="we\\"ird\\n"} 1.0\n' in text
    assert "x_connected 1.0\n" in text
    assert 'x_ping_bucket{id="0",le="10.0"} 0.0\n' in text
    assert 'x_ping_bucket{id="0",le="100.0"} 1.0\n' in text
    assert 'x_ping_bucket{id="0",le="+Inf"} 2.0\n' in text
    assert 'x_ping_count{id="0"} 2.0\n' in text and 'x_ping_sum{id="0"} 550.0\n' in text
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? [-+0-9.eInfNa]+$')
    for line in text.splitlines():
        assert line.startswith("#") or sample.match(line), line


def test_sample_values_for_tests() -> None:
    r, c, _, _, h = families()
    c.labels("a").inc(4)
    h.labels("0").observe(3)
    assert r.get_sample_value("x_events_total", {"kind": "a"}) == 4.0
    assert r.get_sample_value("x_ping_count", {"id": "0"}) == 1.0
    assert r.get_sample_value("x_ping_sum", {"id": "0"}) == 3.0
    assert r.get_sample_value("x_events_total", {"kind": "b"}) is None


def test_the_gateway_defines_each_family_once_with_its_seed_names() -> None:
    names = set(metrics.REGISTRY.families)
    for seed in ("gateway_packets_received", "gateway_packets_sent", "gateway_shards_alive"):
        assert seed in names
    with pytest.raises(ValueError, match="twice"):
        Counter("gateway_resumes", "again", registry=metrics.REGISTRY)


def test_a_scrape_renders_every_source_and_forgets_the_text_of_series_gone() -> None:
    r, c, g, low, h = families()
    agg = Aggregator(r.families)
    c.labels("mine").inc()  # the supervisor's own registry is part of the scrape
    agg.update(0, [("x_alive", (str(i),), 1.0) for i in range(3000)])
    agg.update(1, [("x_events", ("a",), 2.0), ("x_ping", ("0",), [1, 0, 1, 7.0, 2])])
    text = agg.render(r)
    assert text == render(r.families, agg.combined(r))
    assert agg.render(r) == text  # the second scrape, from the cached series names
    assert 'x_alive{id="2999"} 1.0\n' in text.decode()
    assert 'x_ping_bucket{id="0",le="+Inf"} 2.0\n' in text.decode()
    assert len(agg.prefixes["x_alive"]) == 3000
    agg.update(0, [("x_alive", (str(i),), None) for i in range(1, 3000)])
    text = agg.render(r)
    assert text == render(r.families, agg.combined(r))
    assert "x_alive{" in text.decode() and 'id="2999"' not in text.decode()
    assert len(agg.prefixes["x_alive"]) == 1  # the names of 2,999 series gone are not kept


def test_what_dead_sources_counted_adds_up_over_several_deaths() -> None:
    r, _, _, _, _ = families()
    agg = Aggregator(r.families)
    agg.update(0, [("x_events", ("a",), 5.0), ("x_ping", ("0",), [1, 0, 0, 3.0, 1])])
    agg.retire(0)
    agg.update(0, [("x_events", ("a",), 2.0), ("x_events", ("b",), 1.0)])
    agg.update(0, [("x_ping", ("0",), [0, 1, 0, 20.0, 1])])
    agg.retire(0)
    agg.update(0, [("x_events", ("a",), 1.0)])  # the third process, alive
    values = agg.combined()
    assert values[("x_events", ("a",))] == 8.0
    assert values[("x_events", ("b",))] == 1.0
    assert values[("x_ping", ("0",))] == [1, 1, 0, 23.0, 2]
    agg.forget("x_events", lambda labels: labels != ("b",))
    values = agg.combined()
    assert ("x_events", ("b",)) not in values
    assert values[("x_events", ("a",))] == 8.0


def test_a_series_at_the_supervisor_costs_its_labels_its_value_and_a_slot() -> None:
    """Series are kept by family, then label values: no (name, labels) tuple per series (512
    busy shards report about 6,000 series; that tuple was 56 bytes of each)."""
    r = Registry()
    Counter("x_packets", "Packets.", ["t", "op", "shard"], registry=r)
    agg = Aggregator(r.families)
    samples = [("x_packets", (f"EVENT_{i % 8}", "0", str(i // 8)), float(i)) for i in range(4000)]
    agg.update(0, samples[:1])
    tracemalloc.start()
    try:
        agg.update(0, samples)
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # A 3-tuple (64 bytes) and a dict slot: about 101 bytes a series (128 with the pair).
    assert used / len(samples) < 115
    assert agg.combined()[("x_packets", ("EVENT_7", "0", "499"))] == 3999.0
