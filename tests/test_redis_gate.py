"""The Redis identify gate against a real Redis: buckets, leases, the window after IDENTIFY.

Each gate has its own client, as two hosts would. Where a test must show that a gate still waits,
it waits for that gate's next answer from Redis (:class:`~tests.support.redis.Replies`): the
answer proves the gate asked and was turned away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from spectacles_gateway.gate import IDENTIFY_MARGIN, LocalIdentifyGate
from spectacles_gateway.protocol.identify import SessionBudget
from spectacles_gateway.redis_gate import RedisIdentifyGate, RedisPermit
from spectacles_gateway.redis_link import redis_client

from .gwtest import t, wait_until
from .support.redis import (
    REDIS_URL,
    PrivateRedis,
    Replies,
    cleanup,
    raw_client,
    settings_for,
    unique_prefix,
)

WINDOW = 0.5  # seconds; the gate adds IDENTIFY_MARGIN


@contextlib.asynccontextmanager
async def open_gate(
    prefix: str, max_concurrency: int = 1, url: str = REDIS_URL, **kwargs: Any
) -> AsyncIterator[RedisIdentifyGate]:
    settings = settings_for(prefix, url=url)
    gate = RedisIdentifyGate(
        redis_client(settings),
        max_concurrency,
        prefix=prefix,
        url=url,
        window=kwargs.pop("window", WINDOW),
        **kwargs,
    )
    try:
        yield gate
    finally:
        await gate.aclose()


async def test_one_identify_per_bucket_and_window_across_hosts() -> None:
    loop = asyncio.get_running_loop()
    with cleanup(unique_prefix()) as prefix:
        async with open_gate(prefix) as a, open_gate(prefix) as b, raw_client() as r:
            permit = await a.acquire(0)
            assert isinstance(permit, RedisPermit) and permit.key == f"{prefix}identify:0"
            assert await r.get(permit.key) == permit.token.encode()
            assert 15_000 - t(1.0) * 1000 < await r.pttl(permit.key) <= 15_000  # the lease

            b_tries = Replies(b.client, "EVALSHA")
            other = asyncio.create_task(b.acquire(1))
            # Same bucket: B asks, is turned away and asks again, however long A takes to connect.
            await wait_until(lambda: len(b_tries) >= 2, 5, "B to be turned away twice")
            assert not other.done()
            sent_at = loop.time()
            a.release(permit, sent_at)
            # The key now lives exactly until the window after the IDENTIFY has passed.
            window_ms = (WINDOW + IDENTIFY_MARGIN) * 1000

            async def windowed() -> bool:
                return 0 < await r.pttl(permit.key) <= window_ms

            await wait_until(windowed, 5, "the release to shorten the key's life to the window")
            pttl = await r.pttl(permit.key)
            since_sent_ms = (loop.time() - sent_at) * 1000
            assert window_ms - since_sent_ms - 2 <= pttl <= window_ms  # 2 ms: rounding
            second = await asyncio.wait_for(other, t(5))
            got_at = loop.time()
            assert WINDOW + IDENTIFY_MARGIN <= got_at - sent_at < WINDOW + IDENTIFY_MARGIN + t(0.6)
            b.release(second, None)  # no IDENTIFY was sent: free at once

            async def deleted() -> bool:
                return await r.exists(permit.key) == 0

            await wait_until(deleted, 1, "the release to delete the key")
            assert await r.exists(permit.key) == 0
            a_tries = Replies(a.client, "EVALSHA")
            third = await asyncio.wait_for(a.acquire(0), t(5))
            assert [int(reply[0]) for _, reply in a_tries.seen] == [1]  # taken at the first try
            a.release(third, None)


async def test_different_buckets_identify_together() -> None:
    loop = asyncio.get_running_loop()
    with cleanup(unique_prefix()) as prefix:
        async with open_gate(prefix, 2) as a, open_gate(prefix, 2) as b:
            tries = [Replies(a.client, "EVALSHA"), Replies(b.client, "EVALSHA")]
            started = loop.time()
            p0, p1 = await asyncio.wait_for(asyncio.gather(a.acquire(0), b.acquire(1)), t(5))
            # Both at their first try: neither waited for the other.
            assert [[int(reply[0]) for _, reply in gate.seen] for gate in tries] == [[1], [1]]
            assert (p0.bucket, p1.bucket) == (0, 1)
            a.release(p0, loop.time())
            b.release(p1, loop.time())
            # Shard 2 shares bucket 0 with shard 0; shard 3 bucket 1.
            p2, p3 = await asyncio.gather(b.acquire(2), a.acquire(3))
            assert loop.time() - started >= WINDOW + IDENTIFY_MARGIN
            a.release(p3, None)
            b.release(p2, None)


async def test_a_crashed_holder_blocks_its_bucket_for_one_lease_only() -> None:
    loop = asyncio.get_running_loop()
    with cleanup(unique_prefix()) as prefix:
        async with raw_client() as r:
            # A holder that died right after SET NX (its lease is 0.8 s here).
            set_at = loop.time()
            await r.set(f"{prefix}identify:0", "dead-host-token", nx=True, px=800)
        async with open_gate(prefix) as gate:
            permit = await asyncio.wait_for(gate.acquire(0), t(5))
            assert 0.6 < loop.time() - set_at < 0.8 + t(0.7)
            gate.release(permit, None)


async def test_a_living_holder_renews_its_lease() -> None:
    loop = asyncio.get_running_loop()
    lease = t(0.6)
    with cleanup(unique_prefix()) as prefix:
        async with open_gate(prefix, lease=lease) as a, open_gate(prefix) as b, raw_client() as r:
            permit = await a.acquire(0)
            expired_twice = loop.time() + 2 * lease  # had A not renewed its lease
            b_tries = Replies(b.client, "EVALSHA")
            waiter = asyncio.create_task(b.acquire(0))
            # A slow connect: B asks again after two leases and is still turned away.
            await wait_until(
                lambda: bool(b_tries.after(expired_twice)) or waiter.done(),
                2 * 0.6 + 3,
                "B to ask after two leases",
            )
            assert not waiter.done()
            assert await r.get(permit.key) == permit.token.encode()
            a.release(permit, None)
            b.release(await asyncio.wait_for(waiter, t(2)), None)


async def test_release_only_touches_a_key_that_is_still_ours() -> None:
    loop = asyncio.get_running_loop()
    with cleanup(unique_prefix()) as prefix:
        async with open_gate(prefix) as gate, raw_client() as r:
            permit = await gate.acquire(0)
            # The lease ran out and another host took the bucket meanwhile.
            await r.set(permit.key, "someone-else", px=1000)
            taken_at = loop.time()
            settled = Replies(gate.client, "EVALSHA")
            gate.release(permit, None)
            await wait_until(lambda: len(settled) >= 1, 5, "the release to ask Redis")
            assert [reply for _, reply in settled.seen] == [0]  # "not ours": left alone
            assert await r.get(permit.key) == b"someone-else"
            assert await r.pttl(permit.key) >= 1000 - (loop.time() - taken_at) * 1000 - 2
            # And after an IDENTIFY: the other holder's key keeps its own expiry.
            permit = await asyncio.wait_for(gate.acquire(0), t(3))
            await r.set(permit.key, "someone-else", px=3000)
            taken_at = loop.time()
            settled = Replies(gate.client, "EVALSHA")
            gate.release(permit, loop.time())
            await wait_until(lambda: len(settled) >= 1, 5, "the release to ask Redis")
            assert [reply for _, reply in settled.seen] == [0]
            assert await r.pttl(permit.key) >= 3000 - (loop.time() - taken_at) * 1000 - 2


async def test_identifies_wait_while_redis_is_down(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    prefix = unique_prefix()
    async with open_gate(prefix, url=private_redis.url) as gate:
        private_redis.stop()
        waiting = [asyncio.create_task(gate.acquire(i)) for i in (0, 1)]
        # The gate tried Redis three times and was refused each time.
        await wait_until(lambda: gate.outage.failures >= 3, 10, "three refused tries")
        assert not any(task.done() for task in waiting)  # no identify without the gate
        private_redis.start()
        first = await asyncio.wait_for(waiting[0], t(5))
        gate.release(first, loop.time())
        second = await asyncio.wait_for(waiting[1], t(5))
        gate.release(second, None)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("identify gate: Redis at" in m and "unreachable" in m for m in messages) == 1
    assert any("identify gate: Redis at" in m and "reachable again" in m for m in messages)


async def test_the_local_gate_is_taken_first_and_keeps_the_budget() -> None:
    loop = asyncio.get_running_loop()
    with cleanup(unique_prefix()) as prefix:
        reset_at = loop.time() + 0.8
        budget = SessionBudget(total=10, remaining=1, reset_at=reset_at)
        local = LocalIdentifyGate(1, window=WINDOW, budget=budget)
        async with open_gate(prefix, local=local) as gate:
            permit = await gate.acquire(0)
            gate.release(permit, loop.time())
            assert budget.remaining == 0
            permit = await asyncio.wait_for(gate.acquire(1), t(5))
            # It waited for the budget's reset, not only for the window.
            assert loop.time() >= reset_at
            gate.release(permit, None)


# --------------------------------------------------------------------------------------------
# Discord's daily session start budget, one for every host


async def test_two_hosts_together_spend_no_more_than_the_budget() -> None:
    import time

    loop = asyncio.get_running_loop()
    reset_at = round((time.time() + 3600) * 1000)
    with cleanup(unique_prefix()) as prefix:
        # Each host saw Discord say 3 starts are left: together they may start 3 sessions.
        async with (
            open_gate(prefix, 4, window=0.0, budget=(1000, 3, reset_at)) as a,
            open_gate(prefix, 4, window=0.0, budget=(1000, 3, reset_at)) as b,
            raw_client() as r,
        ):
            first = await a.acquire(0)
            second = await b.acquire(1)
            a.release(first, loop.time())
            b.release(second, loop.time())
            third = await a.acquire(2)
            a.release(third, None)  # given back without an IDENTIFY: the start is refunded

            async def refunded() -> bool:
                return await _left(r, prefix) == 1

            await wait_until(refunded, 5, "the refund")
            third = await b.acquire(2)
            b.release(third, loop.time())
            blocked = asyncio.create_task(a.acquire(3))
            tries = Replies(a.client, "EVALSHA")
            await wait_until(lambda: len(tries) >= 1, 5, "host A turned away")
            assert not blocked.done()
            budget = await r.hgetall(f"{prefix}identify:budget")
            assert int(budget[b"remaining"]) == 0 and int(budget[b"total"]) == 1000
            assert abs(int(budget[b"reset_at"]) - reset_at) < 10
            blocked.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await blocked


async def _left(r: Any, prefix: str) -> int:
    return int(await r.hget(f"{prefix}identify:budget", "remaining") or -1)


async def test_a_new_window_from_discord_replaces_a_spent_one() -> None:
    import time

    now_ms = round(time.time() * 1000)
    with cleanup(unique_prefix()) as prefix:
        async with raw_client() as r:
            await r.hset(
                f"{prefix}identify:budget",
                mapping={"total": 1000, "remaining": 0, "reset_at": now_ms + 3_600_000},
            )
            # A host with an answer of the same window that still says 5: the lower one stays.
            async with open_gate(prefix, budget=(1000, 5, now_ms + 3_600_000)) as gate:
                blocked = asyncio.create_task(gate.acquire(0))
                tries = Replies(gate.client, "EVALSHA")
                await wait_until(lambda: len(tries) >= 1, 5, "turned away")
                assert not blocked.done()
                blocked.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await blocked
            # Discord reset the budget since: a host with the new answer starts at once.
            later = (1000, 999, now_ms + 2 * 86_400_000)
            async with open_gate(prefix, budget=later) as gate:
                permit = await asyncio.wait_for(gate.acquire(0), t(5))
                gate.release(permit, asyncio.get_running_loop().time())
            assert await _left(r, prefix) == 998
