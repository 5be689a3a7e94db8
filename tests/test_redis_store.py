"""The Redis shard store against a real Redis: key layout, TTLs, invalidation, outages.

Also home of the helpers the other Redis tests share: unique key prefixes, settings, and a
private ``redis-server`` that a test may stop and start (never the machine's 6379).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from spectacles_gateway.config import RedisSettings, SecretStr, Settings, ShardStoreSettings
from spectacles_gateway.protocol.shard import Session
from spectacles_gateway.redis_store import RedisStore, redis_client

from .gwtest import t, wait_until

REDIS_URL = os.environ.get("TEST_REDIS_URL", "127.0.0.1:6379")


def unique_prefix(tag: str = "test") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}:"


def settings_for(prefix: str, url: str = REDIS_URL, **store: Any) -> Settings:
    return Settings(
        token=SecretStr("x"),
        shard_store=ShardStoreSettings(type="redis", prefix=prefix, **store),
        redis=RedisSettings(url=url, stream_prefix=prefix),
    )


def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    client = redis.Redis.from_url(RedisSettings(url=url).dsn)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextlib.contextmanager
def cleanup(prefix: str, url: str = REDIS_URL) -> Iterator[str]:
    try:
        yield prefix
    finally:
        delete_prefix(prefix, url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of our own on a free port, that tests stop and start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is needed for these tests"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--dbfilename",
                "dump.rdb",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + t(10)
        while True:
            try:
                client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self, *, save: bool = False) -> None:
        """Shut down; with ``save`` the data comes back on the next :meth:`start` (a restart
        of a persistent Redis), otherwise it is gone (the machine's Redis keeps nothing)."""
        if self.process is None:
            return
        if not save:
            (self.dir / "dump.rdb").unlink(missing_ok=True)
        client = redis.Redis(port=self.port, retry=Retry(NoBackoff(), 0))
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(save=save, nosave=not save)
        client.close()
        self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


def private_redis_server() -> Iterator[PrivateRedis]:
    """The body of each module's ``private_redis`` fixture."""
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.close()


@contextlib.asynccontextmanager
async def open_store(settings: Settings, **kwargs: Any) -> AsyncIterator[RedisStore]:
    store = RedisStore(
        redis_client(settings),
        prefix=settings.shard_store.prefix,
        session_ttl=settings.shard_store.session_ttl,
        url=settings.redis.url,
        **kwargs,
    )
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def raw_client(url: str = REDIS_URL) -> AsyncIterator[Redis]:
    """A plain client for the test's own reads and writes (it survives Redis restarts)."""
    client = redis_client(settings_for("unused:", url=url))
    try:
        yield client
    finally:
        await client.aclose()


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
            for key in keys:
                assert 119_000 < await r.pttl(key) <= 120_000
            assert await store.load(3, 8) == SESSION
            assert await store.load(4, 8) is None

            # A newer seq is written with a fresh TTL; no seq and no URL drop their keys.
            await r.pexpire(f"{prefix}3seq", 5000)
            await store.save(3, 8, Session(SESSION.session_id, 43, SESSION.resume_url))
            assert await r.get(f"{prefix}3seq") == b"43"
            assert await r.pttl(f"{prefix}3seq") > 119_000
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
            # From then on it is ours: shard count and TTL are added.
            await asyncio.sleep(0.05)
            assert await r.get(f"{prefix}7shard_count") == b"16"
            assert await r.pttl(f"{prefix}7session") > 0
            await r.set(f"{prefix}9session", "x")
            await r.set(f"{prefix}9seq", "not a number")
            assert await store.load(9, 16) is None
            assert await r.exists(f"{prefix}9session") == 0


async def test_sessions_outlive_their_ttl_only_while_a_process_keeps_them() -> None:
    with cleanup(unique_prefix()) as prefix:
        settings = settings_for(prefix, session_ttl=0.6)
        async with open_store(settings) as store, raw_client() as r:
            await store.save(0, 1, SESSION)
            # A quiet shard: never saved again, its keys are refreshed for it.
            await asyncio.sleep(1.5)
            assert await r.exists(*store.keys(0)) == 4
        # The process is gone: the session expires with its TTL (re-identify later).
        await asyncio.sleep(0.8)
        async with raw_client() as r:
            assert await r.exists(*store.keys(0)) == 0
        async with open_store(settings) as store:
            assert await store.load(0, 1) is None


async def test_a_loaded_session_that_never_changes_is_kept_alive() -> None:
    with cleanup(unique_prefix()) as prefix:
        settings = settings_for(prefix, session_ttl=0.6)
        async with open_store(settings) as store:
            await store.save(2, 4, SESSION)
        async with open_store(settings) as store, raw_client() as r:
            assert await store.load(2, 4) == SESSION
            await asyncio.sleep(1.5)
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
        assert loop.time() - before < 0.5
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
            assert loop.time() - before < 1.0
        await store.save(1, 2, None)
        private_redis.start()  # empty: everything was lost with it
        await wait_until(lambda: not store.outage.down, 10, "the store to reconnect")

        async def stored_seq() -> bytes | str | None:
            return await r.get(f"{prefix}0seq")

        deadline = loop.time() + t(10)
        while await stored_seq() != b"59":
            assert loop.time() < deadline, "the stored seq did not catch up"
            await asyncio.sleep(0.05)
        assert await r.exists(*store.keys(1)) == 0
        assert await store.load(0, 2) == Session(SESSION.session_id, 59, SESSION.resume_url)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert any("reachable again" in m for m in messages)


async def test_keys_lost_with_a_restarted_redis_come_back(private_redis: PrivateRedis) -> None:
    prefix = unique_prefix()
    settings = settings_for(prefix, url=private_redis.url, session_ttl=0.9)
    async with open_store(settings) as store, raw_client(private_redis.url) as r:
        await store.save(5, 6, SESSION)  # a quiet shard: the worker will not save it again
        private_redis.stop(save=False)
        private_redis.start()
        assert await r.exists(*store.keys(5)) == 0
        deadline = asyncio.get_running_loop().time() + t(5)
        while await r.exists(*store.keys(5)) != 4:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
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
