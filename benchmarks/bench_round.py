"""The worker's once-a-second round for many busy shards (issue 14), in one process.

Every shard counted packets of eight event types and a heartbeat since the last round; the round
adds those counts to the per-shard packet counters. Printed: milliseconds per round for
``--shards`` busy shards (best of ``--rounds``), through the worker's own code
(``Observation._record_counts``), next to a baseline measured in the same run that looks every
series up by its labels (``Family.labels``), as the round did before, and their ratio.

Usage: python benchmarks/bench_round.py [--shards 512] [--rounds 30]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench_peers import EVENTS as TYPES  # the realistic mix's eight types

from spectacles_gateway import metrics
from spectacles_gateway.observation import Observation
from spectacles_gateway.protocol.events import ShardCounts


def counts(count: int) -> ShardCounts:
    received = {(t, 0): count for t in TYPES}
    received[("", 11)] = 1
    return ShardCounts(received, {1: 1}, 0, count * len(TYPES), 1, 0.05)


def by_labels(shard_id: int, counts: ShardCounts) -> int:
    """The baseline: every series looked up by its labels, every round."""
    shard = str(shard_id)
    for (t, op), count in counts.packets_received.items():
        metrics.packets_received.labels(t, str(op), shard).inc(count)
    for op, count in counts.packets_sent.items():
        metrics.packets_sent.labels("", str(op), shard).inc(count)
    return counts.confirmed_events


def best_round(record: Any, shards: int, rounds: int) -> float:
    best = float("inf")
    for r in range(rounds):
        taken = {s: counts(r % 3 + 1) for s in range(shards)}
        started = time.perf_counter()
        for s in range(shards):
            record(s, taken[s])
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    observation = Observation()
    observation.counter_label = None
    observation._received_series = {}
    observation._sent_series = {}
    ours = best_round(observation._record_counts, args.shards, args.rounds)
    baseline = best_round(by_labels, args.shards, args.rounds)
    print(
        f"bench_round: {args.shards} busy shards, best of {args.rounds} rounds: "
        f"worker {ours * 1e3:.2f} ms, by labels {baseline * 1e3:.2f} ms, "
        f"ratio {ours / baseline:.2f}"
    )


if __name__ == "__main__":
    main()
