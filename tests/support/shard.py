"""Driving the sans-I/O shard core with bytes and a fake clock: payload builders and helpers
that sort the core's events by kind."""

from __future__ import annotations

import json
import weakref
from typing import Any

from spectacles_gateway.protocol.events import (
    CloseRequest,
    CommandsSent,
    Dispatch,
    Event,
    IdentifySent,
    Notice,
    SendData,
)
from spectacles_gateway.protocol.shard import ShardConfig, ShardProtocol

TOKEN = "MTIz.secret-token"
BASE = "wss://gateway.discord.gg/"
RESUME = "wss://gateway-us-east1-b.discord.gg"
Q = "?v=10&encoding=json&compress=zstd-stream"


def j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def hello(interval_ms: int = 41250) -> bytes:
    return j(
        {"t": None, "s": None, "op": 10, "d": {"heartbeat_interval": interval_ms, "_trace": ["x"]}}
    )


def ready(session: str = "sess-1", s: int = 1, resume: str | None = RESUME) -> bytes:
    d: dict[str, Any] = {"v": 10, "session_id": session, "user": {"id": "1"}, "guilds": []}
    if resume is not None:
        d["resume_gateway_url"] = resume
    return j({"op": 0, "t": "READY", "s": s, "d": d})


def dispatch(s: int, t: str = "MESSAGE_CREATE", d: Any = None) -> bytes:
    return j({"op": 0, "t": t, "s": s, "d": d if d is not None else {"id": str(s)}})


def make(rand: float = 0.5, **kw: Any) -> ShardProtocol:
    session = kw.pop("session", None)
    defaults = {
        "shard_id": 1,
        "shard_count": 4,
        "token": TOKEN,
        "intents": 513,
        "gateway_url": BASE,
        "events": frozenset({"MESSAGE_CREATE", "FUTURE_EVENT"}),
    }
    config = ShardConfig(**{**defaults, **kw})
    return ShardProtocol(config, rand=lambda: rand, session=session)


_OUT: weakref.WeakKeyDictionary[ShardProtocol, list[Event]] = weakref.WeakKeyDictionary()


def take(core: ShardProtocol, kind: type[Any]) -> list[Any]:
    """The core's events of ``kind`` since the last look (others stay for their own look)."""
    buffered = _OUT.setdefault(core, [])
    buffered += core.events_received()
    taken = [e for e in buffered if type(e) is kind]
    buffered[:] = [e for e in buffered if type(e) is not kind]
    return taken


def receive(core: ShardProtocol, data: bytes, now: float) -> Dispatch | None:
    """Feed one message; the dispatch it produced, if any."""
    core.receive(data, now)
    dispatches = take(core, Dispatch)
    return dispatches[-1] if dispatches else None


def sent(core: ShardProtocol) -> list[dict[str, Any]]:
    return [json.loads(e.payload) for e in take(core, SendData)]


def kinds(core: ShardProtocol) -> list[str]:
    return [n.kind.name.lower() for n in take(core, Notice)]


def close_request(core: ShardProtocol) -> tuple[int, str] | None:
    requests = take(core, CloseRequest)
    return (requests[0].code, requests[0].reason) if requests else None


def identify_sent(core: ShardProtocol) -> float | None:
    events = take(core, IdentifySent)
    return events[0].at if events else None


def tickets(core: ShardProtocol) -> list[object]:
    return [t for e in take(core, CommandsSent) for t in e.tickets]


def connected_ready(core: ShardProtocol, now: float = 0.0) -> None:
    """Bring a fresh core to READY on its first connection."""
    core.connection_opened(now, identify_permitted=True)
    core.receive(hello(), now)
    core.receive(ready(), now)
    sent(core)
    kinds(core)
