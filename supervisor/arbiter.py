"""The supervisor: spawns one worker process per group of shards and keeps them running.

A single-threaded select loop, no event loop (the habits of gunicorn's arbiter): signal handlers
only record the signal; the loop acts on it. The supervisor owns what spans workers: the identify
gate, the sessions of every shard (so a restarted worker resumes even with the memory store), the
aggregated metrics and the health endpoints, and, for the stdio broker, the real stdout and stdin
(worker output is relayed record by record, so records of different workers never interleave and
a worker killed mid-write leaves no half record behind).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spectacles_gateway.brokers.stdio import msgpack_object_end
from spectacles_gateway.brokers.wire import CommandError, parse_command, target_shard
from spectacles_gateway.exitcodes import EX_CONFIG, EX_IOERR
from spectacles_gateway.protocol.backoff import backoff_delay

from .control import LineBuffer, encode
from .httpd import HttpServer, Response
from .identify import IdentifyScheduler
from .plan import describe_ids

__all__ = ["Supervisor", "SupervisorOptions", "describe_exit"]

log = logging.getLogger("spectacles_gateway.supervisor")

RELAY_HIGH_WATER = 4 << 20  # bytes waiting for our stdout before we stop reading workers
STABLE_AFTER = 30.0  # a worker alive this long has its restart backoff reset
PROGRESS_EVERY = 5.0


def describe_exit(status: int, *, killed_by_us: bool) -> tuple[str, str]:
    """(reason label, human text) for a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
        if sig == signal.SIGKILL and not killed_by_us:
            return "sigkill", "killed by SIGKILL (likely the kernel's OOM killer, or kill -9)"
        return name.lower(), f"killed by {name}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if code == EX_CONFIG:
        return "fatal", "exited with 78: Discord refused the session for good (see its log)"
    if code == 0:
        return "exit", "exited cleanly"
    return f"exit_{code}", f"exited with status {code}"


@dataclass
class SupervisorOptions:
    groups: list[tuple[int, ...]]
    shard_count: int
    max_concurrency: int
    plan: dict[str, Any]  # WorkerPlan fields shared by every worker (shard_ids filled per worker)
    argv: list[str]  # the command line the workers re-read the settings from
    stdio: str | None  # stdio format ("json"/"msgpack") when the broker is stdio, else None
    shutdown_timeout: float = 10.0
    stall_timeout: float = 10.0
    metrics_dir: str | None = None
    http: tuple[str, int] | None = None
    metrics_path: str = "/metrics"
    budget: Any = None  # SessionBudget
    notifier: Any = None  # sdnotify.Notifier or None
    rand: Callable[[], float] = random.random


@dataclass
class WorkerSlot:
    index: int
    shards: tuple[int, ...]
    proc: subprocess.Popen[bytes] | None = None
    sock: socket.socket | None = None
    buffer: LineBuffer = field(default_factory=LineBuffer)
    out: Any = None  # the worker's stdout pipe (stdio relay)
    out_partial: bytearray = field(default_factory=bytearray)
    inp: Any = None  # the worker's stdin pipe (commands)
    in_pending: bytearray = field(default_factory=bytearray)
    started: float = 0.0
    last_seen: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    killed_by_us: bool = False
    stall_killed: bool = False
    fatal: bool = False
    rolling: bool = False
    status: dict[int, Any] = field(default_factory=dict)
    broker: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Supervisor:
    def __init__(self, options: SupervisorOptions) -> None:
        self.options = options
        self.selector = selectors.DefaultSelector()
        self.slots = [WorkerSlot(i, group) for i, group in enumerate(options.groups)]
        self.owner = {shard: slot for slot in self.slots for shard in slot.shards}
        self.sessions: dict[int, dict[str, Any] | None] = {}
        self.gate = IdentifyScheduler(options.max_concurrency, budget=options.budget)
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe()
        self.stopping: str | None = None  # None, "graceful" or "fast"
        self.stop_deadline = 0.0
        self.exit_code = 0
        self._rolling: deque[WorkerSlot] = deque()
        self._rolling_current: WorkerSlot | None = None
        self._rolling_since = 0.0
        self._reloading = False
        self.http: HttpServer | None = None
        self._relay_out = bytearray()
        self._stdout_fd: int | None = None
        self._stdout_registered = False
        self._stdout_blocking = False
        self._stdin_buffer = bytearray()
        self._next_progress = 0.0
        self._ready_notified = False
        self._last_ready_count = -1
        self._next_watchdog = 0.0
        self.started = time.monotonic()
        self.ready_since: float | None = None
        self._metrics: Any = None

    # ------------------------------------------------------------------ set-up

    def _install_signals(self) -> None:
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._record_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)

    def _record_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _drain_wakeup(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._wake_r, 4096):
                pass

    def _setup_stdio(self) -> None:
        if self.options.stdio is None:
            return
        fd = sys.stdout.fileno()
        self._stdout_fd = fd
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd)):
            os.set_blocking(fd, False)
        else:
            self._stdout_blocking = True  # a file or /dev/null: cannot be polled
        try:
            in_fd = sys.stdin.fileno()
            in_mode = os.fstat(in_fd).st_mode
        except (OSError, ValueError, AttributeError):
            return
        if stat.S_ISFIFO(in_mode) or stat.S_ISSOCK(in_mode) or os.isatty(in_fd):
            os.set_blocking(in_fd, False)
            self.selector.register(in_fd, selectors.EVENT_READ, self._read_stdin)
        elif stat.S_ISREG(in_mode):
            with open(in_fd, "rb", closefd=False) as f:  # a file of commands: take it all now
                self._stdin_buffer += f.read()

    def _setup_metrics(self) -> None:
        if self.options.metrics_dir is None:
            return
        from prometheus_client import Gauge

        from spectacles_gateway import metrics

        self._metrics = metrics
        self._workers_gauge = Gauge(
            "gateway_workers", "Worker processes running.", multiprocess_mode="livesum"
        )
        metrics.total_shards.set(sum(len(s.shards) for s in self.slots))
        # "livemin" over every live process: the supervisor has no broker, so it must not be
        # the 0 that hides the workers' value.
        metrics.broker_connected.set(1)
        if self.options.budget is not None:
            metrics.session_starts_remaining.set(self.options.budget.remaining)

    # ------------------------------------------------------------------ workers

    def spawn(self, slot: WorkerSlot) -> None:
        parent, child = socket.socketpair()
        spec = describe_ids(slot.shards)
        argv = [
            sys.executable,
            "-m",
            "spectacles_gateway.workerproc",
            "--worker",
            str(slot.index),
            "--shards",
            spec,
            "--fd",
            str(child.fileno()),
        ]
        stdio = self.options.stdio is not None
        blocked = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                argv,
                pass_fds=(child.fileno(),),
                stdin=subprocess.PIPE if stdio else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdio else subprocess.DEVNULL,
                close_fds=True,
                start_new_session=False,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            child.close()
        now = time.monotonic()
        slot.proc = proc
        slot.sock = parent
        slot.buffer = LineBuffer()
        slot.started = now
        slot.last_seen = now
        slot.killed_by_us = False
        slot.stall_killed = False
        slot.restart_at = None
        slot.status = {}
        slot.broker = False
        plan = dict(self.options.plan, shard_ids=list(slot.shards), worker_id=slot.index)
        sessions = {str(s): self.sessions.get(s) for s in slot.shards}
        parent.sendall(
            encode({"t": "plan", "plan": plan, "argv": self.options.argv, "sessions": sessions})
        )
        parent.setblocking(False)
        self.selector.register(
            parent, selectors.EVENT_READ, lambda m, s=slot: self._read_control(s)
        )
        if stdio:
            assert proc.stdout is not None and proc.stdin is not None
            os.set_blocking(proc.stdout.fileno(), False)
            os.set_blocking(proc.stdin.fileno(), False)
            slot.out = proc.stdout
            slot.inp = proc.stdin
            slot.out_partial = bytearray()
            slot.in_pending = bytearray()
            self.selector.register(
                proc.stdout, selectors.EVENT_READ, lambda m, s=slot: self._read_worker_out(s)
            )
        log.info("worker %d started (pid %d) for shards %s", slot.index, proc.pid, spec)
        if self._metrics is not None:
            self._workers_gauge.inc()

    def _read_control(self, slot: WorkerSlot) -> None:
        assert slot.sock is not None
        try:
            data = slot.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_control(slot)
            return
        slot.last_seen = time.monotonic()
        for message in slot.buffer.feed(data):
            self._handle(slot, message)

    def _close_control(self, slot: WorkerSlot) -> None:
        if slot.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(slot.sock)
            slot.sock.close()
            slot.sock = None

    def _send(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        if slot.sock is None:
            return
        try:
            slot.sock.send(encode(message))
        except OSError as exc:
            log.warning("worker %d: control message lost (%s)", slot.index, exc)

    def _handle(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "status":
            shards = message.get("shards") or {}
            slot.status = {int(k): v for k, v in shards.items()}
            slot.broker = bool(message.get("broker"))
            for key, session in (message.get("sessions") or {}).items():
                shard = int(key)
                if shard in slot.shards:
                    self.sessions[shard] = session
        elif kind == "identify":
            shard = int(message["shard"])
            if shard in slot.shards and self.stopping is None:
                self.gate.request(shard)
        elif kind == "identified":
            shard = int(message["shard"])
            sent = message.get("sent")
            self.gate.release(shard, float(sent) if sent is not None else None)
            if sent is not None and self._metrics is not None and self.options.budget is not None:
                self._metrics.session_starts_remaining.set(self.options.budget.remaining)

    def _grant(self, now: float) -> None:
        if self.stopping is not None:
            return
        for shard in self.gate.grants(now):
            slot = self.owner.get(shard)
            if slot is None or slot.sock is None:
                self.gate.cancel(shard)
                continue
            self._send(slot, {"t": "grant", "shard": shard})

    def _reap(self) -> None:
        for slot in self.slots:
            proc = slot.proc
            if proc is None:
                continue
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = proc.pid, 0
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            self._worker_died(slot, status)

    def _worker_died(self, slot: WorkerSlot, status: int) -> None:
        now = time.monotonic()
        pid = slot.pid
        reason, text = describe_exit(status, killed_by_us=slot.killed_by_us)
        if slot.stall_killed:
            reason, text = "stalled", "killed after its event loop stalled (no heartbeat)"
        self._close_control(slot)
        self._drain_dead_output(slot)
        for pipe in (slot.out, slot.inp):
            if pipe is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(pipe)
                with contextlib.suppress(OSError):
                    pipe.close()
        slot.out = slot.inp = None
        slot.out_partial.clear()  # a half-written record of a dead worker is dropped
        slot.proc = None
        for shard in slot.shards:
            self.gate.cancel(shard)
        if self._metrics is not None and pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.options.metrics_dir)  # type: ignore[no-untyped-call]
            self._workers_gauge.dec()
        spec = describe_ids(slot.shards)
        if self.stopping is not None:
            log.info("worker %d (pid %s, shards %s) %s", slot.index, pid, spec, text)
            return
        if reason == "fatal":
            slot.fatal = True
            log.warning(
                "worker %d (pid %s, shards %s) %s; not restarting it", slot.index, pid, spec, text
            )
            if all(s.fatal for s in self.slots):
                log.warning("no worker is left to run: stopping with exit code 78")
                self.exit_code = EX_CONFIG
                self._begin_stop("graceful")
            return
        if slot.rolling:
            slot.rolling = False
            log.info("worker %d (shards %s) stopped for the rolling restart", slot.index, spec)
            self.spawn(slot)
            return
        if now - slot.started > STABLE_AFTER:
            slot.failures = 0
        slot.failures += 1
        delay = backoff_delay(slot.failures, self.options.rand(), base=0.5, cap=30.0)
        slot.restart_at = now + delay
        log.error(
            "worker %d (pid %s, shards %s) %s; restarting in %.1f s",
            slot.index,
            pid,
            spec,
            text,
            delay,
        )
        if self._metrics is not None:
            self._metrics.worker_restarts.labels(str(slot.index), reason).inc()

    def _kill(self, slot: WorkerSlot, sig: int) -> None:
        if slot.proc is None:
            return
        slot.killed_by_us = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.proc.pid, sig)

    # ------------------------------------------------------------------ stdio relay

    def _read_or_unregister(self, source: Any, size: int) -> bytes | None:
        """Read what a non-blocking pipe has; at EOF (or error) stop watching it: None."""
        fd = source if isinstance(source, int) else source.fileno()
        try:
            data = os.read(fd, size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(source)
            return None
        return data

    def _read_worker_out(self, slot: WorkerSlot) -> None:
        if slot.out is None:
            return
        data = self._read_or_unregister(slot.out, 1 << 18)
        if data is None:
            return
        partial = slot.out_partial
        partial += data
        end = self._record_end(partial)
        if end:
            self._relay_out += partial[:end]
            del partial[:end]
            self._write_stdout()

    def _drain_dead_output(self, slot: WorkerSlot) -> None:
        """Relay what a dead worker left in its pipe: those events were confirmed (they reached
        the pipe), so dropping them would lose them; a trailing half record is discarded."""
        if slot.out is None:
            return
        fd = slot.out.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 18)
            except (BlockingIOError, InterruptedError):
                break  # someone else (a grandchild) holds the pipe open: take what is there
            except OSError:
                break
            if not data:
                break
            slot.out_partial += data
            end = self._record_end(slot.out_partial)
            self._relay_out += slot.out_partial[:end]
            del slot.out_partial[:end]
        self._write_stdout()

    def _record_end(self, buf: bytearray) -> int:
        """Length of the whole records at the start of ``buf``."""
        if self.options.stdio == "json":
            return buf.rfind(b"\n") + 1
        pos = 0
        while pos < len(buf):
            try:
                end = msgpack_object_end(buf, pos)
            except ValueError:
                return len(buf)
            if end is None:
                break
            pos = end
        return pos

    def _write_stdout(self) -> None:
        fd = self._stdout_fd
        if fd is None or not self._relay_out:
            return
        try:
            if self._stdout_blocking:
                data = bytes(self._relay_out)
                self._relay_out.clear()
                with memoryview(data) as view:
                    done = 0
                    while done < len(data):
                        done += os.write(fd, view[done:])
            else:
                written = os.write(fd, self._relay_out)
                del self._relay_out[:written]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # EPIPE and friends: the reader is gone for good
            log.error("stdout was closed (%s); events can no longer be written; stopping", exc)
            self._relay_out.clear()
            self._stdout_fd = None
            self.exit_code = EX_IOERR
            self._begin_stop("fast")
            return
        self._update_relay_interest()

    def _update_relay_interest(self) -> None:
        fd = self._stdout_fd
        pending = len(self._relay_out)
        if fd is not None and not self._stdout_blocking:
            if pending and not self._stdout_registered:
                self.selector.register(fd, selectors.EVENT_WRITE, lambda m: self._write_stdout())
                self._stdout_registered = True
            elif not pending and self._stdout_registered:
                self.selector.unregister(fd)
                self._stdout_registered = False
        # Back-pressure: stop reading workers while our stdout is behind; their pipes fill,
        # their writes pause, and their shards stop reading the gateway.
        for slot in self.slots:
            if slot.out is None:
                continue
            key = self.selector.get_map().get(slot.out.fileno())
            if pending > RELAY_HIGH_WATER and key is not None:
                self.selector.unregister(slot.out)
            elif pending <= RELAY_HIGH_WATER // 2 and key is None:
                self.selector.register(
                    slot.out, selectors.EVENT_READ, lambda m, s=slot: self._read_worker_out(s)
                )

    def _read_stdin(self, mask: int) -> None:
        data = self._read_or_unregister(sys.stdin.fileno(), 1 << 16)
        if data is None:
            return
        self._stdin_buffer += data
        self._route_stdin()

    def _route_stdin(self) -> None:
        buf = self._stdin_buffer
        while buf:
            if self.options.stdio == "json":
                newline = buf.find(b"\n")
                if newline < 0:
                    if len(buf) > 1 << 20:
                        self._drop_input("too_large", "command line over 1 MiB")
                        buf.clear()
                    return
                record = bytes(buf[: newline + 1])
                del buf[: newline + 1]
                if not record.strip():
                    continue
            else:
                try:
                    end = msgpack_object_end(buf, 0)
                except ValueError:
                    self._drop_input("not_msgpack", "stdin is not a msgpack stream; discarding")
                    buf.clear()
                    return
                if end is None:
                    return
                record = bytes(buf[:end])
                del buf[:end]
            self._route_record(record)

    def _route_record(self, record: bytes) -> None:
        """Send a stdin record to the worker(s) whose shard it targets; the worker validates
        it fully. Records we can route nowhere are dropped here, once."""
        try:
            if self.options.stdio == "json":
                obj = json.loads(record)
            else:
                import msgspec

                obj = msgspec.msgpack.decode(record)
        except ValueError as exc:
            self._drop_input("not_json", f"stdin line is not JSON ({exc}): {record[:80]!r}")
            return
        if not isinstance(obj, dict) or obj.get("event") != "SEND":
            event = obj.get("event") if isinstance(obj, dict) else None
            reason = "unknown_event" if isinstance(obj, dict) else "wrong_shape"
            self._drop_input(reason, f"stdin record with event {event!r}; only SEND is read")
            return
        data = obj.get("data")
        body = json.dumps(data).encode() if isinstance(data, dict) else data
        try:
            command = parse_command(body if isinstance(body, bytes | str) else b"")
        except CommandError as exc:
            self._drop_input(exc.reason, str(exc))
            return
        if command.shard_id is not None:
            targets = [self.owner.get(command.shard_id)]
        elif command.guild_id is not None:
            targets = [self.owner.get(target_shard(command.guild_id, self.options.shard_count))]
        else:
            targets = list(self.slots)
        if any(t is None for t in targets):
            shard = command.shard_id if command.shard_id is not None else "routed"
            self._drop_input("unknown_shard", f"no worker runs shard {shard}")
            return
        for slot in targets:
            assert slot is not None
            slot.in_pending += record
            self._flush_worker_in(slot)

    def _flush_worker_in(self, slot: WorkerSlot) -> None:
        if slot.inp is None or not slot.in_pending:
            return
        try:
            written = os.write(slot.inp.fileno(), slot.in_pending)
            del slot.in_pending[:written]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            slot.in_pending.clear()

    def _drop_input(self, reason: str, detail: str) -> None:
        log.warning("dropped input from stdin: %s", detail)
        if self._metrics is not None:
            self._metrics.input_dropped.labels("stdio", reason).inc()

    # ------------------------------------------------------------------ HTTP

    def _http(self, path: str) -> Response:
        if path == self.options.metrics_path:
            return self._metrics_response()
        if path in ("/healthz", "/livez", "/health"):
            return Response(200, b"ok\n")
        if path == "/readyz":
            ready, why = self.readiness()
            return Response(200 if ready else 503, (why + "\n").encode())
        if path == "/status":
            return Response(200, json.dumps(self.status(), indent=1).encode(), "application/json")
        return Response(404, b"not found\n")

    def _metrics_response(self) -> Response:
        if self.options.metrics_dir is None:
            return Response(404, b"metrics are off\n")
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.options.metrics_dir)  # type: ignore[no-untyped-call]
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    def readiness(self) -> tuple[bool, str]:
        if self.stopping is not None:
            return False, "stopping"
        for slot in self.slots:
            if slot.fatal:
                continue
            if slot.proc is None:
                return False, f"worker {slot.index} is not running"
            if not slot.broker:
                return False, f"worker {slot.index}: broker not connected"
            for shard in slot.shards:
                if not slot.status.get(shard, {}).get("ready"):
                    return False, f"shard {shard} is not ready"
        return True, "ready"

    def shards_ready(self) -> int:
        return sum(
            1 for slot in self.slots for s in slot.shards if slot.status.get(s, {}).get("ready")
        )

    def progress(self, now: float) -> dict[str, Any]:
        total = sum(len(s.shards) for s in self.slots)
        ready = self.shards_ready()
        waiting = self.gate.waiting
        next_at = self.gate.next_time(now)
        next_in = max(0.0, next_at - now) if next_at is not None else 0.0
        windows = math.ceil(waiting / self.gate.max_concurrency) if waiting else 0
        left = next_in + max(0, windows - 1) * self.gate.window if waiting else 0.0
        return {
            "ready": ready,
            "total": total,
            "identified": self.gate.identified,
            "waiting_to_identify": waiting,
            "next_bucket_in": round(next_in, 1),
            "estimated_seconds_left": round(left, 1),
        }

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        shards = {}
        for slot in self.slots:
            for shard in slot.shards:
                info = dict(slot.status.get(shard, {"state": "starting", "ready": False}))
                info["worker"] = slot.index
                info["worker_pid"] = slot.pid
                shards[str(shard)] = info
        return {
            "ready": self.readiness()[0],
            "stopping": self.stopping,
            "uptime": round(now - self.started, 1),
            "shard_count": self.options.shard_count,
            "progress": self.progress(now),
            "workers": [
                {
                    "worker": s.index,
                    "pid": s.pid,
                    "shards": describe_ids(s.shards),
                    "broker_connected": s.broker,
                    "fatal": s.fatal,
                    "restarts": s.failures,
                }
                for s in self.slots
            ],
            "shards": shards,
        }

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        self._install_signals()
        self._setup_metrics()
        self._setup_stdio()
        if self.options.http is not None:
            host, port = self.options.http
            self.http = HttpServer(self.selector, host, port, self._http)
            log.info("metrics and health on http://%s:%d", host, self.http.port)
        for slot in self.slots:
            self.spawn(slot)
        if self._stdin_buffer:
            self._route_stdin()
        try:
            while True:
                now = time.monotonic()
                self._handle_signals()
                self._reap()
                if self.stopping is not None and all(s.proc is None for s in self.slots):
                    break
                self._housekeeping(now)
                timeout = self._timeout(now)
                for key, mask in self.selector.select(timeout):
                    key.data(mask)
        finally:
            self._shutdown_io()
        return self.exit_code

    def _timeout(self, now: float) -> float:
        timeout = 1.0
        next_grant = self.gate.next_time(now)
        if next_grant is not None:
            timeout = min(timeout, max(0.0, next_grant - now))
        for slot in self.slots:
            if slot.restart_at is not None:
                timeout = min(timeout, max(0.0, slot.restart_at - now))
        if self._next_watchdog:
            timeout = min(timeout, max(0.0, self._next_watchdog - now))
        if self._signals:
            timeout = 0.0
        return timeout

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.popleft()
            if sig == signal.SIGCHLD:
                continue  # _reap runs every round
            if sig == signal.SIGTERM:
                self._begin_stop("fast" if self.stopping else "graceful")
            elif sig == signal.SIGINT:
                self._begin_stop("fast")
            elif sig == signal.SIGHUP:
                self._begin_rolling_restart()

    def _begin_stop(self, how: str) -> None:
        if self.stopping in ("fast", how):
            return
        self.stopping = how
        timeout = self.options.shutdown_timeout if how == "graceful" else 2.0
        self.stop_deadline = time.monotonic() + timeout + 1.0
        log.info("stopping (%s): no new identifies; workers close their shards resumably", how)
        if self.options.notifier is not None:
            self.options.notifier.stopping()
        sig = signal.SIGTERM if how == "graceful" else signal.SIGINT
        for slot in self.slots:
            slot.restart_at = None
            if slot.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, sig)

    def _begin_rolling_restart(self) -> None:
        if self.stopping is not None:
            return
        if self._rolling or self._rolling_current is not None:
            log.info("a rolling restart is already running")
            return
        self._rolling = deque(s for s in self.slots if not s.fatal)
        log.info("rolling restart of %d workers, one at a time", len(self._rolling))
        self._reloading = True
        if self.options.notifier is not None:
            self.options.notifier.reloading("rolling restart")

    def _step_rolling(self, now: float) -> None:
        current = self._rolling_current
        if current is not None:
            all_ready = current.proc is not None and all(
                current.status.get(s, {}).get("ready") for s in current.shards
            )
            if current.rolling or not all_ready:
                if now - self._rolling_since < 120.0:
                    return
                log.warning("worker %d not ready 120 s into its restart; going on", current.index)
            self._rolling_current = None
        if not self._rolling:
            if self._reloading:
                self._reloading = False
                log.info("rolling restart done")
                if self.options.notifier is not None:
                    self.options.notifier.ready("rolling restart done")
            return
        slot = self._rolling.popleft()
        if slot.proc is None:
            return
        self._rolling_current = slot
        self._rolling_since = now
        slot.rolling = True
        log.info(
            "rolling restart: stopping worker %d (shards %s)", slot.index, describe_ids(slot.shards)
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.proc.pid, signal.SIGTERM)
        slot.killed_by_us = True

    def _housekeeping(self, now: float) -> None:
        self._grant(now)
        if self.stopping is not None:
            if now > self.stop_deadline:
                for slot in self.slots:
                    if slot.proc is not None:
                        log.warning("worker %d did not stop in time: killing it", slot.index)
                        self._kill(slot, signal.SIGKILL)
                self.stop_deadline = now + 5.0
            return
        for slot in self.slots:
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                self.spawn(slot)
            elif (
                slot.proc is not None
                and not slot.stall_killed
                and now - slot.last_seen > self.options.stall_timeout
            ):
                log.error(
                    "worker %d (pid %d) sent no heartbeat for %.0f s: its event loop is stuck; "
                    "killing it",
                    slot.index,
                    slot.proc.pid,
                    now - slot.last_seen,
                )
                slot.stall_killed = True
                self._kill(slot, signal.SIGKILL)
            if slot.in_pending:
                self._flush_worker_in(slot)
        self._step_rolling(now)
        if self.http is not None:
            self.http.expire(now)
        total = sum(len(s.shards) for s in self.slots if not s.fatal)
        ready = self.shards_ready()
        if ready == total and total and not self._ready_notified:
            self._ready_notified = True
            self.ready_since = now
            log.info("all %d shards are ready (%.1f s after start)", total, now - self.started)
            if self.options.notifier is not None:
                self.options.notifier.ready(f"{total} shards ready")
        if ready != self._last_ready_count:
            self._last_ready_count = ready
            if self.options.notifier is not None:
                self.options.notifier.status(f"{ready}/{total} shards ready")
        if ready < total and now >= self._next_progress and now - self.started > 1.0:
            self._next_progress = now + PROGRESS_EVERY
            p = self.progress(now)
            if p["waiting_to_identify"] or p["identified"] < total:
                log.info(
                    "identified %d/%d shards, %d ready; next bucket in %.1f s, about %s left",
                    p["identified"],
                    total,
                    ready,
                    p["next_bucket_in"],
                    _human(p["estimated_seconds_left"]),
                )
        if self._metrics is not None:
            self._metrics.identify_progress.set(ready / total if total else 1.0)
        notifier = self.options.notifier
        if notifier is not None and now >= self._next_watchdog:
            interval = notifier.watchdog_interval()
            if interval:
                notifier.watchdog()
                self._next_watchdog = now + interval

    def _shutdown_io(self) -> None:
        self._write_stdout()
        if self._relay_out and self._stdout_fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(self._stdout_fd, True)
                os.write(self._stdout_fd, bytes(self._relay_out))
        if self.http is not None:
            self.http.close()
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _human(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def plan_fields(plan: Any) -> dict[str, Any]:
    """WorkerPlan as JSON-able fields for the control socket."""
    fields = dataclasses.asdict(plan)
    events = fields.get("events")
    fields["events"] = None if events is None else sorted(events)
    fields["shard_ids"] = list(fields["shard_ids"])
    return fields
