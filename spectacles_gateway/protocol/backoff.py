"""Reconnect delays: exponential backoff with jitter, as a pure function."""

from __future__ import annotations

__all__ = ["backoff_delay"]


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
