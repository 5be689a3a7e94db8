"""``spectacles-supervise reshard [--to N] [--url URL]``: ask a running gateway to reshard.

A single supervisor is asked over its HTTP listener (``POST /reshard?to=N``, answered on
loopback only); a fleet (``FLEET_NAME`` set, no ``--url``) through Redis, where whichever
member takes the reshard lock runs it. Without ``--to``, the new count is Discord's
recommendation. Exit 0 when the request was taken, 1 when it was refused or nobody answered,
78 when there is nowhere to ask.
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from typing import TextIO

from spectacles_gateway.config import ReshardCommand, Settings
from spectacles_gateway.exitcodes import EX_CONFIG
from spectacles_gateway.redact import redact_url

from .children import run_module
from .statuscmd import TIMEOUT, StatusError, _request, default_url

__all__ = ["run_reshard"]

PROG = "spectacles-supervise reshard"


def ask_supervisor(url: str, to: int | None, *, timeout: float = TIMEOUT) -> tuple[int, str]:
    """POST the request; (HTTP status, the supervisor's one-line answer)."""
    shown = redact_url(url, whole_userinfo=True)
    request = _request(url, "/reshard" + (f"?to={to}" if to is not None else ""))
    request.method = "POST"
    request.data = b""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read(4096).decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096).decode(errors="replace").strip()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"no supervisor answers at {shown} ({reason})") from None


def ask_fleet(argv: list[str], out: TextIO, err: TextIO) -> int:
    """Through Redis, from a child process (the Redis client stays out of this package)."""
    try:
        done = run_module("spectacles_gateway.fleet.request", argv, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"{PROG}: the request could not be made ({exc})", file=err)
        return 1
    text = done.stdout.decode(errors="replace").strip()
    if done.returncode == 0:
        print(f"{PROG}: {text}", file=out)
        return 0
    detail = done.stderr.decode(errors="replace").strip().splitlines()
    print(f"{PROG}: {detail[-1] if detail else 'the request failed'}", file=err)
    return 1


def run_reshard(
    command: ReshardCommand, settings: Settings, argv: list[str], out: TextIO, err: TextIO
) -> int:
    if command.to is not None and command.to < 1:
        print(f"{PROG}: --to: the shard count must be at least 1", file=err)
        return EX_CONFIG
    if settings.fleet.name and command.url is None:
        return ask_fleet(argv, out, err)
    url = command.url or default_url(settings.prometheus)
    if url is None:
        print(
            f"{PROG}: no address to ask: pass --url or set PROMETHEUS_ADDRESS "
            "(config key 'prometheus.address')",
            file=err,
        )
        return EX_CONFIG
    try:
        code, answer = ask_supervisor(url, command.to)
    except StatusError as exc:
        print(f"{PROG}: {exc}", file=err)
        return 1
    if code == 202:
        print(f"{PROG}: {answer}", file=out)
        return 0
    print(f"{PROG}: refused (HTTP {code}): {answer}", file=err)
    return 1
