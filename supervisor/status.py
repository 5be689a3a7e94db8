"""What the supervisor tells the outside: readiness, start-up progress, ``/status``, ``/metrics``.

Read-only views of the supervisor's state (:class:`View`), and the HTTP routes that serve them.
"""

from __future__ import annotations

import json
import time
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

from spectacles_gateway import metrics
from spectacles_gateway.protocol.identify import IdentifyPacer
from spectacles_gateway.telemetry import Aggregator

from .httpd import Response
from .plan import describe_ids
from .reshard import Reshard
from .slots import WorkerSlot

if TYPE_CHECKING:
    from .fleet import FleetSide

__all__ = ["Routes", "View", "human", "page", "progress", "readiness", "shard_columns", "status"]


class View(Protocol):
    """The parts of the supervisor these views read."""

    slots: list[WorkerSlot]
    pacer: IdentifyPacer
    stopping: str | None
    started: float
    shard_count: int
    fleet: FleetSide | None
    reshard: Reshard | None

    def current_slots(self) -> list[WorkerSlot]: ...


def readiness(view: View) -> tuple[bool, str]:
    if view.stopping is not None:
        return False, "stopping"
    if view.fleet is not None and not view.fleet.fully_owned():
        return False, "the fleet does not own every shard yet"
    for slot in view.current_slots():
        if slot.fatal:
            continue
        if slot.proc is None:
            return False, f"worker {slot.index} is not running"
        if not slot.broker:
            return False, f"worker {slot.index}: broker not connected"
        for shard in slot.shards:
            shard_status = slot.status.get(shard)
            if shard_status is None or not shard_status.ready:
                return False, f"shard {shard} is not ready"
    return True, "ready"


def shards_ready(view: View) -> int:
    return sum(slot.ready_shards() for slot in view.current_slots())


def progress(view: View, now: float) -> dict[str, Any]:
    total = sum(len(s.shards) for s in view.current_slots())
    pacer = view.pacer
    waiting = pacer.waiting
    next_at = pacer.next_time(now)
    next_in = max(0.0, next_at - now) if next_at is not None else 0.0
    left = pacer.seconds_left(now)
    return {
        "ready": shards_ready(view),
        "total": total,
        "identified": pacer.identified,
        "waiting_to_identify": waiting,
        "next_bucket_in": round(next_in, 1),
        "estimated_seconds_left": round(left, 1),
    }


def shard_entries(view: View) -> dict[str, dict[str, Any]]:
    """Every shard's state, seq, latency, last close and worker: ``/status?shards=1``."""
    shards: dict[str, dict[str, Any]] = {}
    for slot in view.current_slots():
        for shard in slot.shards:
            info = slot.status.get(shard)
            entry: dict[str, Any] = (
                {"state": "starting", "ready": False}
                if info is None
                else {
                    "state": info.state,
                    "ready": info.ready,
                    "seq": info.seq,
                    "latency_ms": info.latency_ms,
                    "last_close": info.last_close,
                    "fatal": info.fatal,
                }
            )
            entry["worker"] = slot.index
            entry["worker_pid"] = slot.pid
            shards[str(shard)] = entry
    return shards


def shard_columns(view: View) -> dict[str, Any]:
    """Every shard, column by column, for the shard map (``/status?shards=columns``).

    About a sixth of ``/status?shards=1`` in bytes: the ids as a range spec, states and close
    reasons as indexes into short lists, and one array per value, in shard id order. A shard
    with no report yet is ``starting`` with nulls.
    """
    rows: list[tuple[int, int, Any]] = []
    for slot in view.current_slots():
        rows.extend((shard, slot.index, slot.status.get(shard)) for shard in slot.shards)
    rows.sort(key=lambda row: row[0])
    names: dict[str, int] = {}
    closes: dict[str, int] = {}
    state: list[int] = []
    seq: list[int | None] = []
    latency: list[float | None] = []
    last_close: list[int] = []
    fatal: dict[str, int] = {}
    for shard, _, info in rows:
        if info is None:
            state.append(names.setdefault("starting", len(names)))
            seq.append(None)
            latency.append(None)
            last_close.append(-1)
            continue
        state.append(names.setdefault(info.state, len(names)))
        seq.append(info.seq)
        latency.append(info.latency_ms)
        close = info.last_close
        last_close.append(-1 if close is None else closes.setdefault(close, len(closes)))
        if info.fatal is not None:
            fatal[str(shard)] = info.fatal
    return {
        "ids": describe_ids([shard for shard, _, _ in rows]),
        "states": list(names),
        "state": state,
        "seq": seq,
        "latency_ms": latency,
        "worker": [index for _, index, _ in rows],
        "closes": list(closes),
        "last_close": last_close,
        "fatal": fatal,
    }


def status(view: View, now: float, *, shards: bool = False) -> dict[str, Any]:
    """The summary (quick at any shard count); with ``shards``, every shard too."""
    states: dict[str, int] = {}
    for slot in view.current_slots():
        for shard in slot.shards:
            info = slot.status.get(shard)
            state = "starting" if info is None else info.state
            states[state] = states.get(state, 0) + 1
    out: dict[str, Any] = {
        "ready": readiness(view)[0],
        "stopping": view.stopping,
        "uptime": round(now - view.started, 1),
        "shard_count": view.shard_count,
        "progress": progress(view, now),
        "states": states,
        "workers": [
            {
                "worker": s.index,
                "pid": s.pid,
                "shards": describe_ids(s.shards),
                "broker_connected": s.broker,
                "fatal": s.fatal,
                "restarts": s.failures,
                "generation": s.generation,
                **({"standby": True} if s.standby else {}),
                **({"retiring": True} if s.retiring else {}),
            }
            for s in view.slots
        ],
    }
    if view.fleet is not None:
        out["fleet"] = view.fleet.status()
    if view.reshard is not None:
        out["reshard"] = view.reshard.status(now)
    if shards:
        out["shards"] = shard_entries(view)
    return out


def human(seconds: float) -> str:
    """``2m05s``: for log lines."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    return f"{seconds // 60}m{seconds % 60:02d}s"


@cache
def page() -> bytes:
    """The shard map (``GET /``): one self-contained HTML file shipped in the package."""
    from importlib import resources  # once, for the first page: it costs 1 MiB of memory

    return resources.files("supervisor").joinpath("shardmap.html").read_bytes()


class Routes:
    """``GET`` handlers of the metrics and health listener."""

    def __init__(self, view: View, aggregator: Aggregator, metrics_path: str) -> None:
        self.view = view
        self.aggregator = aggregator
        self.metrics_path = metrics_path

    def __call__(self, path: str, query: str) -> Response:
        if path == self.metrics_path:
            body = self.aggregator.render(metrics.REGISTRY)
            return Response(200, body, "text/plain; version=0.0.4; charset=utf-8")
        if path in ("/healthz", "/livez", "/health"):
            return Response(200, b"ok\n")
        if path == "/readyz":
            ready, why = readiness(self.view)
            return Response(200 if ready else 503, (why + "\n").encode())
        if path == "/status":
            shards = parse_qs(query).get("shards", [""])[-1]
            out = status(self.view, time.monotonic(), shards=shards in ("1", "all"))
            if shards == "columns":
                out["columns"] = shard_columns(self.view)
            body = json.dumps(out, separators=(",", ":")).encode()
            return Response(200, body, "application/json")
        if path == "/":
            return Response(200, page(), "text/html; charset=utf-8")
        return Response(404, b"not found\n")

    def post(self, path: str, query: str) -> Response:
        """``POST /reshard[?to=N]`` (loopback only, see :mod:`.httpd`)."""
        if path != "/reshard":
            return Response(404, b"not found\n")
        to = parse_qs(query).get("to", [""])[-1]
        if to and not (to.isascii() and to.isdigit()):
            return Response(400, b"to: a shard count\n")
        request = getattr(self.view, "request_reshard", None)
        if request is None:
            return Response(409, b"resharding is not available here\n")
        code, answer = request(int(to) if to else None)
        return Response(code, (answer + "\n").encode())
