"""Commands waiting for the send limit: a queue bounded in count and in age (pure)."""

from __future__ import annotations

from collections import deque

from .envelope import DECODE_ERRORS, decode_envelope
from .identify import MAX_PAYLOAD_BYTES
from .limiter import SendLimiter

__all__ = ["CommandQueue", "CommandRejected", "command_op"]


class CommandRejected(ValueError):
    """A command that can never be sent (too large, not an object, queue full); ``reason`` is
    a short fixed label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def command_op(payload: bytes) -> int:
    """The opcode of a command payload (``{"op": .., "d": ..}`` JSON) that can be sent.

    Raises :class:`CommandRejected` for one that never can: too large, or not a payload."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise CommandRejected(
            "too_large",
            f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit",
        )
    try:
        return decode_envelope(payload).op
    except DECODE_ERRORS as exc:
        raise CommandRejected("not_json", f"not a gateway payload: {exc}") from None


class CommandQueue:
    """FIFO of ``(payload, ticket, op, queued at)``; at most ``limit`` entries, none older than
    ``max_age`` seconds once :meth:`expire` ran. ``items`` is the deque itself: hot paths test
    it for emptiness without a Python-level call."""

    __slots__ = ("items", "limit", "max_age")

    def __init__(self, limit: int, max_age: float) -> None:
        self.limit = limit
        self.max_age = max_age
        self.items: deque[tuple[bytes, object, int, float]] = deque()

    def __len__(self) -> int:
        return len(self.items)

    def push(self, payload: bytes, ticket: object, op: int, now: float, shard_id: int) -> None:
        if len(self.items) >= self.limit:
            raise CommandRejected(
                "queue_full",
                f"shard {shard_id} already holds {len(self.items)} commands waiting for the "
                "send limit",
            )
        self.items.append((payload, ticket, op, now))

    def expire(self, now: float) -> tuple[object, ...] | None:
        """Drop what is older than ``max_age``; the tickets of what was dropped, or None."""
        items = self.items
        horizon = now - self.max_age
        if not items or items[0][3] > horizon:
            return None
        tickets: list[object] = []
        while items and items[0][3] <= horizon:
            ticket = items.popleft()[1]
            if ticket is not None:
                tickets.append(ticket)
        return tuple(tickets)

    def take(self, now: float, limiter: SendLimiter) -> list[tuple[bytes, object, int]]:
        """As many commands as the send limit allows now, oldest first."""
        items = self.items
        out: list[tuple[bytes, object, int]] = []
        while items and limiter.try_acquire(now):
            payload, ticket, op, _ = items.popleft()
            out.append((payload, ticket, op))
        return out

    def expiry(self) -> float | None:
        """When the oldest command expires (None: the queue is empty)."""
        return self.items[0][3] + self.max_age if self.items else None

    def next_deadline(self, limiter: SendLimiter, *, sending: bool) -> float | None:
        """When something is due: the oldest command expires, or (``sending``: the connection
        is READY and commands wait for the limit) a send slot frees."""
        if not self.items:
            return None
        deadline = self.items[0][3] + self.max_age
        if sending:
            free = limiter.earliest_free()
            if free is not None and free < deadline:
                deadline = free
        return deadline

    def clear(self) -> tuple[object, ...]:
        """Give every command up; their tickets."""
        tickets = tuple(t for _, t, _, _ in self.items if t is not None)
        self.items.clear()
        return tickets
