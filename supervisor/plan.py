"""Planning as pure functions: which shards, how many workers, which shards in which worker."""

from __future__ import annotations

import math
from collections.abc import Sequence

from spectacles_gateway.shardspec import format_shard_spec

__all__ = ["describe_ids", "group_shards", "worker_count"]


def worker_count(
    shards: int, *, workers: int = 0, shards_per_worker: int = 0, cpus: int = 1
) -> int:
    """How many workers run ``shards`` shards.

    ``workers`` wins when given; else ``shards_per_worker`` decides; else one worker per CPU.
    Never more workers than shards, never fewer than one.
    """
    if shards <= 0:
        return 0
    if workers > 0:
        n = workers
    elif shards_per_worker > 0:
        n = math.ceil(shards / shards_per_worker)
    else:
        n = max(1, cpus)
    return max(1, min(n, shards))


def group_shards(
    shard_ids: Sequence[int], workers: int, max_concurrency: int = 1
) -> list[tuple[int, ...]]:
    """Split ``shard_ids`` into ``workers`` groups so that identify start-up is limited by
    Discord's rules and not by one worker.

    Discord lets ``max_concurrency`` shards identify together (one per bucket ``id % mc``), one
    window after the other, in id order. Dealing the shards out in that order, round robin, puts
    the shards of each window on different workers, so no worker has to set up a whole window's
    sessions (READY, GUILD_CREATE bursts) alone, and each group holds a share of every bucket.
    """
    if workers <= 0:
        raise ValueError("at least one worker is needed")
    mc = max(1, max_concurrency)
    order = sorted(set(shard_ids), key=lambda i: (i // mc, i % mc))
    groups: list[list[int]] = [[] for _ in range(min(workers, len(order)) or 1)]
    for index, shard_id in enumerate(order):
        groups[index % len(groups)].append(shard_id)
    return [tuple(sorted(g)) for g in groups if g]


describe_ids = format_shard_spec  # ``0-3,8,10-11``: for logs and process titles
