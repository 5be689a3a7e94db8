"""The Redis shard store: sessions that outlive processes and hosts.

Key layout, per shard (``prefix`` is ``[shard_store] prefix``, default ``gateway``)::

    <prefix><id>session      session id            (the seed's key)
    <prefix><id>seq          last confirmed seq    (the seed's key; absent while there is none)
    <prefix><id>resume_url   resume_gateway_url    (absent while there is none)
    <prefix><id>shard_count  shard count the session was identified with

All four are written at once by one Lua script, with a TTL of ``[shard_store] session_ttl``: a
gateway that stays away longer than that re-identifies, as Discord would refuse the resume
anyway. In fleet mode every write carries the writer's lease epoch, and the script refuses it
when the shard's stored epoch (``<prefix>fleet:<name>:epoch:<id>``) is newer: a member that was
paused past its lease can never overwrite the new owner's session. A
background task rewrites every live session every third of the TTL, so a quiet shard (whose seq
does not move, so the worker does not save it) keeps its keys, and keys that a restarted Redis
lost come back.

Outages never stop shards: :meth:`RedisStore.save` keeps the latest state in memory and returns;
the background task writes it once Redis answers again (one warning per outage, with backoff).
:meth:`RedisStore.load` retries for a few seconds after start-up, then gives up (None: the shard
identifies). Connections, Sentinel, replica acknowledgements and outages: :mod:`.redis_link`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from .fleet.keys import FleetKeys
from .generation import (
    POINT_SCRIPT,
    Pointer,
    format_pointer,
    parse_pointer,
    pointer_key,
    session_prefix,
)
from .protocol.state import Session
from .redis_link import (
    REDIS_ERRORS,
    SOCKET_TIMEOUT,
    Outage,
    describe_error,
    master_changes,
    redis_client,
)

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["RedisStore", "read_pointer"]

log = logging.getLogger(__name__)


def _text(value: bytes | str | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


@dataclass
class _Entry:
    shard_count: int
    session: Session | None  # None: delete the keys
    version: int = 0
    dirty: bool = True
    epoch: int = 0  # fleet: the lease epoch we hold the shard under (0: not fenced)


# KEYS: session, seq, resume_url, shard_count, epoch. ARGV: epoch (0: unfenced), ttl (ms),
# then a flag and a value each for session id, seq and resume URL, then the shard count.
# Returns 0 (and writes nothing) when the stored epoch is newer than ours.
_WRITE = """
local mine = tonumber(ARGV[1])
if mine > 0 and tonumber(redis.call('GET', KEYS[5]) or '0') > mine then
  return 0
end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  return 1
end
local ttl = ARGV[2]
redis.call('SET', KEYS[1], ARGV[4], 'PX', ttl)
for i = 0, 1 do
  if ARGV[5 + 2 * i] == '1' then
    redis.call('SET', KEYS[2 + i], ARGV[6 + 2 * i], 'PX', ttl)
  else
    redis.call('DEL', KEYS[2 + i])
  end
end
redis.call('SET', KEYS[4], ARGV[9], 'PX', ttl)
return 1
"""


async def read_pointer(settings: Settings) -> Pointer | None:
    """The current generation as the Redis store records it (None: none recorded yet)."""
    client = redis_client(settings, max_connections=1, name="spectacles-generation")
    try:
        async with asyncio.timeout(SOCKET_TIMEOUT):
            raw = await client.get(pointer_key(settings.shard_store.prefix))
    finally:
        await client.aclose()
    return parse_pointer(raw)


class RedisStore:
    """Sessions in Redis (``[shard_store] type = "redis"``); see the module docstring."""

    persistent = True

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "gateway",
        session_ttl: float = 300.0,
        url: str = "",
        startup_retry: float = 5.0,
        op_timeout: float = 3.0,
        refresh_interval: float | None = None,
        fleet: FleetKeys | None = None,
        generation: int = 0,
    ) -> None:
        self.client = client
        self.base_prefix = prefix
        self.generation = generation
        self.prefix = session_prefix(prefix, generation)
        self.fleet = fleet
        self.ttl_ms = max(1, round(session_ttl * 1000))
        #: Seconds after :meth:`start` during which :meth:`load` keeps retrying an outage.
        self.startup_retry = startup_retry
        self.op_timeout = op_timeout
        self.refresh_interval = (
            refresh_interval
            if refresh_interval is not None
            else min(60.0, max(0.1, session_ttl / 3))
        )
        self.outage = Outage("shard store", url)
        self._entries: dict[int, _Entry] = {}
        self._lock = asyncio.Lock()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._startup_deadline: float | None = None
        self._gave_up = False
        self._closing = False
        self._write_script = client.register_script(_WRITE)
        self._point_script = client.register_script(POINT_SCRIPT)
        #: Writes the store refused because a newer epoch owns the shard (fleet mode).
        self.fenced = 0
        self._masters_seen = 0  # :func:`master_changes` of the client at our last write

    @classmethod
    def from_settings(cls, settings: Settings, generation: int = 0) -> RedisStore:
        prefix = settings.shard_store.prefix
        fleet = settings.fleet.name
        return cls(
            redis_client(settings, name="spectacles-store"),
            prefix=prefix,
            session_ttl=settings.shard_store.session_ttl,
            url=settings.redis.url,
            fleet=FleetKeys(prefix, fleet, generation) if fleet else None,
            generation=generation,
        )

    async def point_to(self, pointer: Pointer) -> bool:
        """Record ``pointer`` as the current generation (a reshard switched to it), so a
        restart runs it; never moves the pointer back. False when Redis did not take it."""
        key = pointer_key(self.base_prefix)
        try:
            async with asyncio.timeout(self.op_timeout):
                await self._point_script(
                    keys=[key], args=[pointer.generation, format_pointer(pointer)]
                )
        except REDIS_ERRORS as exc:
            log.warning(
                "shard store: the switch to generation %d (%d shards) was not recorded (%s): "
                "a restart would run the shard count of the settings",
                pointer.generation,
                pointer.shard_count,
                describe_error(exc),
            )
            return False
        return True

    @property
    def closing(self) -> bool:
        return self._closing

    def keys(self, shard_id: int) -> tuple[str, str, str, str]:
        """``(session, seq, resume_url, shard_count)`` keys of a shard."""
        base = f"{self.prefix}{shard_id}"
        return f"{base}session", f"{base}seq", f"{base}resume_url", f"{base}shard_count"

    # ------------------------------------------------------------------ ShardStore

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._startup_deadline = loop.time() + self.startup_retry
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._keeper(), name="redis-store-keeper")

    async def load(self, shard_id: int, shard_count: int) -> Session | None:
        """The shard's stored session, or None (none, expired, other shard count, or Redis
        unreachable for the start-up grace period)."""
        loop = asyncio.get_running_loop()
        deadline = self._startup_deadline if self._startup_deadline is not None else loop.time()
        keys = self.keys(shard_id)
        while True:
            now = loop.time()
            # After the grace period, a shard does not wait for an outage already known.
            late = now >= deadline and self.outage.down
            if now >= self.outage.retry_at and not late:
                try:
                    async with asyncio.timeout(self.op_timeout):
                        values = await self.client.mget(keys)
                except REDIS_ERRORS as exc:
                    self.outage.failed(
                        loop.time(), exc, "; shards without a stored session identify"
                    )
                else:
                    self.outage.succeeded(loop.time())
                    self._gave_up = False
                    return await self._parse(shard_id, shard_count, values)
            now = loop.time()
            if now >= deadline:
                level = logging.DEBUG if self._gave_up else logging.WARNING
                self._gave_up = True
                log.log(
                    level,
                    "shard %d: stored session unknown (no answer from Redis): it identifies",
                    shard_id,
                )
                return None
            await asyncio.sleep(max(0.01, min(self.outage.retry_at, deadline) - now))

    async def save(
        self, shard_id: int, shard_count: int, session: Session | None, *, epoch: int = 0
    ) -> None:
        """Remember the shard's session (None: forget it) and write it; during an outage the
        write happens when Redis is back. Never raises for an outage. ``epoch``: see
        :meth:`ShardStore.save`."""
        entry = self._entries.get(shard_id)
        if entry is None:
            # None: nothing of ours to delete, but another process (or our previous life) may
            # have left keys behind: delete them once.
            entry = self._entries[shard_id] = _Entry(shard_count, session, epoch=epoch)
        else:
            entry.shard_count = shard_count
            entry.session = session
            entry.dirty = True
            entry.version += 1
            entry.epoch = epoch
        if self.outage.down:
            self._kick()
            return
        await self._write([shard_id])

    def forget(self, shard_id: int) -> None:
        """Stop refreshing the shard's keys (it went to another member: its TTL runs out
        there unless the new owner writes it)."""
        self._entries.pop(shard_id, None)

    async def aclose(self) -> None:
        """Write what is still unwritten (one try, bounded) and disconnect."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            self._kick()
            _, pending = await asyncio.wait({task}, timeout=self.op_timeout + 1.0)
            for late in pending:  # a flag first: redis-py can swallow a cancellation
                late.cancel()
                await asyncio.wait({late}, timeout=1.0)
        if any(e.dirty for e in self._entries.values()):
            self.outage.retry_at = 0.0
            await self._write(None)
            unwritten = [i for i, e in self._entries.items() if e.dirty]
            if unwritten:
                log.warning(
                    "shard store: sessions of shards %s could not be written before exit",
                    ",".join(map(str, unwritten)),
                )
        await self.client.aclose()

    # ------------------------------------------------------------------ internals

    async def _parse(
        self, shard_id: int, shard_count: int, values: list[bytes | str | None]
    ) -> Session | None:
        raw_session, raw_seq, raw_url, raw_count = (_text(v) for v in values)
        if raw_session is None:
            return None
        session_id = raw_session
        try:
            seq = int(raw_seq) if raw_seq is not None else None
            count = int(raw_count) if raw_count is not None else None
        except ValueError:
            log.warning("shard %d: stored session is malformed; it will identify", shard_id)
            await self.save(shard_id, shard_count, None)
            return None
        if count is not None and count != shard_count:
            log.info(
                "shard %d: stored session %s… was made with %d shards, not %d: it will identify",
                shard_id,
                session_id[:8],
                count,
                shard_count,
            )
            await self.save(shard_id, shard_count, None)
            return None
        session = Session(session_id, seq, raw_url)
        # Keep refreshing its TTL even if the shard never saves it again (no new events).
        self._entries[shard_id] = _Entry(shard_count, session, dirty=count is None)
        if count is None:  # written by the seed: add our keys and the TTL
            self._kick()
        return session

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _write(self, shard_ids: list[int] | None) -> bool:
        """Write the entries of ``shard_ids`` (None: every dirty one), all in one MULTI/EXEC.
        Returns False on an outage (the entries stay dirty)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._follow_master():
                shard_ids = None  # every one of them
            if shard_ids is None:
                shard_ids = [i for i, e in self._entries.items() if e.dirty]
            todo = [(i, self._entries[i]) for i in shard_ids if i in self._entries]
            if not todo:
                return True
            versions = [e.version for _, e in todo]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for shard_id, entry in todo:
                        await self._queue_write(pipe, shard_id, entry)
                    async with asyncio.timeout(self.op_timeout):
                        results = await pipe.execute()
            except REDIS_ERRORS as exc:
                self.outage.failed(
                    loop.time(), exc, "; sessions are kept in memory until it is back"
                )
                self._kick()
                return False
            self.outage.succeeded(loop.time())
            # A failover found while writing: this write may have gone to the old master, so
            # everything stays dirty and is written again. None found: it went to the master
            # the Sentinels name (the pool's promise, :class:`.redis_link._FollowingPool`).
            moved = self._follow_master()
            for (shard_id, entry), version, written in zip(todo, versions, results, strict=True):
                if not int(written):  # a newer owner holds the shard: never write it again
                    self.fenced += 1
                    log.warning(
                        "shard %d: session not saved: a newer lease (epoch above %d) owns it",
                        shard_id,
                        entry.epoch,
                    )
                    if self._entries.get(shard_id) is entry:
                        del self._entries[shard_id]
                elif entry.version == version and not moved:
                    entry.dirty = False
                    if entry.session is None and self._entries.get(shard_id) is entry:
                        del self._entries[shard_id]
            return True

    def _follow_master(self) -> bool:
        """Sentinel moved the master: write every session we hold again (True). The old master
        may have acknowledged writes it never passed on to the new one (replication is
        asynchronous), and a session left older there only costs a longer replay on a resume
        elsewhere; rewritten, it costs nothing."""
        changes = master_changes(self.client)
        if changes == self._masters_seen:
            return False
        self._masters_seen = changes
        for entry in self._entries.values():
            entry.dirty = True
        if self._entries:
            log.info(
                "shard store: the Redis master moved: writing the %d sessions held again",
                len(self._entries),
            )
        self._kick()
        return True

    async def _queue_write(self, pipe: Pipeline, shard_id: int, entry: _Entry) -> None:
        keys = [*self.keys(shard_id), self.fleet.epoch(shard_id) if self.fleet else "-"]
        session = entry.session
        args: list[Any] = [entry.epoch if self.fleet else 0, self.ttl_ms]
        if session is None:
            args += ["0", "", "0", "", "0", "", 0]
        else:
            seq, url = session.seq, session.resume_url
            args += ["1", session.session_id]
            args += ["0", ""] if seq is None else ["1", seq]
            args += ["0", ""] if url is None else ["1", url]
            args.append(entry.shard_count)
        await self._write_script(keys=keys, args=args, client=pipe)  # queued, run by execute

    async def _keeper(self) -> None:
        """Write dirty entries after an outage (with backoff) and refresh every live session's
        TTL every :attr:`refresh_interval` seconds."""
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        next_refresh = loop.time() + self.refresh_interval
        while not self.closing:
            now = loop.time()
            dirty = any(e.dirty for e in self._entries.values())
            wake_at = next_refresh
            if dirty:
                wake_at = min(wake_at, max(now, self.outage.retry_at))
            if wake_at > now:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wake_at - now):
                        await self._wake.wait()
                continue
            if now >= next_refresh:
                for entry in self._entries.values():
                    entry.dirty = True
                next_refresh = now + self.refresh_interval
            if now < self.outage.retry_at:
                continue
            was_down = self.outage.down
            if await self._write(None) and was_down:
                log.info("shard store: stored sessions are up to date again")
