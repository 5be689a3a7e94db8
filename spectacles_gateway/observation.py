"""What a worker reports once a second: counts moved into the metrics, and the status and
session of every shard whose core changed since the last report (idle shards cost nothing).

A mixin of :class:`~.worker.Worker`: the state it reads is declared here and set up there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import metrics
from .control import ShardStatus
from .protocol.events import ShardStats
from .protocol.shard import Session

if TYPE_CHECKING:
    from .brokers.base import Broker
    from .runner import ShardRunner

__all__ = ["Observation"]


class Observation:
    runners: dict[int, ShardRunner]
    broker: Broker
    counter_label: str | None  # minimal series: counters per worker, by this label
    _published: dict[str, int]  # events handed to the broker since the last report, by type
    _latencies: list[float]  # publish latencies measured since the last report
    _changed: set[int]  # shards whose core changed since the last report
    _stats: dict[int, ShardStats]  # shard -> stats at the last report
    _status_changes: dict[int, ShardStatus]

    def observe(self) -> None:
        """Move counts into the metrics and note the shards whose status changed; only shards
        that saw activity since the last call are looked at (idle shards cost nothing)."""
        if self._published:
            for event, count in self._published.items():
                metrics.events_published.labels(event).inc(count)
            self._published.clear()
        if self._latencies:
            histogram = metrics.publish_latency.labels(self.broker.name)
            for seconds in self._latencies:
                histogram.observe(seconds)
            self._latencies.clear()
        confirmed = 0
        changed, self._changed = self._changed, set()
        for shard_id in changed:
            runner = self.runners.get(shard_id)
            if runner is None:
                continue
            stats = runner.stats()
            confirmed += self._record_stats(shard_id, stats, self._stats.get(shard_id))
            self._stats[shard_id] = stats
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
        if confirmed:
            metrics.events_confirmed.labels(self.broker.name).inc(confirmed)

    def _record_stats(self, shard_id: int, stats: ShardStats, old: ShardStats | None) -> int:
        shard = self.counter_label or str(shard_id)
        if old is None or stats.commands_sent > old.commands_sent:
            sent = stats.commands_sent - (old.commands_sent if old else 0)
            if sent:
                metrics.commands_sent.labels(shard).inc(sent)
        for (t, op), count in stats.packets_received.items():
            before = old.packets_received.get((t, op), 0) if old else 0
            if count > before:
                metrics.packets_received.labels(t, str(op), shard).inc(count - before)
        for op, count in stats.packets_sent.items():
            before = old.packets_sent.get(op, 0) if old else 0
            if count > before:
                metrics.packets_sent.labels("", str(op), shard).inc(count - before)
        if stats.latency is not None and (
            old is None or stats.heartbeats_acked > old.heartbeats_acked
        ):
            ms = stats.latency * 1000.0
            metrics.ping.labels(shard).observe(ms)  # per worker with minimal series
            if self.counter_label is not None:  # ... and the last value per shard
                metrics.shard_latency.labels(shard_id).set(round(ms, 1))
        return stats.confirmed_events - (old.confirmed_events if old else 0)

    def status_changes(self) -> tuple[dict[int, ShardStatus], dict[int, Session | None]]:
        """Shard statuses and sessions noted by :meth:`observe` since the last call."""
        changes, self._status_changes = self._status_changes, {}
        runners = self.runners
        changes = {s: c for s, c in changes.items() if s in runners}  # not those let go since
        sessions = {shard_id: runners[shard_id].session() for shard_id in changes}
        return changes, sessions
