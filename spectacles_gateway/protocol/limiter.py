"""Per-connection send limit (discord.md §8): 120 payloads per 60 s, some kept for heartbeats."""

from __future__ import annotations

from collections import deque

__all__ = ["SendLimiter"]


class SendLimiter:
    """A sliding-window log: no window of ``period`` seconds ever holds more than ``limit`` sends.

    A sliding window is stricter than any fixed window the server may count with, so keeping to
    it can never trigger close code 4008. ``reserved`` slots are usable only by priority sends
    (heartbeats, identify, resume), so a flood of commands cannot starve the heartbeat.

    Create one per connection (Discord resets its count on each new connection). The window we
    keep is ``period * (1 + SAFETY)``: we time a send when it leaves, the server when it
    arrives, and uneven delivery must not squeeze ``limit + 1`` sends into the server's window.
    """

    SAFETY = 0.025

    __slots__ = ("_sent", "limit", "period", "reserved")

    def __init__(self, limit: int = 120, period: float = 60.0, reserved: int = 3) -> None:
        if not 0 <= reserved < limit:
            raise ValueError("reserved must be in [0, limit)")
        self.limit = limit
        self.period = period * (1.0 + self.SAFETY)
        self.reserved = reserved
        self._sent: deque[float] = deque()

    def _expire(self, now: float) -> None:
        sent = self._sent
        horizon = now - self.period
        while sent and sent[0] <= horizon:
            sent.popleft()

    def _cap(self, priority: bool) -> int:
        return self.limit if priority else self.limit - self.reserved

    def try_acquire(self, now: float, *, priority: bool = False) -> bool:
        """Record a send at ``now`` and return True if allowed; False (nothing recorded) if not."""
        self._expire(now)
        if len(self._sent) >= self._cap(priority):
            return False
        self._sent.append(now)
        return True

    def next_free(self, now: float, *, priority: bool = False) -> float:
        """The earliest time at which :meth:`try_acquire` will succeed (``now`` if it would now)."""
        self._expire(now)
        cap = self._cap(priority)
        used = len(self._sent)
        if used < cap:
            return now
        # The send that must leave the window is the (used - cap)-th oldest.
        return self._sent[used - cap] + self.period

    def earliest_free(self, *, priority: bool = False) -> float | None:
        """Like :meth:`next_free` without a clock: None if a slot is free now, else the time the
        next slot frees (possibly already past: then :meth:`try_acquire` will succeed)."""
        cap = self._cap(priority)
        used = len(self._sent)
        if used < cap:
            return None
        return self._sent[used - cap] + self.period

    def in_window(self, now: float) -> int:
        """How many sends count against the limit at ``now``."""
        self._expire(now)
        return len(self._sent)
