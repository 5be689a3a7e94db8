"""The Redis shard store against a real Redis: key layout, TTLs, invalidation, outages."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from spectacles_gateway.protocol.shard import Session

from .gwproc import free_port
from .gwtest import t, wait_until
from .support.redis import (
    REDIS_URL,
    PrivateRedis,
    cleanup,
    keys_expire,
    keys_outlive_their_ttl,
    open_store,
    raw_client,
    settings_for,
    unique_prefix,
)

# The Redis helpers lived here once; test modules of older branches still import them from here.
__all__ = ["REDIS_URL", "PrivateRedis", "cleanup", "raw_client", "settings_for", "unique_prefix"]

SESSION = Session("0123456789abcdef", 42, "wss://resume.example/")


# ---------------------------------------------------------------------------------- layout


async def test_key_layout_values_and_ttl_are_the_seeds_plus_ours() -> None:
    with cleanup(unique_prefix()) as prefix:
        settings = settings_for(prefix, session_ttl=120)
        async with open_store(settings) as store, raw_client() as r:
            await store.save(3, 8, SESSION)
            found: Any = await r.keys(prefix + "*")
            keys = sorted(k.decode() for k in found)
            assert keys == sorted(
                f"{prefix}3{name}" for name in ("session", "seq", "resume_url", "shard_count")
            )
            assert await r.get(f"{prefix}3session") == b"0123456789abcdef"
            assert await r.get(f"{prefix}3seq") == b"42"
            assert await r.get(f"{prefix}3resume_url") == b"wss://resume.example/"
            assert await r.get(f"{prefix}3shard_count") == b"8"
            slack_ms = t(1.0) * 1000  # between the write and our read
            for key in keys:
                assert 120_000 - slack_ms < await r.pttl(key) <= 120_000
            assert await store.load(3, 8) == SESSION
            assert await store.load(4, 8) is None

            # A newer seq is written with a fresh TTL; no seq and no URL drop their keys.
            await r.pexpire(f"{prefix}3seq", 5000)
            await store.save(3, 8, Session(SESSION.session_id, 43, SESSION.resume_url))
            assert await r.get(f"{prefix}3seq") == b"43"
            assert await r.pttl(f"{prefix}3seq") > 120_000 - slack_ms
            await store.save(3, 8, Session("other", None, None))
            assert await r.exists(f"{prefix}3seq", f"{prefix}3resume_url") == 0
            assert await store.load(3, 8) == Session("other", None, None)


async def test_dead_session_and_other_shard_count_delete_the_keys() -> None:
    with cleanup(unique_prefix()) as prefix:
        async with open_store(settings_for(prefix)) as store, raw_client() as r:
            await store.save(0, 4, SESSION)
            await store.save(1, 4, SESSION)
            await store.save(0, 4, None)  # op 9 false, 4003/4007/4009
            assert await r.exists(*store.keys(0)) == 0
            assert await r.exists(*store.keys(1)) == 4
            assert await store.load(0, 4) is None

            assert await store.load(1, 5) is None  # resharded: identify, never resume
            assert await r.exists(*store.keys(1)) == 0
            assert await store.load(1, 4) is None


async def test_a_session_written_by_the_seed_is_resumed() -> None:
    with cleanup(unique_prefix()) as prefix:
        async with open_store(settings_for(prefix)) as store, raw_client() as r:
            await r.set(f"{prefix}7session", "seedsession")
            await r.set(f"{prefix}7seq", "1234")
            assert await store.load(7, 16) == Session("seedsession", 1234, None)
            # From then on it is ours: shard count and TTL are added (in the background).

            async def adopted() -> bool:
                return await r.exists(f"{prefix}7shard_count") == 1

            await wait_until(adopted, 5, "the shard count key")
            assert await r.get(f"{prefix}7shard_count") == b"16"
            assert await r.pttl(f"{prefix}7session") > 0
            await r.set(f"{prefix}9session", "x")
            await r.set(f"{prefix}9seq", "not a number")
            assert await store.load(9, 16) is None
            assert await r.exists(f"{prefix}9session") == 0


async def test_sessions_outlive_their_ttl_only_while_a_process_keeps_them() -> None:
    ttl = t(0.6)
    with cleanup(unique_prefix()) as prefix:
        settings = settings_for(prefix, session_ttl=ttl)
        async with open_store(settings) as store, raw_client() as r:
            await store.save(0, 1, SESSION)
            # A quiet shard: never saved again, its keys are refreshed for it.
            assert await keys_outlive_their_ttl(r, store.keys(0), ttl) >= 2
            assert await r.exists(*store.keys(0)) == 4
        # The process is gone: the session expires with its TTL (re-identify later).
        async with raw_client() as r:
            await keys_expire(r, store.keys(0), 0.6 + 1.0, "the keys to expire with their TTL")
            assert await r.exists(*store.keys(0)) == 0
        async with open_store(settings) as store:
            assert await store.load(0, 1) is None


async def test_a_loaded_session_that_never_changes_is_kept_alive() -> None:
    ttl = t(0.6)
    with cleanup(unique_prefix()) as prefix:
        settings = settings_for(prefix, session_ttl=ttl)
        async with open_store(settings) as store:
            await store.save(2, 4, SESSION)
        async with open_store(settings) as store, raw_client() as r:
            assert await store.load(2, 4) == SESSION
            assert await keys_outlive_their_ttl(r, store.keys(2), ttl) >= 2
            assert await r.exists(*store.keys(2)) == 4


# ---------------------------------------------------------------------------------- outages


async def test_redis_down_at_start_load_gives_up_quickly_for_every_shard(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nobody listens there
    secret = "pa55w0rd-" + uuid.uuid4().hex[:6]
    url = f"redis://:{secret}@127.0.0.1:{port}/0"
    settings = settings_for(unique_prefix(), url=url)
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    async with open_store(settings, startup_retry=0.5) as store:
        started = loop.time()
        loaded = [await store.load(i, 16) for i in range(16)]
        elapsed = loop.time() - started
        assert loaded == [None] * 16
        assert elapsed < t(2.0)
        before = loop.time()
        await store.save(0, 16, SESSION)  # never raises, returns at once
        assert loop.time() - before < t(0.5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("unreachable" in m for m in warnings) == 1, warnings
    assert len(warnings) <= 3, warnings  # one per outage, not one per shard
    assert secret not in caplog.text
    assert f"127.0.0.1:{port}" in caplog.text


async def test_saves_during_an_outage_are_written_when_redis_is_back(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    prefix = unique_prefix()
    settings = settings_for(prefix, url=private_redis.url, session_ttl=60)
    loop = asyncio.get_running_loop()
    async with open_store(settings) as store, raw_client(private_redis.url) as r:
        await store.save(0, 2, SESSION)
        await store.save(1, 2, SESSION)
        private_redis.stop(save=False)
        for seq in range(43, 60):  # a second of a busy shard, the worker saving each round
            before = loop.time()
            await store.save(0, 2, Session(SESSION.session_id, seq, SESSION.resume_url))
            assert loop.time() - before < t(1.0)
        await store.save(1, 2, None)
        private_redis.start()  # empty: everything was lost with it
        await wait_until(lambda: not store.outage.down, 10, "the store to reconnect")

        async def caught_up() -> bool:
            return await r.get(f"{prefix}0seq") == b"59"

        await wait_until(caught_up, 10, "the stored seq to catch up")
        assert await r.exists(*store.keys(1)) == 0
        assert await store.load(0, 2) == Session(SESSION.session_id, 59, SESSION.resume_url)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert any("reachable again" in m for m in messages)


async def test_keys_lost_with_a_restarted_redis_come_back(private_redis: PrivateRedis) -> None:
    prefix = unique_prefix()
    settings = settings_for(prefix, url=private_redis.url, session_ttl=t(0.9))
    async with open_store(settings) as store, raw_client(private_redis.url) as r:
        await store.save(5, 6, SESSION)  # a quiet shard: the worker will not save it again
        private_redis.stop(save=False)
        private_redis.start()
        # Read before the loop runs again: the store cannot have written meanwhile.
        assert private_redis.exists(*store.keys(5)) == 0

        async def back() -> bool:
            return await r.exists(*store.keys(5)) == 4

        await wait_until(back, 5, "the keys to be written again")
        assert await store.load(5, 6) == SESSION


async def test_a_unix_socket_url_works(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        await wait_until(path.exists, 5, "the socket")
        prefix = unique_prefix()
        async with open_store(settings_for(prefix, url=f"unix://{path}")) as store:
            await store.save(0, 1, SESSION)
            assert await store.load(0, 1) == SESSION
    finally:
        server.kill()
        server.wait()
