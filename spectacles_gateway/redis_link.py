"""Connections to Redis, shared by every Redis user (the shard store, the identify gate, the
streams broker, the fleet agent): :func:`redis_client` for a plain URL or a Sentinel set (whose
client follows the master through a failover), replica acknowledgements (``WAIT``) for writes
a failover must not lose, and :class:`Outage` for one warning per outage with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from .protocol.backoff import backoff_delay
from .redact import redact_url

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "REDIS_ERRORS",
    "REPLICA_WAIT_MS",
    "SOCKET_TIMEOUT",
    "NotReplicated",
    "Outage",
    "check_replicated",
    "describe_error",
    "master_changes",
    "redis_client",
    "waits_for_replica",
]

log = logging.getLogger("spectacles_gateway.redis_store")

#: What a Redis outage looks like to a caller (refused, reset, timed out, loading, ...).
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
#: Seconds to open a TCP connection to Redis.
CONNECT_TIMEOUT = 2.0
#: Seconds a (non-blocking) command may take before the connection counts as dead.
SOCKET_TIMEOUT = 5.0
#: Seconds to wait for a free pooled connection.
POOL_TIMEOUT = 5.0
#: Idle connections are checked with a PING before use after this many seconds.
HEALTH_CHECK_INTERVAL = 15


def redis_client(
    settings: Settings, *, max_connections: int | None = None, name: str | None = None
) -> Redis:
    """A client for ``settings.redis`` with a pool of ``redis.pool_size`` connections (or
    ``max_connections``). Nothing connects until the first command.

    A command that meets a dead pooled connection (Redis restarted) reconnects and retries twice
    with a short jittered backoff; anything longer is an outage for the caller to handle.
    """
    redis = settings.redis
    common: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
        "client_name": name,
    }
    if redis.sentinels:
        return _sentinel_client(settings, common, max_connections or redis.pool_size)
    dsn = redis.dsn
    options: dict[str, Any] = {}
    if not dsn.startswith("unix:"):
        options["socket_keepalive"] = True  # TCP only
    pool = BlockingConnectionPool.from_url(
        dsn,
        max_connections=max_connections or redis.pool_size,
        timeout=POOL_TIMEOUT,
        **common,
        **options,
    )
    return Redis.from_pool(pool)


#: Seconds between two checks of a Sentinel client that the master it writes to is still the
#: one the Sentinels name (:class:`_FollowingPool`).
MASTER_CHECK_INTERVAL = 0.5


class _MasterConnection(SentinelManagedConnection):
    """A connection to the master that asks its pool where the master is whenever it
    connects, reconnects included.

    redis-py's Sentinel connection asks only in :meth:`connect`; a command that meets a dead
    socket reconnects through :meth:`connect_check_health` (``send_packed_command``), to the
    host and port it had: the old master, which still takes writes for seconds after a
    ``SENTINEL FAILOVER``, and which the Sentinels close every connection to once they demote
    it (so a retried write lands there, acknowledged, and is lost)."""

    connection_pool: _FollowingPool

    async def _connect_retry(self) -> None:
        if self.is_connected:
            return
        await self.connect_check_health(
            check_health=self.connection_pool.check_connection, retry_socket_connect=False
        )

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


class _FollowingPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel pool that follows the master between connections too. Blocking, like the
    pool without Sentinel: a command waits up to :data:`POOL_TIMEOUT` for a free connection
    (redis-py's Sentinel pool refuses at once: "Too many connections").

    redis-py asks the Sentinels where the master is only when it opens a connection. After a
    ``SENTINEL FAILOVER`` the old master keeps answering (and accepting writes that the new
    master never sees) until the Sentinels turn it into a replica, seconds later; a pooled
    connection would go on writing there. So at most every :data:`MASTER_CHECK_INTERVAL`
    seconds, when a connection is taken, a background task asks the Sentinels; when they name
    another master, :attr:`master_changes` grows (the shard store then writes its sessions
    again, to the new master, in case the old one took writes it never passed on). The same
    check counts the replicas the Sentinels know alive (:func:`waits_for_replica`).

    What a caller may rely on: while :attr:`master_changes` stays the same, every command goes
    to the master it names. A move is counted in the same step as the pool stops handing out
    connections to the old master (:meth:`_moved`), every connection (re)connects to the
    master the Sentinels name at that time (:class:`_MasterConnection`), and one that is not
    connected to :attr:`master_address` when taken reconnects (:meth:`ensure_connection`). So a
    write acknowledged with no change counted between a reading taken before it and one taken
    after it went to the master of the second reading.
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        kwargs.setdefault("connection_class", _MasterConnection)
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        #: How many times the master changed under this pool (the first one found is 0).
        self.master_changes = 0
        #: Replicas the Sentinels knew alive at the last check (None: not asked yet).
        self.live_replicas: int | None = None
        self._checked_at = 0.0
        self._check: asyncio.Task[None] | None = None

    async def get_master_address(self) -> tuple[str, int]:
        """Where the master is (asked when a connection opens); a change is a move."""
        address = await self._discover()
        if address != self.master_address:
            await self._moved(address)
        return address

    async def _discover(self) -> tuple[str, int]:
        """The master as the first Sentinel that answers names it (``SENTINEL
        GET-MASTER-ADDR-BY-NAME``: it names the promoted replica as soon as that one took the
        role, where redis-py's ``SENTINEL MASTERS`` keeps the old master until the end of the
        failover, a few hundred milliseconds later, or seconds with other replicas)."""
        errors: list[str] = []
        sentinels = self.sentinel_manager.sentinels
        for i, sentinel in enumerate(sentinels):
            try:
                address = await sentinel.sentinel_get_master_addr_by_name(self.service_name)
            except REDIS_ERRORS as exc:
                errors.append(describe_error(exc))
                continue
            if address:
                sentinels[0], sentinels[i] = sentinel, sentinels[0]  # asked first next time
                return _address(address)
        raise MasterNotFoundError(
            f"no Sentinel names a master {self.service_name!r}" + "".join(f"; {e}" for e in errors)
        )

    async def _moved(self, address: tuple[str, int]) -> None:
        """The master is now at ``address`` (the first one found is no move). In one step (no
        await): count the move, take the idle connections out of the pool (redis-py's
        ``disconnect`` leaves them in it, connected until their socket is closed, so a command
        could take one and write to the old master), and mark the busy ones to be closed when
        released. Then close the idle ones, without waiting for their sockets: out of the pool,
        a close that a cancellation interrupted would leave them open."""
        before, self.master_address = self.master_address, address
        if before is None:
            return
        idle, self._available_connections = self._available_connections, []
        for connection in self._in_use_connections:
            connection.mark_for_reconnect()  # type: ignore[no-untyped-call]
        self.master_changes += 1
        log.warning(
            "Redis Sentinel: master %r moved from %s:%s to %s:%s",
            self.service_name,
            *before,
            *address,
        )
        for connection in idle:
            with contextlib.suppress(*REDIS_ERRORS):
                await connection.disconnect(nowait=True)

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._checked_at >= MASTER_CHECK_INTERVAL and self._check is None:
            self._checked_at = now
            self._check = loop.create_task(self._follow(), name="redis-sentinel-follow")
        await super().ensure_connection(connection)
        if isinstance(connection, _MasterConnection) and (
            (connection.host, connection.port) != self.master_address  # see the class
        ):
            await connection.disconnect()
            await connection.connect()  # type: ignore[no-untyped-call]

    async def _follow(self) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                # Replicas first: should the master move in between, we count those of the old
                # one (and wait for a replica in vain, then ask again) rather than skip the wait
                # on the old master because the new one has none yet.
                self.live_replicas = await self._in_sync_replicas(self.sentinel_manager.sentinels)
                address = await self._discover()
            if self.master_address is None or address == self.master_address:
                return
            await self._moved(address)
        except REDIS_ERRORS as exc:  # no Sentinel answers: keep what we have
            log.debug("Redis Sentinel: master %r not checked (%s)", self.service_name, exc)
        finally:
            self._check = None

    async def _in_sync_replicas(self, sentinels: list[Redis]) -> int:
        """Replicas of the master that a Sentinel knows alive and in sync (it reports itself
        a replica with its link up): those a failover could promote. The first Sentinel that
        answers says; RedisError when none does."""
        error: BaseException | None = None
        for sentinel in sentinels:
            try:
                replicas = await sentinel.sentinel_slaves(self.service_name)
            except REDIS_ERRORS as exc:
                error = exc
                continue
            return sum(1 for r in replicas if _in_sync(r))
        raise error if error is not None else RedisError("no Sentinel")

    async def alone(self, since: int) -> bool:
        """Whether the master is alone, so a write it took without a replica's acknowledgement
        cannot be lost to a failover: every Sentinel that answers names the master this pool
        writes to (and has named it since ``since``, a :attr:`master_changes` reading taken
        before the write), and none knows a replica of it alive and in sync."""
        answered = False
        for sentinel in self.sentinel_manager.sentinels:
            try:
                named = await sentinel.sentinel_get_master_addr_by_name(self.service_name)
                replicas = await sentinel.sentinel_slaves(self.service_name)
            except REDIS_ERRORS:
                continue
            answered = True
            if not named or _address(named) != self.master_address:
                return False
            if any(_in_sync(r) for r in replicas):
                return False
        return answered and self.master_changes == since

    async def stop_following(self) -> None:
        task, self._check = self._check, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *REDIS_ERRORS):
                await task


def _address(named: Any) -> tuple[str, int]:
    host, port = named
    return (host.decode() if isinstance(host, bytes) else str(host)), int(port)


def _in_sync(replica: dict[str, Any]) -> bool:
    """A replica in a Sentinel's ``SENTINEL REPLICAS`` answer that a failover could promote."""
    return (
        not replica.get("is_sdown")
        and not replica.get("is_odown")
        and replica.get("role-reported") == "slave"
        and replica.get("master-link-status") == "ok"
    )


class _SentinelRedis(Redis):
    """A client of the Sentinels' master that also closes its connections to the Sentinels."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        if isinstance(pool, _FollowingPool):
            await pool.stop_following()
        await super().aclose(close_connection_pool)
        sentinel, self.sentinel_manager = self.sentinel_manager, None
        if sentinel is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await sentinel.aclose()


def _sentinel_client(settings: Settings, common: dict[str, Any], max_connections: int) -> Redis:
    """The client of :func:`redis_client` with Sentinel: it asks the Sentinels where the master
    is, and follows it through a failover (:class:`_FollowingPool`); while there is no master
    (the Sentinels have not agreed on a new one yet) commands fail as an outage does."""
    redis = settings.redis
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(redis.sentinels),
        sentinel_kwargs={
            "socket_timeout": CONNECT_TIMEOUT,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            # One try per Sentinel: a dead one is skipped for the next, not retried with
            # redis-py's default backoff (seconds).
            "retry": Retry(NoBackoff(), retries=0),
        },
        username=redis.username,
        password=redis.password,
        db=redis.db,
        **common,
    )
    client: _SentinelRedis = sentinel.master_for(
        redis.sentinel_master,
        redis_class=_SentinelRedis,
        connection_pool_class=_FollowingPool,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT,
    )
    client.sentinel_manager = sentinel
    return client


def master_changes(client: Redis) -> int:
    """How many times the master of a Sentinel client moved (always 0 without Sentinel)."""
    pool = client.connection_pool
    return pool.master_changes if isinstance(pool, _FollowingPool) else 0


#: Milliseconds a write of the broker (the fleet: less) waits for a replica (Sentinel only).
REPLICA_WAIT_MS = 1000


class NotReplicated(RedisError):
    """The master took a write that no replica acknowledged while the Sentinels know a live
    replica: a failover could lose it (the master may already be a former one), so the caller
    treats it as not done."""


def waits_for_replica(client: Redis) -> int | None:
    """Whether a write through ``client`` that must survive a failover is to be followed by
    ``WAIT 1``, and :func:`check_replicated`: None when not (no Sentinel, so no failover to
    survive; or the Sentinels knew no replica in sync at the last check, so nothing to wait
    for), else :func:`master_changes` now, for :func:`check_replicated`."""
    pool = client.connection_pool
    if not isinstance(pool, _FollowingPool) or pool.live_replicas == 0:
        return None
    return pool.master_changes


async def check_replicated(client: Redis, acks: int, since: int) -> None:
    """After ``WAIT 1 <ms>`` answered ``acks`` (``since``: what
    :func:`waits_for_replica` returned before the write): return when the write survives a
    failover, raise :class:`NotReplicated` otherwise. It does when a replica acknowledged it,
    or when the master is alone (:meth:`_FollowingPool.alone`: a master whose replica died,
    or a new master whose old one is not its replica yet).

    Asynchronous replication loses what the master acknowledged and did not pass on: right
    after a ``SENTINEL FAILOVER`` the old master still answers, and what it takes is gone once
    it is made a replica."""
    pool = client.connection_pool
    if acks >= 1 or not isinstance(pool, _FollowingPool):
        return
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            alone = await pool.alone(since)
    except REDIS_ERRORS as exc:
        raise NotReplicated(f"no replica acknowledged, and no Sentinel answered ({exc})") from exc
    if not alone:
        raise NotReplicated(
            "no replica acknowledged the write, and the master has a replica in sync or was "
            "just replaced"
        )


@dataclass
class Outage:
    """Tracks whether Redis is reachable for one component, with one warning per outage and a
    backoff before the next attempt (:func:`~spectacles_gateway.protocol.backoff.backoff_delay`).
    """

    what: str  # "shard store", "identify gate", "broker": the start of every log line
    url: str  # for logs; redacted here
    base: float = 0.25
    cap: float = 5.0
    failures: int = 0
    down_since: float | None = None
    retry_at: float = 0.0
    rand: random.Random = field(default_factory=random.Random)

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, now: float, exc: BaseException, detail: str = "") -> float:
        """Record a failure; returns the delay before the next attempt."""
        self.failures += 1
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "%s: Redis at %s is unreachable (%s)%s",
                self.what,
                redact_url(self.url),
                describe_error(exc),
                detail,
            )
        delay = backoff_delay(self.failures, self.rand.random(), base=self.base, cap=self.cap)
        self.retry_at = now + delay
        return delay

    def succeeded(self, now: float, detail: str = "") -> bool:
        """Record a success; True when it ends an outage."""
        self.failures = 0
        self.retry_at = 0.0
        since, self.down_since = self.down_since, None
        if since is None:
            return False
        log.info(
            "%s: Redis at %s is reachable again after %.1f s%s",
            self.what,
            redact_url(self.url),
            now - since,
            detail,
        )
        return True


def describe_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
