"""The Redis streams broker: events into one stream per event name, commands from ``SEND``.

Output (the conventions of the Spectacles Redis broker, ``@spectacles/brokers``: the event name
is the stream key, the body is the ``data`` field)::

    XADD <stream_prefix><EVENT> MAXLEN ~ <maxlen> * data <body> shard_id <id> seq <seq>
         id <session>:<seq>

``body`` is the AMQP body (a msgpack string holding the JSON of ``d``), or the raw JSON with
``[broker] format = "json"``. ``id`` is the same for an event and its replays after a resume, so
consumers can drop duplicates. Events are pipelined in batches; a batch's reply confirms its
events, which advances each shard's confirmed seq. At most ``[broker] buffer`` events wait
unconfirmed: then the worker's shards stop reading (``pause``) until half of that is left.

Input: the ``<stream_prefix>SEND`` stream, read through the consumer group ``[broker] group``
with one consumer per worker process (``<hostname>:<pid>``). The group is created at ``0``
with ``MKSTREAM``, as Spectacles' consumers do: commands written before any gateway ever ran
are delivered too; a group that already exists keeps its position, so nothing is read twice.
An entry is acknowledged (``XACK``) only once the worker calls ``ack()`` (sent or rejected).
Entries that another consumer (a dead worker) left pending longer than
``[broker] message_timeout`` are claimed with ``XAUTOCLAIM``. A command for a shard this worker
does not run is re-published to ``<stream_prefix>SEND:<shard_id>``, which the worker running
that shard reads (bare ``{"op", "d"}`` packets, like AMQP's per-shard queues).

Outages: a failed batch goes back to the head of the buffer and is published again after a
backoff (duplicates carry the same ``id``); reads and acknowledgements are retried the same
way; ``connected`` is False meanwhile. Groups lost with a restarted Redis are created again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .. import metrics
from ..redis_store import REDIS_ERRORS, Outage, describe_error, redis_client
from .base import Broker, Progress
from .wire import msgpack_string

if TYPE_CHECKING:
    from ..config import Settings
    from ..plan import WorkerPlan

__all__ = ["RedisStreamsBroker"]

log = logging.getLogger(__name__)

#: Events per pipelined batch, at most.
MAX_BATCH = 1000
#: Entries read per XREADGROUP / XAUTOCLAIM call.
READ_COUNT = 100
#: Milliseconds an XREADGROUP blocks waiting for commands.
BLOCK_MS = 1000
#: Commands handed to the worker and not yet acknowledged, at most.
MAX_UNACKED = 1000
# Replies that mean "try again later", not "this entry is wrong".
_TRANSIENT = ("OOM", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN")


@dataclass(slots=True)
class _Item:
    event: str
    stream: str
    fields: dict[Any, Any]
    shard_id: int
    seq: int | None
    session: str
    ack: Callable[[], None] | None = None  # forwarded packets: ack once published


class RedisStreamsBroker(Broker):
    name = "redis"

    def __init__(
        self,
        client: Redis,
        reader: Redis,
        *,
        shard_ids: tuple[int, ...] = (),
        stream_prefix: str = "",
        maxlen: int = 100_000,
        group: str = "gateway",
        message_timeout: float = 120.0,
        body_format: str = "msgpack",
        buffer: int = 10_000,
        consumer: str | None = None,
        url: str = "",
        op_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.client = client
        self.reader = reader
        self.shard_ids = shard_ids
        self.stream_prefix = stream_prefix
        self.maxlen = maxlen
        self.group = group
        self.message_timeout = message_timeout
        self.json_body = body_format == "json"
        self.limit = buffer
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.op_timeout = op_timeout
        self.send_stream = f"{stream_prefix}SEND"
        #: Streams read for commands -> the shard they are for (None: any, the SEND stream).
        self.command_streams: dict[str, int | None] = {self.send_stream: None}
        for shard_id in shard_ids:
            self.command_streams[self.shard_stream(shard_id)] = shard_id
        self.outage = Outage("redis broker", url, base=0.2, cap=2.0)
        self._queue: deque[_Item] = deque()
        self._buffered = 0  # events queued or in flight, not yet confirmed
        self._paused = False
        self._send_wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._acks: dict[str, list[bytes]] = {}
        self._ack_wake: asyncio.Event | None = None
        self._holding: set[tuple[str, bytes]] = set()  # delivered, not acknowledged yet
        self._room: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ever_connected = False
        self._closing = False  # aclose() began: the reader stops
        self._stopped = False  # aclose() drained: the sender and the acknowledger stop
        self._reader_id: int | None = None
        self._blocking = False
        self.published = 0

    @classmethod
    def from_settings(cls, settings: Settings, plan: WorkerPlan) -> RedisStreamsBroker:
        return cls(
            redis_client(settings, name="spectacles-broker"),
            # Blocking reads hold their connection: they get one of their own.
            redis_client(settings, max_connections=1, name="spectacles-broker-reader"),
            shard_ids=plan.shard_ids,
            stream_prefix=settings.redis.stream_prefix,
            maxlen=settings.redis.maxlen,
            group=settings.broker.group,
            message_timeout=settings.broker.message_timeout,
            body_format=settings.broker.format,
            buffer=settings.broker.buffer,
            url=settings.redis.url,
        )

    @property
    def closing(self) -> bool:
        return self._closing

    def stream(self, event: str) -> str:
        return self.stream_prefix + event

    def shard_stream(self, shard_id: int) -> str:
        return f"{self.stream_prefix}SEND:{shard_id}"

    # ------------------------------------------------------------------ output

    def publish(
        self, shard_id: int, event: str, seq: int | None, data: bytes, session: str
    ) -> None:
        body = data if self.json_body else msgpack_string(data)
        seq_text = "" if seq is None else str(seq)
        fields: dict[Any, Any] = {
            "data": body,
            "shard_id": shard_id,
            "seq": seq_text,
            "id": f"{session}:{seq_text}",
        }
        self._queue.append(_Item(event, self.stream_prefix + event, fields, shard_id, seq, session))
        self._buffered += 1
        if self._idle is not None:
            self._idle.clear()
        if not self._paused and self._buffered >= self.limit:
            self._paused = True
            log.info("redis broker: %d events unconfirmed; pausing the shards", self._buffered)
            self._flow(True)

    def flush(self) -> Progress | None:
        if self._queue and self._send_wake is not None:
            self._send_wake.set()
            if not self.connected:  # the depth matters now (otherwise set per batch)
                metrics.broker_buffered.set(self._buffered)
        return self.take_progress()

    def forward(self, shard_id: int, packet: bytes, ack: Callable[[], None]) -> bool:
        """Re-publish a packet for a shard of another worker to its ``SEND:<id>`` stream."""
        fields: dict[Any, Any] = {"data": packet}
        self._queue.append(_Item("", self.shard_stream(shard_id), fields, shard_id, None, "", ack))
        if self._send_wake is not None and self._idle is not None:
            self._idle.clear()
            self._send_wake.set()
        return True

    async def _sender(self) -> None:
        assert self._send_wake is not None and self._idle is not None
        loop = asyncio.get_running_loop()
        # A flag, not only cancel(): redis-py on Python 3.11 can swallow a cancellation that
        # arrives during a command.
        while not self._stopped:
            if not self._queue:
                self._idle.set()
                self._send_wake.clear()
                await self._send_wake.wait()
                continue
            n = min(MAX_BATCH, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            done = await self._send(batch)
            if done < len(batch):
                self._queue.extendleft(reversed(batch[done:]))
                metrics.publish_failures.labels("redis_unavailable").inc(len(batch) - done)
                metrics.broker_buffered.set(self._buffered)
                await asyncio.sleep(max(0.0, self.outage.retry_at - loop.time()))

    async def _send(self, batch: list[_Item]) -> int:
        """Publish ``batch``; returns how many of its items (from the head) are done."""
        loop = asyncio.get_running_loop()
        maxlen = self.maxlen
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for item in batch:
                    pipe.xadd(item.stream, item.fields, maxlen=maxlen, approximate=True)
                async with asyncio.timeout(self.op_timeout):
                    replies = await pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as exc:
            self._lost(loop.time(), exc)
            return 0
        done = len(batch)
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                if _transient(reply):
                    self._lost(loop.time(), reply)
                    done = i
                    break
                item = batch[i]
                log.error(
                    "redis broker: Redis refused an entry of stream %r (%s); it is dropped",
                    item.stream,
                    describe_error(reply),
                )
                metrics.publish_failures.labels("rejected").inc()
        if done:
            self._connected(loop.time())
            self._settle(batch[:done])
        return done

    def _settle(self, items: list[_Item]) -> None:
        last: dict[int, tuple[str, int]] = {}
        events: Counter[str] = Counter()
        n_events = 0
        for item in items:
            if item.ack is not None:
                item.ack()
                continue
            n_events += 1
            events[item.event] += 1
            if item.seq is not None:
                last[item.shard_id] = (item.session, item.seq)
        if not n_events:
            return
        self.published += n_events
        self._buffered -= n_events
        for shard_id, (session, seq) in last.items():
            self._confirmed(shard_id, session, seq)
        for event, count in events.items():
            metrics.events_published.labels(event).inc(count)
        metrics.events_confirmed.labels("redis").inc(n_events)
        metrics.broker_buffered.set(self._buffered)
        if self._paused and self._buffered <= self.limit // 2:
            self._paused = False
            log.info("redis broker: buffer drained to %d events; resuming", self._buffered)
            self._flow(False)
        self._wake()

    # ------------------------------------------------------------------ connection state

    def _lost(self, now: float, exc: BaseException) -> None:
        detail = "" if self._closing else f"; buffering up to {self.limit} events, reconnecting"
        self.outage.failed(now, exc, detail)
        if self.connected:
            self.connected = False
            metrics.broker_connected.set(0)

    def _connected(self, now: float) -> None:
        self.outage.succeeded(now)
        if not self.connected:
            if self._ever_connected:
                metrics.broker_reconnects.labels("redis").inc()
            self.connected = True
            self._ever_connected = True
            metrics.broker_connected.set(1)

    async def _pause_after_failure(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.05, self.outage.retry_at - loop.time()))

    # ------------------------------------------------------------------ input

    async def _create_groups(self) -> None:
        for stream in self.command_streams:
            try:
                await self.reader.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _reader_loop(self) -> None:
        assert self._room is not None
        loop = asyncio.get_running_loop()
        need_groups = True
        need_id = True
        claim_every = max(0.2, min(30.0, self.message_timeout / 4))
        next_claim = 0.0
        while not self._closing:
            try:
                if need_id:  # so that aclose() can interrupt a blocking read
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
                if self.closing:  # aclose() woke us up
                    break
                self._blocking = True
                try:
                    await self._read(">")
                finally:
                    self._blocking = False
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.info("redis broker: consumer group %r is gone; creating it", self.group)
                    need_groups = True
                    continue
                self._lost(loop.time(), exc)
                await self._pause_after_failure()
            except REDIS_ERRORS as exc:
                need_id = True
                self._lost(loop.time(), exc)
                await self._pause_after_failure()

    async def _stop_reader(self, task: asyncio.Task[None]) -> None:
        """Let the reader finish its command (a blocking read is interrupted with CLIENT
        UNBLOCK): cancelling it mid-command could leave its connection half-open."""
        if self._room is not None:
            self._room.set()
        if self._blocking and self._reader_id is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                async with asyncio.timeout(1.0):
                    await self.client.client_unblock(self._reader_id)
        await _finish([task], BLOCK_MS / 1000 + 1.0)

    async def _read(self, start: str) -> None:
        loop = asyncio.get_running_loop()
        streams: dict[Any, Any] = dict.fromkeys(self.command_streams, start)
        reply: Any = await self.reader.xreadgroup(
            self.group,
            self.consumer,
            streams,
            count=READ_COUNT,
            block=BLOCK_MS if start == ">" else None,
        )
        self._connected(loop.time())
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
        for stream in self.command_streams:
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
            if self._ack_wake is not None:
                self._ack_wake.set()

        body = fields.get(b"data") if fields else None
        if not isinstance(body, bytes):
            log.warning("redis broker: entry %s of %s has no data field; dropped", entry_id, stream)
            metrics.input_dropped.labels("redis", "wrong_shape").inc()
            ack()
            return
        self._command(body, ack, self.command_streams.get(stream))
        self._wake()

    def _update_room(self) -> None:
        if self._room is None:
            return
        if len(self._holding) < MAX_UNACKED:
            self._room.set()
        else:
            self._room.clear()

    async def _acker(self) -> None:
        assert self._ack_wake is not None
        while not self._stopped:
            if not self._acks:
                self._ack_wake.clear()
                await self._ack_wake.wait()
                continue
            if not await self._flush_acks():
                await self._pause_after_failure()

    async def _flush_acks(self) -> bool:
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
            self._lost(loop.time(), exc)
            return False
        ok = True
        for (stream, ids), reply in zip(acks.items(), replies, strict=True):
            if not isinstance(reply, Exception):
                continue
            if _transient(reply):
                self._acks.setdefault(stream, [])[:0] = ids
                ok = False
            else:  # NOGROUP after Redis lost the group: nothing left to acknowledge
                log.debug("redis broker: XACK on %s: %s", stream, reply)
        if ok:
            self._connected(loop.time())
        return ok

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._send_wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        metrics.broker_connected.set(0)
        try:
            async with asyncio.timeout(self.op_timeout):
                await self.client.ping()
        except REDIS_ERRORS as exc:
            self._lost(loop.time(), exc)
        else:
            self._connected(loop.time())
            log.info(
                "redis broker: publishing to streams %s<EVENT>, commands from %s (group %r, "
                "consumer %r)",
                self.stream_prefix,
                self.send_stream,
                self.group,
                self.consumer,
            )
        self._tasks = [
            loop.create_task(self._sender(), name="redis-broker-sender"),
            loop.create_task(self._acker(), name="redis-broker-acker"),
        ]
        self._tasks.append(loop.create_task(self._reader_loop(), name="redis-broker-reader"))

    async def drain(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Wait until every buffered event was published (False: ``timeout`` first)."""
        if self._send_wake is None or self._idle is None:
            return not self._queue
        self._send_wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Publish what is buffered (a few seconds at most), acknowledge, disconnect."""
        self._closing = True
        drained = await self.drain()
        if not drained:
            log.warning(
                "redis broker: %d events were not published before exit; the shards' sessions "
                "replay them on resume",
                len(self._queue),
            )
        for task in self._tasks:
            if task.get_name() == "redis-broker-reader":
                await self._stop_reader(task)
        if self._acks:
            self.outage.retry_at = 0.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._flush_acks()
        self._stopped = True
        for event in (self._send_wake, self._ack_wake):
            if event is not None:
                event.set()
        await _finish(self._tasks, 2.0)
        self._tasks = []
        if not self._holding and not self._acks and self.connected:
            with contextlib.suppress(*REDIS_ERRORS):
                async with asyncio.timeout(1.0):
                    await self._forget_consumer()
        self.connected = False
        metrics.broker_connected.set(0)
        await self.reader.aclose()
        await self.client.aclose()

    async def _forget_consumer(self) -> None:
        """Leave the group tidy (as Spectacles' consumers do): remove our consumer from each
        stream's group where it holds nothing pending."""
        for stream in self.command_streams:
            pending = await self.client.xpending_range(
                stream, self.group, min="-", max="+", count=1, consumername=self.consumer
            )
            if not pending:
                await self.client.xgroup_delconsumer(stream, self.group, self.consumer)


async def _finish(tasks: list[asyncio.Task[None]], timeout: float) -> None:  # noqa: ASYNC109
    """Wait for ``tasks`` to end by themselves, then cancel what is left (and never wait
    forever for a cancellation that redis-py may swallow)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1.0)


def _transient(exc: Exception) -> bool:
    return not isinstance(exc, ResponseError) or str(exc).startswith(_TRANSIENT)
