"""``spectacles-supervise status [--url URL] [--json]``: a running supervisor's state in a terminal.

Asks ``/status`` (with every shard, column by column: ``?shards=columns``) and prints the
summary, the start-up progress, the workers, a grid of every shard (one character each) and a
table of the shards (all of them up to :data:`TABLE_ALL`, else those that are not ready). With
``--json``, the ``/status`` summary as the supervisor sends it. Nothing answering is one line on
stderr and exit 1; no address to ask is a configuration error (exit 78).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections import Counter
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from spectacles_gateway.config import PrometheusSettings, StatusCommand
from spectacles_gateway.exitcodes import EX_CONFIG
from spectacles_gateway.redact import redact_url
from spectacles_gateway.shardspec import parse_shard_spec

from .plan import describe_ids
from .status import human

__all__ = ["GLYPHS", "default_url", "render", "run_status"]

TIMEOUT = 5.0
TABLE_ALL = 32  # up to this many shards, the table lists every shard; beyond, the unready ones
TABLE_MAX = 40  # rows of the table of unready shards at most
GRID_ROW = 50  # shards per line of the grid

#: One character per state in the grid (a fatal shard is ``X`` whatever its state).
GLYPHS = {
    "ready": "#",
    "resuming": "r",
    "identifying": "i",
    "waiting_hello": "h",
    "disconnected": "d",
    "closing": "c",
    "starting": ".",
    "stopped": "s",
}


class StatusError(Exception):
    """No usable answer: the one line to print."""


def default_url(prometheus: PrometheusSettings) -> str | None:
    """Where this configuration's supervisor listens (``PROMETHEUS_ADDRESS``), as a client
    reaches it: a wildcard address is asked on loopback. None when the listener is off."""
    if not prometheus.enabled:
        return None
    host = prometheus.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{prometheus.port}"


def _request(url: str, path: str) -> urllib.request.Request:
    """``path`` under ``url`` (which may carry a path prefix, and a user and password for a
    proxy in front: sent as basic authentication, never in the request line)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise StatusError(f"{redact_url(url, whole_userinfo=True)} is not an http(s) URL")
    netloc = parts.netloc.rpartition("@")[2]
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    headers = {"Accept": "application/json"}
    request = urllib.request.Request(base + path, headers=headers)  # noqa: S310 - http(s) only
    if parts.username is not None:
        pair = f"{parts.username}:{parts.password or ''}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    return request


def fetch(url: str, *, columns: bool, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The supervisor's ``/status``; :class:`StatusError` when nothing usable answers."""
    shown = redact_url(url, whole_userinfo=True)
    request = _request(url, "/status?shards=columns" if columns else "/status")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body = response.read(64 << 20)
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{shown} answered HTTP {exc.code} to /status") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"no supervisor answers at {shown} ({reason})") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise StatusError(f"{shown} did not answer /status with JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("progress"), dict):
        raise StatusError(f"{shown} did not answer /status with a supervisor's status")
    return data


def _shards(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``columns`` of a ``/status?shards=columns`` answer as one dict per shard."""
    cols = data.get("columns") or {}
    if not cols.get("ids"):
        return []
    ids = parse_shard_spec(cols["ids"])
    names, closes, fatal = cols["states"], cols["closes"], cols["fatal"]
    return [
        {
            "id": shard,
            "state": names[cols["state"][k]],
            "seq": cols["seq"][k],
            "latency_ms": cols["latency_ms"][k],
            "worker": cols["worker"][k],
            "last_close": closes[cols["last_close"][k]] if cols["last_close"][k] >= 0 else None,
            "fatal": fatal.get(str(shard)),
        }
        for k, shard in enumerate(ids)
    ]


def _fleet(fleet: dict[str, Any] | None, shard_count: int) -> list[str]:
    """The fleet section: this member, every member's shards against its fair share, and the
    shards that nobody owns."""
    if not fleet:
        return []
    me = fleet.get("member")
    head = f"fleet {fleet.get('name')}: this member {me}"
    if fleet.get("draining"):
        head += " (draining: handing its shards off)"
    targets = fleet.get("targets") or {}
    rows = [["member", "shards", "target", "capacity", "renewed"]]
    for m in fleet.get("members") or []:
        name = str(m["member"]) + (" (this one)" if m["member"] == me else "")
        ago = m.get("last_renewal_ago")
        renewed = "-" if ago is None else f"{ago:.1f} s ago"
        capacity = str(m.get("capacity") or "any")
        rows.append([name, str(m.get("shards")), str(targets.get(m["member"], "-")), capacity])
        rows[-1].append(renewed)
    owned = {int(s) for s in fleet.get("owners") or {}}
    unowned = [s for s in range(shard_count) if s not in owned]
    lines = [head, *_table(rows)] if len(rows) > 1 else [head]
    if unowned:
        lines.append(f"  shards without an owner: {describe_ids(unowned)}")
    return lines


def _reshard(reshard: dict[str, Any] | None) -> list[str]:
    """One line while a reshard runs (or after one), none otherwise."""
    if not reshard:
        return []
    state = reshard.get("state", "idle")
    if state != "idle":
        line = (
            f"reshard: {state}, {reshard.get('from')} -> {reshard.get('to')} shards "
            f"(generation {reshard.get('new_generation')}, {reshard.get('reason')}), "
            f"{reshard.get('new_shards_ready', 0)} new shards ready"
        )
        if reshard.get("waiting"):
            line += f"; {reshard['waiting']}"
        return [line]
    last = reshard.get("last")
    if last:
        return [f"last reshard: {last.get('outcome')}: {last.get('detail')}"]
    return []


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(map(str.ljust, row, widths)).rstrip() for row in rows]


def _glyph(shard: dict[str, Any]) -> str:
    return "X" if shard["fatal"] is not None else GLYPHS.get(shard["state"], "?")


def render(data: dict[str, Any], url: str) -> str:
    """The terminal view of a ``/status?shards=columns`` answer."""
    p = data["progress"]
    word = "stopping" if data.get("stopping") else "ready" if data.get("ready") else "not ready"
    lines = [
        f"supervisor at {redact_url(url, whole_userinfo=True)}: {word}, "
        f"up {human(float(data.get('uptime') or 0))}, shard count {data.get('shard_count')}",
        f"shards ready {p['ready']}/{p['total']}, identified {p['identified']}, "
        f"waiting to identify {p['waiting_to_identify']}"
        + (
            f", next bucket in {p['next_bucket_in']:.1f} s, about "
            f"{human(p['estimated_seconds_left'])} left"
            if p["waiting_to_identify"]
            else ""
        ),
    ]
    states = data.get("states") or {}
    lines.append("states: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    lines += _fleet(data.get("fleet"), int(data.get("shard_count") or 0))
    lines += _reshard(data.get("reshard"))
    workers = data.get("workers") or []
    if workers:
        rows = [["worker", "pid", "shards", "broker", "restarts"]]
        for w in workers:
            broker = "fatal" if w.get("fatal") else "yes" if w.get("broker_connected") else "no"
            pid, restarts = str(w.get("pid") or "-"), str(w.get("restarts", 0))
            rows.append([str(w["worker"]), pid, str(w["shards"]), broker, restarts])
        lines += ["workers:", *_table(rows)]
    shards = _shards(data)
    if shards:
        used = Counter(_glyph(s) for s in shards)
        key = {v: k for k, v in GLYPHS.items()} | {"X": "fatal", "?": "other"}
        legend = ", ".join(f"{g} {key[g]}" for g in sorted(used, key=list(key).index))
        lines.append(f"shards ({legend}):")
        for start in range(0, len(shards), GRID_ROW):
            row = shards[start : start + GRID_ROW]
            glyphs = "".join(_glyph(s) for s in row)
            chunks = " ".join(glyphs[i : i + 10] for i in range(0, len(glyphs), 10))
            lines.append(f"  {row[0]['id']:>5} {chunks}")
        everyone = len(shards) <= TABLE_ALL
        listed = shards if everyone else [s for s in shards if s["state"] != "ready"]
        if listed:
            rows = [["shard", "state", "seq", "latency", "worker", "last close"]]
            for s in listed[:TABLE_MAX]:
                latency = "-" if s["latency_ms"] is None else f"{s['latency_ms']:g} ms"
                state = s["state"] if s["fatal"] is None else f"{s['state']} (fatal {s['fatal']})"
                seq = "-" if s["seq"] is None else str(s["seq"])
                rows.append([str(s["id"]), state, seq, latency, str(s["worker"])])
                rows[-1].append(s["last_close"] or "-")
            title = "shards:" if everyone else "shards not ready:"
            lines += [title, *_table(rows)]
            if len(listed) > TABLE_MAX:
                lines.append(f"  ... and {len(listed) - TABLE_MAX} more")
    return "\n".join(lines) + "\n"


def run_status(
    command: StatusCommand, prometheus: PrometheusSettings, out: TextIO, err: TextIO
) -> int:
    url = command.url or default_url(prometheus)
    if url is None:
        print(
            "spectacles-supervise status: no address to ask: pass --url or set "
            "PROMETHEUS_ADDRESS (config key 'prometheus.address')",
            file=err,
        )
        return EX_CONFIG
    try:
        data = fetch(url, columns=not command.json)
    except StatusError as exc:
        print(f"spectacles-supervise status: {exc}", file=err)
        return 1
    if command.json:
        out.write(json.dumps(data, indent=2) + "\n")
        return 0
    try:
        text = render(data, url)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        shown = redact_url(url, whole_userinfo=True)
        print(
            f"spectacles-supervise status: {shown} answered a /status this command cannot "
            f"read ({type(exc).__name__}: {exc})",
            file=err,
        )
        return 1
    out.write(text)
    return 0
