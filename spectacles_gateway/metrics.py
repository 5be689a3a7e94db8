"""The gateway's metrics. The seed's names stay for existing dashboards; ours are prefixed the same.

Every process (supervisor, workers) defines the same families in its own
:data:`REGISTRY`; workers report their values to the supervisor, which adds them up
(:mod:`.telemetry`). Latencies are histograms. Hot paths never touch these objects per event:
they count in plain ints and move the counts over about once a second.
"""

from __future__ import annotations

from .telemetry import Counter, Gauge, Histogram, Registry

REGISTRY = Registry()
_R = REGISTRY

# --- the seed's metrics (its counters had no _total suffix; a gauge keeps the exact name) ---
packets_received = Gauge(
    "gateway_packets_received",
    "Counter of packets received over all gateway connections.",
    ["t", "op", "shard"],
    registry=_R,
    cumulative=True,
)
packets_sent = Gauge(
    "gateway_packets_sent",
    "Counter of packets sent over all gateway connections.",
    ["t", "op", "shard"],
    registry=_R,
    cumulative=True,
)
shards_alive = Gauge(
    "gateway_shards_alive", "Shards that are online (READY).", ["id"], registry=_R, mode="max"
)
total_shards = Gauge(
    "gateway_total_shards",
    "Total number of shards that should be online.",
    registry=_R,
    mode="max",  # the supervisor's count; a worker counts only its own
)
ping = Histogram(
    "gateway_ping",
    "Latency between heartbeat and acknowledgement (in milliseconds).",
    ["id"],
    registry=_R,
    buckets=(10, 25, 50, 100, 200, 400, 800, 1600, 5000),
)
shard_latency = Gauge(
    "gateway_shard_latency_ms",
    "Each shard's last heartbeat round trip (milliseconds); with PROMETHEUS_SHARD_SERIES="
    "minimal, in place of gateway_ping's per-shard histogram.",
    ["id"],
    registry=_R,
    mode="max",
)

# --- ours ---
events_published = Counter(
    "gateway_events_published", "Events handed to the broker.", ["event"], registry=_R
)
events_confirmed = Counter(
    "gateway_events_confirmed", "Events the broker confirmed.", ["broker"], registry=_R
)
publish_failures = Counter(
    "gateway_publish_failures",
    "Events the broker refused or lost (retried).",
    ["reason"],
    registry=_R,
)
input_dropped = Counter(
    "gateway_input_dropped",
    "Malformed or unroutable input that was logged and dropped.",
    ["source", "reason"],
    registry=_R,
)
commands_sent = Counter(
    "gateway_commands_sent", "Commands written to a shard.", ["shard"], registry=_R
)
decode_errors = Counter(
    "gateway_decode_errors",
    "Gateway messages that could not be decoded.",
    ["shard", "reason"],
    registry=_R,
)
reconnects = Counter(
    "gateway_reconnects", "Gateway reconnects, by reason.", ["shard", "reason"], registry=_R
)
identifies = Counter(
    "gateway_identifies",
    "New sessions (READY after an IDENTIFY); see packets_sent op 2.",
    ["shard"],
    registry=_R,
)
resumes = Counter("gateway_resumes", "Sessions resumed (RESUMED received).", ["shard"], registry=_R)
broker_buffered = Gauge(
    "gateway_broker_buffered_events",
    "Events waiting for the broker (not yet confirmed).",
    registry=_R,
)
broker_reconnects = Counter(
    "gateway_broker_reconnects",
    "Broker connections re-established after a loss.",
    ["broker"],
    registry=_R,
)
broker_connected = Gauge(
    "gateway_broker_connected",
    "1 when the broker connection is up (the lowest over all workers).",
    registry=_R,
    mode="min",
)
publish_latency = Histogram(
    "gateway_publish_latency_seconds",
    "Time from an event's arrival to the broker's confirmation.",
    ["broker"],
    registry=_R,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

gaps = Counter(
    "gateway_gaps",
    "GATEWAY_GAP events published: events Discord will not send again, by why.",
    ["reason"],
    registry=_R,
)

# --- the supervisor's own ---
session_starts_remaining = Gauge(
    "gateway_session_starts_remaining",
    "Identifies left in Discord's daily session start budget.",
    registry=_R,
    mode="max",
)
worker_restarts = Counter(
    "gateway_worker_restarts",
    "Worker processes restarted, by how they died.",
    ["worker", "reason"],
    registry=_R,
)
workers = Gauge("gateway_workers", "Worker processes running.", registry=_R)
identify_progress = Gauge(
    "gateway_identify_progress",
    "Share of this supervisor's shards that are READY (1 when all are).",
    registry=_R,
    mode="max",
)

# --- fleet (the supervisor and the fleet agent) ---
leases_held = Gauge("gateway_fleet_leases_held", "Shard leases this member holds.", registry=_R)
lease_acquisitions = Counter(
    "gateway_fleet_lease_acquisitions", "Shard leases taken.", ["how"], registry=_R
)
lease_losses = Counter(
    "gateway_fleet_lease_losses",
    "Shard leases lost (not renewed in time, or taken over).",
    ["reason"],
    registry=_R,
)
handoffs = Counter(
    "gateway_fleet_handoffs", "Shards handed to another member, by why.", ["reason"], registry=_R
)
failovers = Counter(
    "gateway_fleet_failovers",
    "Shards taken over from a member whose lease ran out, by the shard's state.",
    ["reason"],
    registry=_R,
)
failover_seconds = Histogram(
    "gateway_fleet_failover_seconds",
    "From a lease's expiry to the shard's RESUMED (or READY) on its new owner.",
    registry=_R,
    buckets=(0.5, 1, 2, 3, 5, 8, 13, 21, 34),
)
fenced_writes = Counter(
    "gateway_fleet_fenced_writes",
    "Session writes refused because a newer lease epoch owns the shard.",
    registry=_R,
)

# --- resharding (the supervisor) ---
generation = Gauge(
    "gateway_generation",
    "The running generation of shards (one more after each reshard).",
    registry=_R,
    mode="max",
)
recommended_shards = Gauge(
    "gateway_recommended_shards",
    "The shard count Discord recommended at the last look.",
    registry=_R,
    mode="max",
)
reshard_state = Gauge(
    "gateway_reshard_in_progress", "1 while a reshard runs.", registry=_R, mode="max"
)
reshards = Counter(
    "gateway_reshards",
    "Reshards by outcome (done, rolled_back, impossible).",
    ["outcome"],
    registry=_R,
)
