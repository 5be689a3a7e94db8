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

Input (:mod:`.redis_streams_commands`): the ``<stream_prefix>SEND`` stream through the consumer
group ``[broker] group``, each entry taken inside its own boundary. A command for a shard this
worker does not run is re-published to ``<stream_prefix>SEND:<shard_id>``, which the worker
running that shard reads (bare ``{"op", "d"}`` packets, like AMQP's per-shard queues).

Outages: a failed batch goes back to the head of the buffer and is published again after a
backoff (duplicates carry the same ``id``); with Redis Sentinel a batch also fails when no
replica acknowledged it (``WAIT``, :func:`~spectacles_gateway.redis_link.check_replicated`):
right after a failover the old master still takes entries that would be lost. Reads and
acknowledgements are retried the same way; ``connected`` is False meanwhile, and while the
command reader is down (it is started again). Groups lost with a restarted Redis are created again.
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

from .. import metrics
from ..redis_link import (
    REDIS_ERRORS,
    REPLICA_WAIT_MS,
    Outage,
    check_replicated,
    describe_error,
    redis_client,
    waits_for_replica,
)
from .base import Ack, Broker, Progress
from .redis_streams_commands import CommandReader, finish, transient
from .wire import msgpack_string

if TYPE_CHECKING:
    from ..config import Settings
    from ..plan import WorkerPlan

__all__ = ["RedisStreamsBroker"]

log = logging.getLogger(__name__)

#: Events per pipelined batch, at most.
MAX_BATCH = 1000


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
        generation: int = 0,
    ) -> None:
        super().__init__()
        self.generation = generation
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
        self._tasks: list[asyncio.Task[None]] = []
        self._ever_connected = False
        self._link_up = False  # Redis answers (the reader being alive is the other half)
        self._reader_alive = True
        self._closing = False  # aclose() began
        self._stopped = False  # aclose() drained: the sender stops
        self.commands = CommandReader(
            client,
            reader,
            group=group,
            consumer=self.consumer,
            streams=self.command_streams,
            message_timeout=message_timeout,
            op_timeout=op_timeout,
            outage=self.outage,
            deliver=self._take_command,
            lost=self._lost,
            ok=self._connected,
            health=self._reader_health,
        )
        self.published = 0

    def track(self, shard_id: int, *, running: bool) -> None:
        """Fleet: read ``<prefix>SEND:<shard>`` while this worker runs the shard (its consumer
        group is created at the next read; entries left pending by the previous owner are
        claimed after ``message_timeout``)."""
        stream = self.shard_stream(shard_id)
        if running:
            self.command_streams[stream] = shard_id
        else:
            self.command_streams.pop(stream, None)

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
            generation=plan.generation,
        )

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
            "generation": self.generation,
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
        since = waits_for_replica(self.client)  # Sentinel: a replica must have it
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for item in batch:
                    pipe.xadd(item.stream, item.fields, maxlen=maxlen, approximate=True)
                if since is not None:
                    pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)
                async with asyncio.timeout(self.op_timeout):
                    replies = await pipe.execute(raise_on_error=False)
                if since is not None:  # a batch a failover could lose is sent again
                    acks = replies.pop()
                    if isinstance(acks, Exception):
                        raise acks
                    await check_replicated(self.client, int(acks), since)
        except REDIS_ERRORS as exc:
            self._lost(loop.time(), exc)
            return 0
        done = len(batch)
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                if transient(reply):
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
        self._link_up = False
        self._show_connected()

    def _connected(self, now: float) -> None:
        self.outage.succeeded(now)
        if not self._link_up:
            if self._ever_connected:
                metrics.broker_reconnects.labels("redis").inc()
            self._link_up = True
            self._ever_connected = True
            self._show_connected()

    def _reader_health(self, alive: bool) -> None:
        self._reader_alive = alive
        self._show_connected()

    def _show_connected(self) -> None:
        """``connected``: Redis answers and the command reader runs."""
        up = self._link_up and self._reader_alive
        if up != self.connected:
            self.connected = up
            metrics.broker_connected.set(int(up))

    def _take_command(self, body: bytes, ack: Ack, shard_id: int | None) -> None:
        self._command(body, ack, shard_id)
        self._wake()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._send_wake = asyncio.Event()
        self._idle = asyncio.Event()
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
        self._tasks = [loop.create_task(self._sender(), name="redis-broker-sender")]
        self.commands.start()

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
        await self.commands.stop_reading()
        await self.commands.stop()
        self._stopped = True
        if self._send_wake is not None:
            self._send_wake.set()
        await finish(self._tasks, 2.0)
        self._tasks = []
        if self.commands.idle and self.connected:
            with contextlib.suppress(*REDIS_ERRORS):
                async with asyncio.timeout(1.0):
                    await self.commands.forget_consumer()
        self.connected = False
        metrics.broker_connected.set(0)
        await self.reader.aclose()
        await self.client.aclose()
