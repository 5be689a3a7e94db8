"""Identify pacing rules as pure functions (discord.md §8).

``max_concurrency`` buckets (``shard_id % max_concurrency``): identifies in one bucket at least
``window`` seconds apart; different buckets may identify together. The daily session start budget
is never run out: with nothing left, wait for its reset.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IDENTIFY_WINDOW", "SessionBudget", "bucket_of"]

IDENTIFY_WINDOW = 5.0


def bucket_of(shard_id: int, max_concurrency: int) -> int:
    """The identify rate-limit key of a shard."""
    return shard_id % max(1, max_concurrency)


@dataclass
class SessionBudget:
    """``session_start_limit`` from ``/gateway/bot``, on our clock."""

    total: int
    remaining: int
    reset_at: float  # clock time at which ``remaining`` goes back to ``total``

    def wait_before_identify(self, now: float) -> float:
        """Seconds to wait before one more identify may be spent (0: go now)."""
        if now >= self.reset_at:
            return 0.0
        return 0.0 if self.remaining > 0 else self.reset_at - now

    def spend(self, now: float, reset_after: float = 86_400.0) -> None:
        """Count one identify at ``now``; after the reset time the full budget is back."""
        if now >= self.reset_at:
            self.remaining = self.total
            self.reset_at = now + reset_after
        self.remaining = max(0, self.remaining - 1)
