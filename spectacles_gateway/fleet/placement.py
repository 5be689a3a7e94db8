"""Fleet placement as pure functions: how many shards each member should own, which free shards a
member claims, and which of its shards it hands to a member below its share (fleet.md).

Every member computes the same answer from the same view (members, capacities, owners), so no
coordinator is needed: a member below its target claims, a member above it hands off one shard
at a time while someone is below theirs. Claims race through an atomic Lua script; losing a race
costs a retry, never a double owner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

__all__ = ["claim_order", "targets", "to_claim", "to_hand_off"]


def targets(
    shards: int, capacities: Mapping[str, int], *, allowed: Mapping[str, int] | None = None
) -> dict[str, int]:
    """How many of ``shards`` shards each live member should own.

    As equal as capacities allow (water-filling: a member whose capacity is below the equal share
    gets its capacity, the rest share what is left); a remainder goes one each to the members
    first in id order. ``capacities``: member -> capacity (0: unlimited). ``allowed``: member ->
    how many shards it may run at all (its ``--shards`` filter), an extra cap.
    """
    caps = {
        m: min(c if c > 0 else shards, (allowed or {}).get(m, shards))
        for m, c in capacities.items()
    }
    out = dict.fromkeys(caps, 0)
    left = shards
    open_members = sorted(caps)
    while left > 0 and open_members:
        share, extra = divmod(left, len(open_members))
        if share == 0:
            for m in open_members[:extra]:
                out[m] += 1
            break
        capped = [m for m in open_members if caps[m] - out[m] <= share]
        if not capped:
            for i, m in enumerate(open_members):
                out[m] += share + (1 if i < extra else 0)
            break
        for m in capped:
            left -= caps[m] - out[m]
            out[m] = caps[m]
        open_members = [m for m in open_members if m not in capped]
    return out


def claim_order(member: str, shards: Iterable[int]) -> list[int]:
    """The order in which ``member`` tries free shards: a stable shuffle of its own, so members
    claiming at once mostly go for different shards."""

    def key(shard: int) -> bytes:
        return hashlib.blake2s(f"{member}/{shard}".encode(), digest_size=8).digest()

    return sorted(shards, key=key)


def to_claim(
    member: str, target: int, owned: int, free: Iterable[int], *, limit: int | None = None
) -> list[int]:
    """Free shards ``member`` should try to claim now (at most ``limit``)."""
    want = max(0, target - owned)
    if limit is not None:
        want = min(want, limit)
    return claim_order(member, free)[:want]


def to_hand_off(
    member: str,
    targets_: Mapping[str, int],
    owned: Mapping[str, int],
    mine: Iterable[int],
    free: int,
) -> int | None:
    """One shard ``member`` should hand off now, or None. Only when it holds more than its
    target, nothing is free for the others to claim instead, and some member is below its
    target: shards move one at a time, only where they are wanted."""
    if free:
        return None
    if owned.get(member, 0) <= targets_.get(member, 0):
        return None
    if not any(owned.get(m, 0) < t for m, t in targets_.items() if m != member):
        return None
    shards = sorted(mine)
    return shards[-1] if shards else None
