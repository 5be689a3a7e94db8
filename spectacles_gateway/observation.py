"""What a worker reports once a second: the status and session of every shard whose core
changed since the last report (idle shards cost nothing), and what the shards counted moved
into the metrics (with hundreds of busy shards, every :data:`COUNTS_EVERY` seconds).

A mixin of :class:`~.worker.Worker`: the state it reads is declared here and set up there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import metrics
from .control import ShardStatus
from .protocol.events import ShardCounts
from .protocol.state import Session

if TYPE_CHECKING:
    from .brokers.base import Broker
    from .runner import ShardRunner

__all__ = ["COUNTS_EVERY", "FEW_BUSY", "Observation"]

#: Up to this many shards that counted something go into the packet counters every round ...
FEW_BUSY = 100
#: ... more (hundreds of busy shards, about nine series each) at most this often (seconds), as
#: their series go to the supervisor at most this often anyway (``workerproc.METRICS_EVERY``):
#: at 512 busy shards the once-a-second round spent most of its time on the counters.
COUNTS_EVERY = 10.0


class Observation:
    runners: dict[int, ShardRunner]
    broker: Broker
    counter_label: str | None  # minimal series: counters per worker, by this label
    _published: dict[str, int]  # events handed to the broker since the last report, by type
    _latencies: list[float]  # publish latencies measured since the last report
    _changed: set[int]  # shards whose core changed since the last report
    _uncounted: set[int]  # shards that may have counted something not yet in the counters
    _counted_at: float  # when the counters last took every shard's counts (the clock's)
    _clock: Any
    _status_changes: dict[int, ShardStatus]
    #: (shard label, type, op) -> its counter of packets received, (shard label, op) -> of
    #: packets sent: looked up once, not for every busy shard and event type every second
    #: (these series are never removed).
    _received_series: dict[tuple[str, str, int], Any]
    _sent_series: dict[tuple[str, int], Any]

    def observe(self, *, final: bool = False) -> None:
        """Move counts into the metrics and note the shards whose status changed; only shards
        that saw activity since the last call are looked at (idle shards cost nothing).
        ``final``: every count goes into the counters now."""
        if self._published:
            for event, count in self._published.items():
                metrics.events_published.labels(event).inc(count)
            self._published.clear()
        if self._latencies:
            histogram = metrics.publish_latency.labels(self.broker.name)
            for seconds in self._latencies:
                histogram.observe(seconds)
            self._latencies.clear()
        changed, self._changed = self._changed, set()
        runners = self.runners
        for shard_id in changed:
            runner = runners.get(shard_id)
            if runner is None:
                continue
            stats = runner.stats()
            self._status_changes[shard_id] = ShardStatus(
                state=stats.phase,
                ready=stats.ready,
                seq=stats.seq,
                latency_ms=None if stats.latency is None else round(stats.latency * 1000.0, 1),
                last_close=stats.last_close or None,
                fatal=stats.fatal_code,
                guilds_pending=stats.guilds_pending,
                publishing=stats.publishing,
            )
        uncounted = self._uncounted
        uncounted |= changed
        now = self._clock()
        if len(uncounted) > FEW_BUSY and now - self._counted_at < COUNTS_EVERY and not final:
            return  # the counts wait in the cores
        self._uncounted = set()
        self._counted_at = now
        confirmed = 0
        for shard_id in uncounted:
            runner = runners.get(shard_id)
            if runner is not None:
                confirmed += self._record_counts(shard_id, runner.take_counts())
        if confirmed:
            metrics.events_confirmed.labels(self.broker.name).inc(confirmed)

    def _record_counts(self, shard_id: int, counts: ShardCounts) -> int:
        """Add what a shard counted since the last round to its series; returns how many of
        its events were confirmed."""
        shard = self.counter_label or str(shard_id)
        if counts.commands_sent:
            metrics.commands_sent.labels(shard).inc(counts.commands_sent)
        received = self._received_series
        for key, count in counts.packets_received.items():
            t, op = key
            child = received.get((shard, t, op))
            if child is None:
                child = metrics.packets_received.labels(t, str(op), shard)
                received[(shard, t, op)] = child
            child.inc(count)
        sent_series = self._sent_series
        for op, count in counts.packets_sent.items():
            child = sent_series.get((shard, op))
            if child is None:
                child = metrics.packets_sent.labels("", str(op), shard)
                sent_series[(shard, op)] = child
            child.inc(count)
        if counts.latency is not None and counts.heartbeats_acked:
            ms = counts.latency * 1000.0
            metrics.ping.labels(shard).observe(ms)  # per worker with minimal series
            if self.counter_label is not None:  # ... and the last value per shard
                metrics.shard_latency.labels(shard_id).set(round(ms, 1))
        return counts.confirmed_events

    def status_changes(self) -> tuple[dict[int, ShardStatus], dict[int, Session | None]]:
        """Shard statuses and sessions noted by :meth:`observe` since the last call."""
        changes, self._status_changes = self._status_changes, {}
        runners = self.runners
        changes = {s: c for s, c in changes.items() if s in runners}  # not those let go since
        sessions = {shard_id: runners[shard_id].session() for shard_id in changes}
        return changes, sessions
