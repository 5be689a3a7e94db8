"""A worker process started by the supervisor: ``python -m spectacles_gateway.workerproc``.

Its arguments only name it for ``ps`` (``--worker 2 --shards 2,6,10``); everything else comes
over the control socket (file descriptor ``--fd``) as the first message, so no secret is ever on
a command line. The worker then reports its shards' status and sessions once a second, asks the
supervisor for identify permits, and exits with 0 (stopped), 78 (Discord refused for good) or
74 (its output went away).
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
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from .protocol.shard import Phase, Session

__all__ = ["ControlLink", "SupervisorGate", "main"]

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0


def _read_first_line(sock: socket.socket) -> dict[str, Any]:
    data = bytearray()
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("control socket closed before the plan arrived")
        data += chunk
    line, _, rest = bytes(data).partition(b"\n")
    if rest:
        raise SystemExit("unexpected data after the plan")
    message = msgspec.json.decode(line)
    if not isinstance(message, dict) or message.get("t") != "plan":
        raise SystemExit("the first control message must be the plan")
    return message


class ControlLink:
    """The worker's end of the control socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.grants: dict[int, asyncio.Future[None]] = {}
        self.closed = asyncio.Event()

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(msgspec.json.encode(message) + b"\n")

    async def read_loop(self) -> None:
        try:
            while line := await self.reader.readline():
                try:
                    message = msgspec.json.decode(line)
                except msgspec.DecodeError:
                    continue
                if isinstance(message, dict) and message.get("t") == "grant":
                    future = self.grants.pop(int(message["shard"]), None)
                    if future is not None and not future.done():
                        future.set_result(None)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()


class SupervisorGate:
    """Identify permits from the supervisor, which paces identifies across all its workers."""

    def __init__(self, link: ControlLink) -> None:
        self.link = link

    async def acquire(self, shard_id: int) -> object:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.link.grants[shard_id] = future
        self.link.send({"t": "identify", "shard": shard_id})
        try:
            await future
        except asyncio.CancelledError:
            self.link.grants.pop(shard_id, None)
            self.link.send({"t": "identified", "shard": shard_id, "sent": None})
            raise
        return shard_id

    def release(self, permit: object, sent_at: float | None) -> None:
        # Our loop's clock may be uvloop's cached one: report the monotonic clock the
        # supervisor reads too, taken now (release comes right after the IDENTIFY write).
        sent = time.monotonic() if sent_at is not None else None
        self.link.send({"t": "identified", "shard": permit, "sent": sent})


def _session_json(session: Session | None) -> dict[str, Any] | None:
    if session is None:
        return None
    return {"session_id": session.session_id, "seq": session.seq, "resume_url": session.resume_url}


def _status(worker: Any) -> dict[str, Any]:
    shards = {}
    sessions = {}
    for shard_id, runner in worker.runners.items():
        core = runner.core
        shards[str(shard_id)] = {
            "state": core.phase.value,
            "ready": core.phase is Phase.READY,
            "seq": core.seq,
            "latency_ms": None if core.ping_ms is None else round(core.ping_ms, 1),
            "last_close": core.last_close or None,
            "fatal": core.fatal_code,
        }
        sessions[str(shard_id)] = _session_json(core.session())
    return {
        "t": "status",
        "pid": os.getpid(),
        "shards": shards,
        "sessions": sessions,
        "broker": worker.broker.connected,
    }


async def _run(message: dict[str, Any], sock: socket.socket) -> int:
    from .config import load
    from .factory import make_broker, make_gate, make_store
    from .store import MemoryStore
    from .worker import Worker, WorkerPlan

    settings = load(message["argv"], os.environ).settings
    fields = dict(message["plan"])
    events = fields.pop("events")
    fields["events"] = None if events is None else frozenset(events)
    fields["shard_ids"] = tuple(fields["shard_ids"])
    plan = WorkerPlan(**fields)
    reader, writer = await asyncio.open_connection(sock=sock)
    link = ControlLink(reader, writer)
    link_task = asyncio.create_task(link.read_loop())
    if settings.shard_store.type == "memory":
        sessions = {
            int(k): (Session(v["session_id"], v["seq"], v["resume_url"]), plan.shard_count)
            for k, v in (message.get("sessions") or {}).items()
            if v is not None
        }
        store: Any = MemoryStore(sessions)
    else:
        store = make_store(settings)
    worker = Worker(
        plan,
        make_broker(settings, plan),
        store=store,
        gate=make_gate(settings, plan, SupervisorGate(link)),
        keep_sessions=True,  # the supervisor (or Redis) keeps them: a restart resumes
    )

    async def report() -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            link.send(_status(worker))

    async def orphaned() -> None:
        await link.closed.wait()
        log.warning("the supervisor went away; stopping")
        worker.request_stop(fast=False)

    reporter = asyncio.create_task(report())
    watcher = asyncio.create_task(orphaned())
    try:
        code = await worker.run()
    finally:
        reporter.cancel()
        watcher.cancel()
        with contextlib.suppress(Exception):
            link.send(_status(worker))  # final sessions, after the broker flushed
            await asyncio.wait_for(writer.drain(), 2.0)
        link_task.cancel()
        writer.close()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spectacles-gateway-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--shards", default="")
    args = parser.parse_args(argv)
    # The supervisor blocks signals around the spawn; start from a clean mask.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    sock = socket.socket(fileno=args.fd)
    message = _read_first_line(sock)

    from .config import load
    from .logsetup import setup_logging

    settings = load(message["argv"], os.environ).settings
    secrets = [*settings.secrets(), message["plan"]["token"]]
    setup_logging(settings.logging_level, secrets, worker=f"w{args.worker}")
    sock.setblocking(False)
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_run(message, sock))
    except KeyboardInterrupt:  # pragma: no cover - INT is handled by the worker
        return 0


if __name__ == "__main__":
    sys.exit(main())
