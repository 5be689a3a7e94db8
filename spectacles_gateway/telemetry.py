"""Metrics without shared files: each process keeps its own values, the supervisor adds them up.

A worker's :class:`Registry` holds counters, gauges and histograms (the ``prometheus_client``
API: ``metric.labels(...).inc()``, ``.set()``, ``.observe()``), and every second hands the series
that changed since the last time (:meth:`Registry.changes`) to the supervisor over the control
channel, as absolute values: a lost report costs nothing, the next one carries the same totals.
The supervisor's :class:`Aggregator` keeps the last values of every live worker, folds the
counters and histograms of a worker that died into a retired total (so restarts never make a
counter go backwards), and renders the Prometheus text format on each scrape.

Why not ``prometheus_client``'s multiprocess mode: its import alone costs the supervisor about
12 MiB of RSS and a worker as much, and its per-process files outlive crashed workers and are
parsed again on every scrape. The control channel already carries a status report every second.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from sys import intern
from typing import Any

__all__ = ["Aggregator", "Counter", "Gauge", "Histogram", "Registry", "render", "render_tables"]

Labels = tuple[str, ...]
#: One changed series: (family name, label values, value); a histogram's value is its
#: non-cumulative bucket counts followed by the sum and the count.
Sample = tuple[str, Labels, Any]


class Registry:
    """The metric families of one process."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        self.dirty: set[Child] = set()
        self.removed: set[tuple[str, Labels]] = set()

    def add(self, family: Family) -> None:
        if family.name in self.families:
            raise ValueError(f"metric {family.name} is defined twice")
        self.families[family.name] = family

    def changes(self, limit: int | None = None) -> list[Sample]:
        """The series that changed since the last call, with their current values; a series
        that was removed comes with the value None. With ``limit``, at most that many changed
        series (every removed one): the others stay for the next call."""
        dirty = self.dirty
        removed = self.removed
        if not dirty and not removed:
            return []
        out: list[Sample] = [(name, labels, None) for name, labels in removed]
        removed.clear()
        if limit is None or len(dirty) <= limit:
            out += [(child.family.name, child.labels, child.value()) for child in dirty]
            dirty.clear()
        else:
            for _ in range(limit):
                child = dirty.pop()
                out.append((child.family.name, child.labels, child.value()))
        return out

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of one sample as the text format names it (``x_total`` for a counter,
        ``x_sum``/``x_count`` for a histogram), or None: ``prometheus_client``'s test helper."""
        for suffix, base in (("_total", name[:-6]), ("_sum", name[:-4]), ("_count", name[:-6])):
            family = self.families.get(base) if name.endswith(suffix) else None
            if family is not None:
                break
        else:
            family, suffix = self.families.get(name), ""
        if family is None:
            return None
        wanted = labels or {}
        key = tuple(wanted.get(n, "") for n in family.labelnames)
        if set(wanted) != set(family.labelnames):
            return None
        child = family.children.get(key)
        if child is None:
            return None
        value = child.value()
        if family.kind == "histogram":
            return float(value[-2] if suffix == "_sum" else value[-1])
        return float(value)

    def everything(self) -> list[Sample]:
        """Every series with its current value."""
        self.dirty.clear()
        return [
            (family.name, child.labels, child.value())
            for family in self.families.values()
            for child in family.children.values()
        ]


class Child:
    __slots__ = ("family", "labels")

    def __init__(self, family: Family, labels: Labels) -> None:
        self.family = family
        self.labels = labels

    def value(self) -> Any:
        raise NotImplementedError


class _Scalar(Child):
    __slots__ = ("_v",)

    def __init__(self, family: Family, labels: Labels) -> None:
        super().__init__(family, labels)
        self._v = 0.0

    def value(self) -> float:
        return self._v

    def inc(self, amount: float = 1.0) -> None:
        self._v += amount
        self.family.registry.dirty.add(self)


class CounterChild(_Scalar):
    __slots__ = ()


class GaugeChild(_Scalar):
    __slots__ = ()

    def set(self, value: float) -> None:
        if value != self._v:
            self._v = float(value)
            self.family.registry.dirty.add(self)

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)


class HistogramChild(Child):
    __slots__ = ("_buckets", "_counts", "_sum")

    def __init__(self, family: Family, labels: Labels) -> None:
        super().__init__(family, labels)
        self._buckets = family.buckets
        self._counts = [0] * (len(family.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._buckets, value)] += 1
        self._sum += value
        self.family.registry.dirty.add(self)

    def value(self) -> list[float]:
        return [*self._counts, self._sum, sum(self._counts)]


class Family:
    kind = ""
    child_class: type[Child] = Child

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: Registry,
        mode: str = "sum",
        buckets: Sequence[float] = (),
        cumulative: bool | None = None,
    ) -> None:
        if mode not in ("sum", "max", "min"):
            raise ValueError(f"unknown aggregation mode {mode!r}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.registry = registry
        self.mode = mode  # how the values of several processes combine (gauges)
        #: Kept (added up) when its process dies: counters, histograms, and gauges that count.
        self.cumulative = self.kind != "gauge" if cumulative is None else cumulative
        self.buckets = tuple(sorted(buckets))
        self.children: dict[Labels, Any] = {}
        registry.add(self)

    def labels(self, *values: object) -> Any:
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
            child = self.children[key] = self.child_class(self, key)
        return child

    def remove(self, *values: object) -> None:
        """Forget one series (a shard that moved away); the supervisor forgets it too."""
        key = tuple(str(v) for v in values)
        child = self.children.pop(key, None)
        if child is not None:
            self.registry.dirty.discard(child)
            self.registry.removed.add((self.name, key))


class Counter(Family):
    kind = "counter"
    child_class = CounterChild

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


class Gauge(Family):
    kind = "gauge"
    child_class = GaugeChild

    def set(self, value: float) -> None:
        self.labels().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().dec(amount)


class Histogram(Family):
    kind = "histogram"
    child_class = HistogramChild

    def observe(self, value: float) -> None:
        self.labels().observe(value)


# ---------------------------------------------------------------------------- the supervisor


#: One source's series: family name -> label values -> last value. Keyed by family first, so a
#: series costs one dict slot, its label tuple and its value (512 busy shards: ~6,000 series).
Tables = dict[str, dict[Labels, Any]]


class Aggregator:
    """The last values of every source (a worker slot), plus what dead sources left behind."""

    def __init__(self, families: dict[str, Family]) -> None:
        self.families = families
        self._live: dict[object, Tables] = {}
        self._retired: Tables = {}
        #: Formatted series names for :func:`render`, kept from one scrape to the next.
        self.prefixes: Prefixes = {}

    def update(self, source: object, samples: Iterable[Sample]) -> int:
        """Take a source's changed series; returns how many were of unknown families."""
        tables = self._live.get(source)
        if tables is None:
            tables = self._live[source] = {}
        families = self.families
        unknown = 0
        for name, labels, value in samples:
            table = tables.get(name)
            if table is None:
                if name not in families:
                    unknown += 1
                    continue
                table = tables[intern(name)] = {}
            key = tuple(labels)
            if value is None:
                table.pop(key, None)
            elif key in table:
                table[key] = value  # the key kept is the first one
            else:
                # A new series: its strings interned, so that the shard ids, event names of
                # thousands of series (and of every worker) are one object each, not one per
                # series and report.
                table[tuple(map(intern, key))] = value
        return unknown

    def retire(self, source: object) -> None:
        """A source died: keep its counters and histograms, forget its gauges."""
        tables = self._live.pop(source, None)
        if not tables:
            return
        retired = self._retired
        for name, table in tables.items():
            if not table or not self.families[name].cumulative:
                continue
            kept = retired.get(name)
            if kept is None:
                retired[name] = table  # no longer the source's: taken as it is
                continue
            for labels, value in table.items():
                old = kept.get(labels)
                kept[labels] = value if old is None else _add(old, value)

    def forget(self, name: str, keep: Any) -> None:
        """Drop the retired series of family ``name`` whose labels ``keep(labels)`` rejects."""
        table = self._retired.get(name)
        if table:
            for labels in [labels for labels in table if not keep(labels)]:
                del table[labels]

    def merged(self, own: Registry | None = None) -> Tables:
        """Every series of every source (and of ``own``, the supervisor's registry), the
        values of several sources combined by their family's mode."""
        out: Tables = {}
        sources: list[Tables] = [self._retired, *self._live.values()]
        if own is not None:
            mine: Tables = {}
            for name, labels, value in own.everything():
                mine.setdefault(name, {})[labels] = value
            sources.append(mine)
        families = self.families
        for tables in sources:
            for name, table in tables.items():
                if not table:
                    continue
                merged = out.get(name)
                if merged is None:
                    out[name] = dict(table)
                    continue
                family = families[name]
                mode = "sum" if family.kind != "gauge" else family.mode
                for labels, value in table.items():
                    old = merged.get(labels)
                    if old is None:
                        merged[labels] = value
                    elif mode == "sum":
                        merged[labels] = _add(old, value)
                    elif mode == "max":
                        merged[labels] = max(old, value)
                    else:
                        merged[labels] = min(old, value)
        return out

    def combined(self, own: Registry | None = None) -> dict[tuple[str, Labels], Any]:
        """:meth:`merged`, keyed by (family name, label values)."""
        return {
            (name, labels): value
            for name, table in self.merged(own).items()
            for labels, value in table.items()
        }

    def render(self, own: Registry | None = None) -> bytes:
        """The Prometheus text of every series (a scrape), with the cached series names."""
        return render_tables(self.families, self.merged(own), self.prefixes)


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b, strict=True)]
    return a + b


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=False)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


#: Text before the value of each sample line of one series (a histogram's: one per bucket, then
#: ``_sum`` and ``_count``), by family name and label values, kept between scrapes: label sets
#: rarely change, formatting them is most of a scrape's cost at thousands of shards. A series
#: with one sample line (not a histogram) has its text as a string, not a tuple of one.
Prefixes = dict[str, dict[Labels, str | tuple[str, ...]]]


def _prefixes(family: Family, labels: Labels) -> str | tuple[str, ...]:
    name, names = family.name, family.labelnames
    if family.kind == "histogram":
        les = [f'le="{_number(b)}"' for b in family.buckets] + ['le="+Inf"']
        return (
            *(f"{name}_bucket{_labels(names, labels, le)} " for le in les),
            f"{name}_sum{_labels(names, labels)} ",
            f"{name}_count{_labels(names, labels)} ",
        )
    sample = f"{name}_total" if family.kind == "counter" else name
    return f"{sample}{_labels(names, labels)} "


def render(
    families: dict[str, Family],
    values: dict[tuple[str, Labels], Any],
    prefixes: Prefixes | None = None,
) -> bytes:
    """The Prometheus text exposition format (0.0.4) of ``values``. ``prefixes`` (the
    :class:`Aggregator`'s) keeps each series' formatted name and labels for the next scrape."""
    tables: Tables = {}
    for (name, labels), value in values.items():
        tables.setdefault(name, {})[labels] = value
    return render_tables(families, tables, prefixes)


def render_tables(
    families: dict[str, Family], tables: Tables, prefixes: Prefixes | None = None
) -> bytes:
    """:func:`render` of series by family name and label values."""
    if prefixes is None:
        prefixes = {}
    lines: list[str] = []
    add = lines.append
    finite = math.isfinite
    for name, family in families.items():
        series = tables.get(name)
        if not series:
            continue
        known = prefixes.get(name)
        if known is None or len(known) > 2 * len(series) + 1024:
            known = prefixes[name] = {}  # (anew: series that went away)
        add(f"# HELP {name} {family.documentation}")
        add(f"# TYPE {name} {family.kind}")
        histogram = family.kind == "histogram"
        for labels in sorted(series):
            value = series[labels]
            text = known.get(labels)
            if text is None:
                text = known[labels] = _prefixes(family, labels)
            if histogram:
                cumulative = 0.0
                for prefix, count in zip(text, value[:-2], strict=False):
                    cumulative += count
                    add(prefix + repr(cumulative))
                add(text[-2] + _number(value[-2]))
                add(text[-1] + _number(value[-1]))
            else:
                v = float(value)
                add(text + (repr(v) if finite(v) else _number(v)))  # type: ignore[operator]  # a str
    lines.append("")
    return "\n".join(lines).encode()
