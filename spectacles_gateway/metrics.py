"""Prometheus metrics. The seed's names stay for existing dashboards; ours are prefixed the same.

Every gauge declares a multiprocess mode so the supervisor can aggregate workers
(prometheus_client multiprocess mode); latencies are histograms (summaries do not aggregate).
Hot paths never touch these objects per event: they count in plain ints and
:func:`flush_shard_counts` moves the counts over about once a second.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- the seed's metrics (its counters had no _total suffix; a gauge keeps the exact name) ---
packets_received = Gauge(
    "gateway_packets_received",
    "Counter of packets received over all gateway connections.",
    ["t", "op", "shard"],
    multiprocess_mode="sum",
)
packets_sent = Gauge(
    "gateway_packets_sent",
    "Counter of packets sent over all gateway connections.",
    ["t", "op", "shard"],
    multiprocess_mode="sum",
)
shards_alive = Gauge(
    "gateway_shards_alive", "Shards that are online (READY).", ["id"], multiprocess_mode="livemax"
)
total_shards = Gauge(
    "gateway_total_shards",
    "Total number of shards that should be online.",
    multiprocess_mode="livemax",
)
ping = Histogram(
    "gateway_ping",
    "Latency between heartbeat and acknowledgement (in milliseconds).",
    ["id"],
    buckets=(10, 25, 50, 100, 200, 400, 800, 1600, 5000),
)

# --- ours ---
events_published = Counter("gateway_events_published", "Events handed to the broker.", ["event"])
events_confirmed = Counter("gateway_events_confirmed", "Events the broker confirmed.", ["broker"])
publish_failures = Counter(
    "gateway_publish_failures", "Events the broker refused or lost (retried).", ["reason"]
)
input_dropped = Counter(
    "gateway_input_dropped",
    "Malformed or unroutable input that was logged and dropped.",
    ["source", "reason"],
)
commands_sent = Counter("gateway_commands_sent", "Commands written to a shard.", ["shard"])
decode_errors = Counter(
    "gateway_decode_errors", "Gateway messages that could not be decoded.", ["shard", "reason"]
)
reconnects = Counter("gateway_reconnects", "Gateway reconnects, by reason.", ["shard", "reason"])
identifies = Counter(
    "gateway_identifies",
    "New sessions (READY after an IDENTIFY); see packets_sent op 2.",
    ["shard"],
)
resumes = Counter("gateway_resumes", "Sessions resumed (RESUMED received).", ["shard"])
broker_buffered = Gauge(
    "gateway_broker_buffered_events",
    "Events waiting for the broker (not yet confirmed).",
    multiprocess_mode="livesum",
)
broker_reconnects = Counter(
    "gateway_broker_reconnects", "Broker connections re-established after a loss.", ["broker"]
)
broker_connected = Gauge(
    "gateway_broker_connected", "1 when the broker connection is up.", multiprocess_mode="livemin"
)
session_starts_remaining = Gauge(
    "gateway_session_starts_remaining",
    "Identifies left in Discord's daily session start budget.",
    multiprocess_mode="livemax",  # the supervisor knows it; workers' files stay at 0
)


worker_restarts = Counter(
    "gateway_worker_restarts", "Worker processes restarted, by how they died.", ["worker", "reason"]
)
identify_progress = Gauge(
    "gateway_identify_progress",
    "Share of this supervisor's shards that are READY (1 when all are).",
    multiprocess_mode="livemax",  # set by the supervisor only
)
publish_latency = Histogram(
    "gateway_publish_latency_seconds",
    "Time from an event's arrival to the broker's confirmation.",
    ["broker"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


def flush_shard_counts(shard_id: int, counts: dict[tuple[str, int], int]) -> None:
    """Move a shard core's ``packets_received`` tallies into the metric and clear them."""
    shard = str(shard_id)
    for (t, op), n in counts.items():
        packets_received.labels(t, str(op), shard).inc(n)
    counts.clear()
