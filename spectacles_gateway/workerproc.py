"""A worker process started by the supervisor: ``python -m spectacles_gateway.workerproc``.

Its arguments only name it for ``ps`` (``--worker 2 --shards 2,6,10``); everything else comes
over the control socket (file descriptor ``--fd``) as the first message (:class:`~.control.Start`),
so no secret is ever on a command line. The worker then reports what changed (shards, sessions,
metrics) once a second, asks the supervisor for identify permits, and exits with 0 (stopped), 78
(Discord refused for good) or 74 (its output went away).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from . import control, metrics
from .control import (
    Assign,
    Cover,
    Deliver,
    FrameError,
    FrameReader,
    Grant,
    Identified,
    IdentifyRequest,
    Leases,
    Message,
    Publish,
    Publishing,
    Relayed,
    Release,
    Released,
    Retire,
    Start,
    Status,
)
from .limits import raise_soft, shortfall, worker_need
from .observation import COUNTS_EVERY

if TYPE_CHECKING:
    from .config import Settings
    from .worker import Worker

__all__ = ["ControlLink", "SupervisorGate", "main"]

log = logging.getLogger(__name__)


def read_first(sock: socket.socket) -> Message:
    """Read the first control message (blocking, before the event loop starts); exactly its
    bytes, so what the supervisor sent after it waits in the socket for the event loop."""

    def exactly(n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise SystemExit("control socket closed before the plan arrived")
            data += chunk
        return bytes(data)

    head = exactly(4)
    body = exactly(struct.unpack(">I", head)[0])
    messages = FrameReader().feed(head + body)
    if len(messages) != 1 or isinstance(messages[0], FrameError):
        raise SystemExit("the first control message is not a message")
    return messages[0]


class ControlLink(asyncio.Protocol):
    """The worker's end of the control socket."""

    def __init__(self) -> None:
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.grants: dict[int, asyncio.Future[None]] = {}
        self.closed = asyncio.Event()
        self.worker: Worker | None = None
        self._early: list[Message] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, worker: Worker) -> None:
        """From now on, messages for the worker go to it (those that came early first)."""
        self.worker = worker
        early, self._early = self._early, []
        for message in early:
            self._handle(message)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for message in self.reader.feed(data):
            try:
                self._handle(message)
            except Exception:  # a bug of ours: one message must not stop the worker
                log.exception("internal error while handling a control message")
                metrics.input_dropped.labels("control", "internal_error").inc()

    def _handle(self, message: Message | FrameError) -> None:
        if isinstance(message, FrameError):
            log.error("bad control frame from the supervisor: %s", message)
            metrics.input_dropped.labels("control", "bad_frame").inc()
            if message.fatal and self.transport is not None:
                self.transport.close()
        elif isinstance(message, Grant):
            future = self.grants.pop(message.shard, None)
            if future is not None and not future.done():
                future.set_result(None)
            elif future is None:  # nobody waits (cancelled meanwhile): give it back
                self.send(Identified(message.shard, None))
        elif self.worker is None:  # the worker is being built: keep it for a moment
            self._early.append(message)
        elif isinstance(message, Relayed):
            relayed = getattr(self.worker.broker, "relayed", None)
            if relayed is not None:
                relayed(message.offset)
        elif isinstance(message, Deliver):
            self.worker.handle_command(message.body, _no_ack)
        elif isinstance(message, Leases):
            self.worker.shards.set_leases(message.until)
        elif isinstance(message, Assign):
            self._spawn(self.worker.assign(message.shard, epoch=message.epoch, until=message.until))
        elif isinstance(message, Release):
            self._spawn(self.worker.release(message.shard, save=message.save))
        elif isinstance(message, Publish):
            self.worker.start_publishing()
            self.send(Publishing(self.worker.plan.generation))
        elif isinstance(message, Retire):
            self._spawn(self._retire(message))
        elif isinstance(message, Cover):
            self.worker.cover(message.shard_count, frozenset(message.shards))

    async def _retire(self, message: Retire) -> None:
        assert self.worker is not None
        point_to = getattr(self.worker.store, "point_to", None)
        if message.successor is not None and point_to is not None:
            from .generation import Pointer

            await point_to(Pointer(*message.successor))
        await self.worker.retire(message.reason)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a fleet operation failed", exc_info=task.exception())
            metrics.input_dropped.labels("control", "internal_error").inc()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def send(self, message: Message) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(control.encode(message))

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until what we wrote has left (at exit: the last report must arrive)."""
        transport = self.transport
        if transport is None:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while transport.get_write_buffer_size() and not transport.is_closing():
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.01)


def _no_ack() -> None:
    return None


class SupervisorGate:
    """Identify permits from the supervisor, which paces identifies across all its workers."""

    def __init__(self, link: ControlLink) -> None:
        self.link = link

    async def acquire(self, shard_id: int) -> object:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.link.grants[shard_id] = future
        self.link.send(IdentifyRequest(shard_id))
        try:
            await future
        except asyncio.CancelledError:
            self.link.grants.pop(shard_id, None)
            self.link.send(Identified(shard_id, None))
            raise
        return shard_id

    def release(self, permit: object, sent_at: float | None) -> None:
        # Our loop's clock may be uvloop's cached one: report the monotonic clock the
        # supervisor reads too, taken now (release comes right after the IDENTIFY write).
        sent = time.monotonic() if sent_at is not None else None
        assert isinstance(permit, int)
        self.link.send(Identified(permit, sent))


#: Up to this many changed metric series go in every report (once a second) ...
MANY_SERIES = 1000
#: ... more (hundreds of busy shards, a series per shard and event type) at most this often
#: (seconds), then MANY_SERIES a report until all have gone: decoding and adding up 4,600
#: series cost the supervisor about 1 ms, so at 512 shards x 2 events/s every 5 s cost it
#: 2.1-2.3 µs per event (60 s windows), every 10 s about half a µs less. Prometheus scrapes
#: every 15 s or more; the final report carries whatever is left. (The worker's round moves
#: hundreds of busy shards' counts into their series as often: ``observation.COUNTS_EVERY``.)
METRICS_EVERY = COUNTS_EVERY


def metrics_due(changed: int, since_last: float) -> bool:
    """Whether a report carries the ``changed`` metric series, ``since_last`` seconds after
    the last report that started to carry them."""
    return changed <= MANY_SERIES or since_last >= METRICS_EVERY


class Reports:
    """A worker's reports to its supervisor: what changed since the last one (the first one:
    everything)."""

    def __init__(self, worker: Worker, clock: Any = time.monotonic, registry: Any = None) -> None:
        self.worker = worker
        self.clock = clock
        self.registry = metrics.REGISTRY if registry is None else registry
        self.metrics_at = -float("inf")  # when a report last started to carry many series
        self.sending = False  # many series are on their way, MANY_SERIES a report

    def status(self, *, final: bool = False) -> Status:
        shards, sessions = self.worker.status_changes()
        registry = self.registry
        now = self.clock()
        samples: list[Any] = []
        if final:
            samples = registry.changes()
        elif self.sending or metrics_due(
            len(registry.dirty) + len(registry.removed), now - self.metrics_at
        ):
            if not self.sending:
                self.metrics_at = now
            # At most MANY_SERIES a report, the rest in the next ones: a report of thousands
            # of series would be a transient megabyte or two in the supervisor, whose memory
            # keeps what it once touched.
            samples = registry.changes(MANY_SERIES)
            self.sending = len(registry.dirty) > 0
        return Status(
            pid=os.getpid(),
            broker=self.worker.broker.connected,
            shards=shards,
            sessions=sessions,
            metrics=samples,
        )


async def _run(start: Start, settings: Settings, sock: socket.socket) -> int:
    from .factory import make_broker, make_gate, make_store
    from .protocol.state import Session
    from .store import MemoryStore
    from .worker import Worker

    plan = start.plan
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(ControlLink, sock=sock)
    if settings.shard_store.type == "memory":
        sessions: dict[int, tuple[Session, int]] = {
            shard: (session, plan.shard_count)
            for shard, session in start.sessions.items()
            if session is not None
        }
        store: Any = MemoryStore(sessions)
    else:
        store = make_store(settings, plan.generation)
    worker = Worker(
        plan,
        make_broker(
            settings,
            plan,
            confirm_on_relay=start.confirm_on_relay,
            stdout_lock=start.stdout_lock,
        ),
        store=store,
        gate=make_gate(settings, plan, SupervisorGate(link)),
        keep_sessions=True,  # the supervisor (or Redis) keeps them: a restart resumes
        dynamic=start.fleet,
        sharding_required_is_fatal=settings.reshard.policy == "off",
    )
    if settings.prometheus.shard_series == "minimal":
        worker.counter_label = f"w{plan.worker_id}"
    worker.on_released = lambda shard, session, reason: link.send(
        Released(shard, session, reason, worker.plan.generation)
    )
    link.attach(worker)

    reports = Reports(worker)
    worker.after_round = lambda: link.send(reports.status())

    async def orphaned() -> None:
        await link.closed.wait()
        log.warning("the supervisor went away; stopping")
        worker.request_stop(fast=False)

    watcher = asyncio.create_task(orphaned())
    try:
        code = await worker.run()
    finally:
        watcher.cancel()
        with contextlib.suppress(Exception):
            worker.observe(final=True)
            link.send(reports.status(final=True))  # final sessions, after the broker flushed
            await link.drain(2.0)
        if link.transport is not None:
            link.transport.close()
    return code


def _open_files(shards: int) -> None:
    """Raise the open-file soft limit to the hard one (the supervisor did, unless we run
    alone), and say so when it cannot hold our shards' sockets."""
    limit = raise_soft()
    problem = shortfall(worker_need(shards), limit.soft, f"{shards} shards in one worker")
    if problem is not None:
        log.warning("%s", problem)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spectacles-gateway-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--shards", default="")
    args = parser.parse_args(argv)
    # The supervisor blocks signals around the spawn; start from a clean mask.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    sock = socket.socket(fileno=args.fd)
    start = read_first(sock)
    if not isinstance(start, Start):
        raise SystemExit("the first control message must be the plan")

    from .config import load
    from .logsetup import setup_logging

    settings = load(start.argv, os.environ).settings
    setup_logging(
        settings.logging_level, [*settings.secrets(), start.plan.token], worker=f"w{args.worker}"
    )
    _open_files(len(start.plan.shard_ids))
    sock.setblocking(False)
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_run(start, settings, sock))
    except KeyboardInterrupt:  # pragma: no cover - INT is handled by the worker
        return 0


if __name__ == "__main__":
    sys.exit(main())
