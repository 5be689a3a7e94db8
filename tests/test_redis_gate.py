"""The Redis identify gate against a real Redis: buckets, leases, the window after IDENTIFY.

Each gate has its own client, as two hosts would.
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
from spectacles_gateway.redis_store import redis_client

from .gwtest import t
from .test_redis_store import (
    REDIS_URL,
    PrivateRedis,
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
            assert 14_000 < await r.pttl(permit.key) <= 15_000  # the lease

            other = asyncio.create_task(b.acquire(1))
            await asyncio.sleep(0.3)
            assert not other.done()  # same bucket: waits, however long A takes to connect
            sent_at = loop.time()
            a.release(permit, sent_at)
            await asyncio.sleep(0.05)
            # The key now lives exactly until the window after the IDENTIFY has passed.
            window_ms = (WINDOW + IDENTIFY_MARGIN) * 1000
            assert window_ms - 150 < await r.pttl(permit.key) <= window_ms
            second = await asyncio.wait_for(other, t(5))
            got_at = loop.time()
            assert WINDOW + IDENTIFY_MARGIN <= got_at - sent_at < WINDOW + IDENTIFY_MARGIN + 0.6
            b.release(second, None)  # no IDENTIFY was sent: free at once
            await asyncio.sleep(0.05)
            assert await r.exists(permit.key) == 0
            started = loop.time()
            third = await a.acquire(0)
            assert loop.time() - started < 0.1
            a.release(third, None)


async def test_different_buckets_identify_together() -> None:
    loop = asyncio.get_running_loop()
    with cleanup(unique_prefix()) as prefix:
        async with open_gate(prefix, 2) as a, open_gate(prefix, 2) as b:
            started = loop.time()
            p0, p1 = await asyncio.gather(a.acquire(0), b.acquire(1))
            assert loop.time() - started < 0.2
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
            await r.set(f"{prefix}identify:0", "dead-host-token", nx=True, px=800)
        async with open_gate(prefix) as gate:
            started = loop.time()
            permit = await gate.acquire(0)
            assert 0.6 < loop.time() - started < 1.5
            gate.release(permit, None)


async def test_a_living_holder_renews_its_lease() -> None:
    with cleanup(unique_prefix()) as prefix:
        async with open_gate(prefix, lease=0.6) as a, open_gate(prefix) as b, raw_client() as r:
            permit = await a.acquire(0)
            waiter = asyncio.create_task(b.acquire(0))
            await asyncio.sleep(1.5)  # longer than two leases: a slow connect
            assert not waiter.done()
            assert await r.get(permit.key) == permit.token.encode()
            a.release(permit, None)
            b.release(await asyncio.wait_for(waiter, t(2)), None)


async def test_release_only_touches_a_key_that_is_still_ours() -> None:
    with cleanup(unique_prefix()) as prefix:
        async with open_gate(prefix) as gate, raw_client() as r:
            permit = await gate.acquire(0)
            # The lease ran out and another host took the bucket meanwhile.
            await r.set(permit.key, "someone-else", px=1000)
            gate.release(permit, None)
            await asyncio.sleep(0.1)
            assert await r.get(permit.key) == b"someone-else"
            assert await r.pttl(permit.key) > 800
            # And after an IDENTIFY: the other holder's key keeps its own expiry.
            permit = await asyncio.wait_for(gate.acquire(0), t(3))
            await r.set(permit.key, "someone-else", px=3000)
            gate.release(permit, asyncio.get_running_loop().time())
            await asyncio.sleep(0.1)
            assert await r.pttl(permit.key) > 2500


async def test_identifies_wait_while_redis_is_down(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    prefix = unique_prefix()
    async with open_gate(prefix, url=private_redis.url) as gate:
        private_redis.stop()
        waiting = [asyncio.create_task(gate.acquire(i)) for i in (0, 1)]
        await asyncio.sleep(1.5)
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
        budget = SessionBudget(total=10, remaining=1, reset_at=loop.time() + 0.8)
        local = LocalIdentifyGate(1, window=WINDOW, budget=budget)
        async with open_gate(prefix, local=local) as gate:
            permit = await gate.acquire(0)
            gate.release(permit, loop.time())
            assert budget.remaining == 0
            started = loop.time()
            permit = await gate.acquire(1)  # waits for the budget's reset, not only the window
            assert loop.time() - started >= 0.7
            gate.release(permit, None)
