"""Commands from Redis streams, for :class:`~.redis_streams.RedisStreamsBroker`.

The ``<stream_prefix>SEND`` stream, and ``<stream_prefix>SEND:<shard_id>`` for each shard of
this worker (bare ``{"op", "d"}`` packets that other workers handed on), are read through the
consumer group ``[broker] group`` with one consumer per worker process (``<hostname>:<pid>``).
The group is created at ``0`` with ``MKSTREAM``, as Spectacles' consumers do: commands written
before any gateway ever ran are delivered too; a group that already exists keeps its position,
so nothing is read twice. An entry is acknowledged (``XACK``) only once the worker calls
``ack()`` (sent or rejected). Entries that another consumer (a dead worker) left pending longer
than ``[broker] message_timeout`` are claimed with ``XAUTOCLAIM``.

Boundaries (issue 10): each entry is taken inside its own: one without a ``data`` field
(``reason="wrong_shape"``) or with one over 64 KiB (``too_large``) is dropped unparsed, and
anything that raises while an entry is taken is logged with its traceback, counted
(``internal_error``) and the entry acknowledged; the worker parses the body in a boundary of its
own. A failure of the reader itself (not of one entry: a bug of ours) ends its task; the
watchdog logs it, shows the broker as not connected (so ``/readyz`` says not ready) and starts
the reader again after a backoff (0.2 s, doubling up to 5 s) until it reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .. import metrics
from ..protocol.backoff import backoff_delay
from ..redis_link import REDIS_ERRORS, Outage
from .base import Ack
from .wire import MAX_COMMAND_BODY

__all__ = ["BLOCK_MS", "CommandReader", "finish", "transient"]

log = logging.getLogger(__name__)

#: Entries read per XREADGROUP / XAUTOCLAIM call.
READ_COUNT = 100
#: Milliseconds an XREADGROUP blocks waiting for commands.
BLOCK_MS = 1000
#: Commands handed to the worker and not yet acknowledged, at most.
MAX_UNACKED = 1000
SOURCE = "redis"
# Replies that mean "try again later", not "this entry is wrong".
_TRANSIENT = ("OOM", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN")

#: Takes a command: (body, ack, shard id or None for a ``SEND`` body).
Deliver = Callable[[bytes, Ack, int | None], None]


class CommandReader:
    """Reads the command streams, hands each entry to ``deliver`` and acknowledges it once
    its ``ack`` is called. ``lost(now, exc)``, ``ok(now)`` and ``health(alive)`` tell the
    broker how Redis and the reader are doing; ``outage`` paces the retries."""

    def __init__(
        self,
        client: Redis,
        reader: Redis,
        *,
        group: str,
        consumer: str,
        streams: dict[str, int | None],
        message_timeout: float,
        op_timeout: float,
        outage: Outage,
        deliver: Deliver,
        lost: Callable[[float, BaseException], None],
        ok: Callable[[float], None],
        health: Callable[[bool], None],
    ) -> None:
        self.client = client
        self.reader = reader
        self.group = group
        self.consumer = consumer
        #: Streams read for commands -> the shard they are for (None: any, the SEND stream).
        self.streams = streams
        #: Every shard stream ever read, with its shard (entries may arrive after a release).
        self._shards_seen: dict[str, int] = {k: v for k, v in streams.items() if v is not None}
        self.message_timeout = message_timeout
        self.op_timeout = op_timeout
        self.outage = outage
        self.deliver = deliver
        self.lost = lost
        self.ok = ok
        self.health = health
        #: Entries Redis acknowledged (XACK replies), reader restarts and claim rounds, so far.
        self.acked = 0
        self.restarts = 0
        self.claim_rounds = 0
        self._acks: dict[str, list[bytes]] = {}
        self._ack_wake = asyncio.Event()
        self._holding: set[tuple[str, bytes]] = set()  # delivered, not acknowledged yet
        self._room = asyncio.Event()
        self._room.set()
        self._alive = True
        self._failures = 0
        self._closing = False  # stop_reading() began: the reader stops
        self._stopped = False  # stop() drained: the acknowledger stops
        self._task: asyncio.Task[None] | None = None
        self._acker_task: asyncio.Task[None] | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._reader_id: int | None = None
        self._blocking = False

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._acker_task = loop.create_task(self._acker(), name="redis-broker-acker")
        self._start_reader()

    # ------------------------------------------------------------------ the reader and its watchdog

    def _start_reader(self) -> None:
        self._restart = None
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._read_loop(), name="redis-broker-reader")
        task.add_done_callback(self._reader_ended)
        self._task = task

    def _reader_ended(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if self._closing:
            return
        self._failures += 1
        self.restarts += 1
        delay = backoff_delay(self._failures, random.random(), base=0.2, cap=5.0)
        log.error(
            "redis broker: the command reader failed (%s); starting it again in %.2f s",
            "cancelled" if error is None else f"{type(error).__name__}: {error}",
            delay,
            exc_info=error,
        )
        self._restart = asyncio.get_running_loop().call_later(delay, self._start_reader)
        self._reading(False)

    def _reading(self, alive: bool) -> None:
        if alive != self._alive:
            self._alive = alive
            self.health(alive)
        if alive:
            self._failures = 0

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        need_groups = True
        need_id = True
        claim_every = max(0.2, min(30.0, self.message_timeout / 4))
        next_claim = 0.0
        while not self._closing:
            try:
                if need_id:  # so that stop() can interrupt a blocking read
                    self._reader_id = int(await self.reader.client_id())
                    need_id = False
                if need_groups:
                    await self._create_groups()
                    # Our own pending entries (a previous process with our name): again.
                    await self._read("0")
                    need_groups = False
                if loop.time() >= next_claim:
                    await self._claim()
                    next_claim = loop.time() + claim_every
                await self._room.wait()
                if self.closing:  # stop_reading() woke us up
                    break
                self._blocking = True
                try:
                    await self._read(">")
                finally:
                    self._blocking = False
                self._reading(True)  # a whole round went through
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.info("redis broker: consumer group %r is gone; creating it", self.group)
                    need_groups = True
                    continue
                self.lost(loop.time(), exc)
                await self._pause()
            except REDIS_ERRORS as exc:
                need_id = True
                self.lost(loop.time(), exc)
                await self._pause()

    async def _pause(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.05, self.outage.retry_at - loop.time()))

    async def _create_groups(self) -> None:
        for stream in list(self.streams):
            try:
                await self.reader.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _read(self, start: str) -> None:
        loop = asyncio.get_running_loop()
        for name, shard in self.streams.items():
            if shard is not None:
                self._shards_seen[name] = shard
        streams: dict[Any, Any] = dict.fromkeys(self.streams, start)
        reply: Any = await self.reader.xreadgroup(
            self.group,
            self.consumer,
            streams,
            count=READ_COUNT,
            block=BLOCK_MS if start == ">" else None,
        )
        self.ok(loop.time())
        if isinstance(reply, dict):  # RESP3
            reply = list(reply.items())
        for stream, entries in reply or ():
            name = stream.decode() if isinstance(stream, bytes) else str(stream)
            for entry_id, fields in entries:
                if entry_id is not None:
                    self._deliver(name, entry_id, fields)

    async def _claim(self) -> None:
        """Take over entries that other consumers left pending for ``message_timeout``."""
        min_idle = max(1, round(self.message_timeout * 1000))
        for stream in list(self.streams):
            start: Any = "0-0"
            for _ in range(100):  # bounded: at most 100 x READ_COUNT entries per round
                reply = await self.reader.xautoclaim(
                    stream, self.group, self.consumer, min_idle, start, count=READ_COUNT
                )
                start = reply[0]
                for entry_id, fields in reply[1]:
                    if entry_id is not None and (stream, entry_id) not in self._holding:
                        log.info("redis broker: claimed command %s of %s", entry_id, stream)
                        self._deliver(stream, entry_id, fields)
                if start in (b"0-0", "0-0"):
                    break
        self.claim_rounds += 1

    async def stop_reading(self) -> None:
        """Let the reader finish its command (a blocking read is interrupted with CLIENT
        UNBLOCK): cancelling it mid-command could leave its connection half-open."""
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        self._room.set()
        if self._blocking and self._reader_id is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                async with asyncio.timeout(1.0):
                    await self.client.client_unblock(self._reader_id)
        if self._task is not None:
            await finish([self._task], BLOCK_MS / 1000 + 1.0)

    # ------------------------------------------------------------------ one entry

    def _deliver(self, stream: str, entry_id: bytes, fields: dict[Any, Any] | None) -> None:
        key = (stream, entry_id)
        if key in self._holding or entry_id in self._acks.get(stream, ()):
            return  # handed over already (its XACK may still be on its way)
        self._holding.add(key)
        self._update_room()
        acked = False

        def ack() -> None:
            nonlocal acked
            if acked:
                return
            acked = True
            self._holding.discard(key)
            self._acks.setdefault(stream, []).append(entry_id)
            self._update_room()
            self._ack_wake.set()

        try:
            self._take(stream, entry_id, fields, ack)
        except Exception:  # a bug of ours: one entry must not stop the intake
            log.exception(
                "redis broker: rejected a command: internal_error while taking entry %s of %s",
                entry_id,
                stream,
            )
            metrics.input_dropped.labels(SOURCE, "internal_error").inc()
            ack()

    def _take(self, stream: str, entry_id: bytes, fields: Any, ack: Ack) -> None:
        body = fields.get(b"data") if fields else None
        if not isinstance(body, bytes):
            reason, detail = "wrong_shape", "has no data field"
        elif len(body) > MAX_COMMAND_BODY:
            reason, detail = "too_large", f"holds a body of {len(body)} bytes"
        else:
            # A shard's stream stays a shard's stream after it was let go (fleet: read before).
            shard = self.streams.get(stream, self._shards_seen.get(stream))
            self.deliver(body, ack, shard)
            return
        log.warning("redis broker: entry %s of %s %s; dropped", entry_id, stream, detail)
        metrics.input_dropped.labels(SOURCE, reason).inc()
        ack()

    def _update_room(self) -> None:
        if len(self._holding) < MAX_UNACKED:
            self._room.set()
        else:
            self._room.clear()

    # ------------------------------------------------------------------ acknowledgements

    async def _acker(self) -> None:
        while not self._stopped:
            if not self._acks:
                self._ack_wake.clear()
                await self._ack_wake.wait()
                continue
            if not await self.flush_acks():
                await self._pause()

    async def flush_acks(self) -> bool:
        """XACK what the worker acknowledged; False: Redis did not take them (kept for later)."""
        loop = asyncio.get_running_loop()
        acks, self._acks = self._acks, {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for stream, ids in acks.items():
                    pipe.xack(stream, self.group, *ids)
                async with asyncio.timeout(self.op_timeout):
                    replies = await pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as exc:
            for stream, ids in acks.items():
                self._acks.setdefault(stream, [])[:0] = ids
            self.lost(loop.time(), exc)
            return False
        ok = True
        for (stream, ids), reply in zip(acks.items(), replies, strict=True):
            if not isinstance(reply, Exception):
                self.acked += int(reply)
            elif transient(reply):
                self._acks.setdefault(stream, [])[:0] = ids
                ok = False
            else:  # NOGROUP after Redis lost the group: nothing left to acknowledge
                log.debug("redis broker: XACK on %s: %s", stream, reply)
        if ok:
            self.ok(loop.time())
        return ok

    async def stop(self) -> None:
        """After :meth:`stop_reading`: acknowledge what is left (2 s at most), stop, and leave
        the group tidy when nothing is held."""
        if self._acks:
            self.outage.retry_at = 0.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.flush_acks()
        self._stopped = True
        self._ack_wake.set()
        if self._acker_task is not None:
            await finish([self._acker_task], 2.0)

    @property
    def idle(self) -> bool:
        """Nothing delivered and not yet acknowledged."""
        return not self._holding and not self._acks

    async def forget_consumer(self) -> None:
        """Leave the group tidy (as Spectacles' consumers do): remove our consumer from each
        stream's group where it holds nothing pending."""
        for stream in list(self.streams):
            pending = await self.client.xpending_range(
                stream, self.group, min="-", max="+", count=1, consumername=self.consumer
            )
            if not pending:
                await self.client.xgroup_delconsumer(stream, self.group, self.consumer)


async def finish(tasks: list[asyncio.Task[None]], timeout: float) -> None:  # noqa: ASYNC109
    """Wait for ``tasks`` to end by themselves, then cancel what is left (and never wait
    forever for a cancellation that redis-py may swallow)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1.0)


def transient(exc: Exception) -> bool:
    """A Redis error reply that means "try again later", not "this entry is wrong"."""
    return not isinstance(exc, ResponseError) or str(exc).startswith(_TRANSIENT)
