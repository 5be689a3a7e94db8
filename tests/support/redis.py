"""Helpers for the tests that use Redis: unique key prefixes, settings, clients, a private
``redis-server`` that a test may stop and start (never the machine's 6379), and observers that
turn "Redis did (not) do X" into something a test can wait for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from spectacles_gateway.config import RedisSettings, SecretStr, Settings, ShardStoreSettings
from spectacles_gateway.redis_link import redis_client
from spectacles_gateway.redis_store import RedisStore

from ..gwproc import free_port
from ..gwtest import t, wait_until

REDIS_URL = os.environ.get("TEST_REDIS_URL", "127.0.0.1:6379")

__all__ = [
    "REDIS_URL",
    "PrivateRedis",
    "Replies",
    "cleanup",
    "delete_prefix",
    "keys_expire",
    "keys_outlive_their_ttl",
    "open_store",
    "private_redis_server",
    "raw_client",
    "settings_for",
    "unique_prefix",
]


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
        self.process.wait(timeout=t(10))
        self.process = None

    def exists(self, *keys: str) -> int:
        """How many of ``keys`` exist, read synchronously: nothing else on the test's event
        loop can write in between."""
        client = redis.Redis(port=self.port)
        try:
            return int(client.exists(*keys))
        finally:
            client.close()

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


def private_redis_server() -> Iterator[PrivateRedis]:
    """The body of the ``private_redis`` fixture (``conftest.py``)."""
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


class Replies:
    """Every reply that ``client`` received to ``command``, with the loop time it arrived.

    A test that must show that a client was turned away ("B still waits") waits for B's next
    reply instead of sleeping: the reply is the proof that B asked, and what it was told.
    Uses redis-py's public response callbacks; the reply itself is passed on unchanged.
    """

    def __init__(self, client: Redis, command: str) -> None:
        self.seen: list[tuple[float, Any]] = []
        loop = asyncio.get_running_loop()
        previous = client.response_callbacks.get(command)

        def record(response: Any, **options: Any) -> Any:
            self.seen.append((loop.time(), response))
            return previous(response, **options) if previous is not None else response

        client.set_response_callback(command, record)

    def __len__(self) -> int:
        return len(self.seen)

    def after(self, when: float) -> list[Any]:
        """Replies that arrived after loop time ``when``."""
        return [reply for at, reply in self.seen if at > when]


async def _pttls(r: Redis, keys: Sequence[str]) -> list[int]:
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    return [int(ms) for ms in await pipe.execute()]


async def keys_outlive_their_ttl(
    r: Redis, keys: Sequence[str], ttl: float, *, renewals: int = 2
) -> int:
    """Watch ``keys`` (written with a TTL of ``ttl`` seconds, about now) until they have been
    renewed ``renewals`` times and have lived for longer than two TTLs; fail as soon as one
    of them is missing or has no TTL. Returns the renewals seen.

    A renewal is a reading of the first key's PTTL above the one before (its TTL was written
    again). This is the positive signal behind "the keys did not expire": they were seen alive
    after their first deadline had passed, twice over, and were seen being kept alive.
    """
    loop = asyncio.get_running_loop()
    until = loop.time() + 2 * ttl
    deadline = until + t(5)  # ``ttl`` is the store's own, scaled where it was configured
    seen = 0
    last: int | None = None
    while True:
        pttls = await _pttls(r, keys)
        assert min(pttls) > 0, dict(zip(keys, pttls, strict=True))  # -2: gone, -1: no TTL
        if last is not None and pttls[0] > last:
            seen += 1
        last = pttls[0]
        if seen >= renewals and loop.time() > until:
            return seen
        assert loop.time() < deadline, f"{seen} renewals of {keys[0]}, not {renewals}"
        await asyncio.sleep(0.01)


async def keys_expire(r: Redis, keys: Sequence[str], within: float, what: str) -> None:
    """Wait until none of ``keys`` exists; ``within`` is the unscaled bound."""

    async def gone() -> bool:
        return int(await r.exists(*keys)) == 0

    await wait_until(gone, within, what)
