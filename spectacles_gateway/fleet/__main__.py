"""The fleet agent process: ``python -m spectacles_gateway.fleet --fd N --member ID``.

Started by a supervisor in fleet mode, like a worker: everything comes over the control socket
(the first message is :class:`~spectacles_gateway.control.FleetStart`), nothing secret is on
its command line. It exits when told to drain and every shard is handed off, or when its
supervisor goes away (its leases then run out by themselves).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from .. import control, metrics
from ..control import (
    Drain,
    FleetStart,
    FrameError,
    FrameReader,
    LockReshard,
    Message,
    Released,
    Status,
    Switch,
    UnlockReshard,
)
from .agent import Agent, AgentConfig
from .keys import FleetKeys

log = logging.getLogger("spectacles_gateway.fleet")


class _Link(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.agent: Agent | None = None
        self.closed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for message in self.reader.feed(data):
            try:
                self._handle(message)
            except Exception:  # one message must not stop the agent
                log.exception("fleet: internal error while handling a control message")
                metrics.input_dropped.labels("control", "internal_error").inc()

    def _handle(self, message: Message | FrameError) -> None:
        agent = self.agent
        if isinstance(message, FrameError) or agent is None:
            metrics.input_dropped.labels("control", "bad_frame").inc()
        elif isinstance(message, Released):
            self._spawn(agent.released(message.shard, message.generation))
        elif isinstance(message, Drain):
            agent.drain()
        elif isinstance(message, LockReshard):
            self._spawn(agent.lock_reshard())
        elif isinstance(message, UnlockReshard):
            self._spawn(agent.unlock_reshard())
        elif isinstance(message, Switch):
            self._spawn(agent.switch(message.generation, message.shard_count))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet: an operation failed", exc_info=task.exception())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def send(self, message: Message) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(control.encode(message))


async def _run(start: FleetStart, sock: socket.socket) -> int:
    from ..config import load
    from ..redis_link import redis_client

    settings = load(start.argv, os.environ).settings
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(_Link, sock=sock)
    client = redis_client(settings, name="spectacles-fleet")
    config = AgentConfig(
        member=start.member,
        capacity=settings.fleet.capacity,
        lease=settings.fleet.lease,
        shard_count=start.shard_count,
        allowed=frozenset(start.allowed) if start.allowed is not None else None,
        generation=start.generation,
    )
    agent = Agent(
        client, FleetKeys(settings.shard_store.prefix, settings.fleet.name), config, link.send
    )
    agent.outage.url = settings.redis.url  # named (redacted) in its outage warnings
    link.agent = agent
    loop.add_signal_handler(signal.SIGTERM, agent.drain)

    async def report() -> None:
        while True:
            link.send(Status(pid=os.getpid(), broker=True, metrics=metrics.REGISTRY.changes()))
            await asyncio.sleep(1.0)

    reporter = loop.create_task(report())
    runner = loop.create_task(agent.run())
    orphan = loop.create_task(link.closed.wait())
    try:
        await asyncio.wait({runner, orphan}, return_when=asyncio.FIRST_COMPLETED)
        if orphan.done():
            log.warning("fleet: the supervisor went away; leaving the leases to run out")
        elif runner.exception() is not None:
            raise runner.exception()  # type: ignore[misc]
    finally:
        for task in (reporter, runner, orphan):
            task.cancel()
        with contextlib.suppress(Exception):
            link.send(Status(pid=os.getpid(), broker=True, metrics=metrics.REGISTRY.changes()))
        await client.aclose()
        if link.transport is not None:
            link.transport.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spectacles-fleet-agent")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--member", default="")
    args = parser.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    sock = socket.socket(fileno=args.fd)
    from ..workerproc import read_first

    start = read_first(sock)
    if not isinstance(start, FleetStart):
        raise SystemExit("the first control message must be FleetStart")
    from ..config import load
    from ..logsetup import setup_logging

    settings = load(start.argv, os.environ).settings
    setup_logging(settings.logging_level, settings.secrets(), worker="fleet")
    sock.setblocking(False)
    return asyncio.run(_run(start, sock))


if __name__ == "__main__":
    sys.exit(main())
