"""Timing policies as pure functions: reconnect backoff with jitter, the heartbeat grid."""

from __future__ import annotations

import math

__all__ = ["backoff_delay", "heartbeat_time"]


def backoff_delay(attempt: int, rand: float, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Delay before reconnect attempt number ``attempt`` (1 = first retry after a failure).

    "Equal jitter": half of the exponential step is fixed, half is random, so consecutive
    failures always wait longer while many shards failing together spread out. ``rand`` is a
    number in [0, 1) from the caller's random source. ``attempt <= 0`` means no failure: no wait.
    """
    if attempt <= 0:
        return 0.0
    step = min(cap, base * 2.0 ** (attempt - 1))
    return step / 2.0 + step / 2.0 * rand


def heartbeat_time(now: float, at: float, interval: float) -> float:
    """``at`` moved earlier onto a grid of a fortieth of the interval (1 s for Discord's
    41.25 s), never before ``now``: the heartbeats of many shards then share their wake-ups.
    Beating a little early is always allowed."""
    grid = interval / 40.0
    return max(now, math.floor(at / grid) * grid) if grid > 0 else at
