"""Helpers for tests that run ``spectacles-supervise`` as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectacles_gateway.simulator import Simulator

from .gwtest import TOKEN, t, wait_until

BIN = Path(sys.executable).parent
SECRET = "MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def duration(seconds: float) -> str:
    """A configuration duration (``"7.5s"``) of ``seconds``, scaled once by :func:`t`."""
    return f"{t(seconds):g}s"


def gateway_env(sim: Simulator, **extra: str) -> dict[str, str]:
    host = sim.http_base.split("://", 1)[1].split("/", 1)[0]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DISCORD_TOKEN": TOKEN,
        "DISCORD_API_PROTOCOL": "http",
        "DISCORD_API_HOST": host,
        "DISCORD_EVENTS": "MESSAGE_CREATE",
        "DISCORD_HELLO_TIMEOUT": duration(5),
        "LOG_LEVEL": "info",
    }
    env.update(extra)
    return env


@dataclass
class Gateway:
    process: asyncio.subprocess.Process
    lines: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines]

    def ids(self) -> list[str]:
        return [r["data"]["id"] for r in self.records() if r["event"] == "MESSAGE_CREATE"]  # type: ignore[index]

    def log(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), t(timeout))
        await asyncio.gather(*self.tasks)
        return code


async def _pump(stream: asyncio.StreamReader, sink: list[bytes], lines: bool) -> None:
    while True:
        chunk = await (stream.readline() if lines else stream.read(65536))
        if not chunk:
            return
        sink.append(chunk)


@asynccontextmanager
async def gateway(
    env: dict[str, str], *args: str, stdin: bool = False, binary: bool = False
) -> AsyncIterator[Gateway]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "spectacles-supervise"),
        *args,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        limit=1 << 24,
    )
    gw = Gateway(process)
    assert process.stdout is not None and process.stderr is not None
    gw.tasks = [
        asyncio.create_task(_pump(process.stdout, gw.lines, not binary)),
        asyncio.create_task(_pump(process.stderr, gw.stderr, False)),
    ]
    try:
        yield gw
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.gather(*gw.tasks, return_exceptions=True)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=t(5)) as response:
        return response.read().decode()


async def metrics_when(
    port: int,
    predicate: Callable[[str], bool],
    timeout: float,
    what: str,
    context: Callable[[], str] | None = None,
) -> str:
    """Scrape until ``predicate`` holds for the text, and return that text.

    Workers hand their metrics to the supervisor once a second: instead of sleeping a second
    before a scrape, wait for the value that proves the report we need has arrived.
    """
    text = ""

    async def holds() -> bool:
        nonlocal text
        try:
            text = await asyncio.to_thread(scrape, port)
        except OSError:
            return False
        return predicate(text)

    await wait_until(holds, timeout, what, context, interval=0.1)
    return text


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def status(port: int, *, shards: bool = False) -> dict[str, Any]:
    query = "?shards=1" if shards else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status{query}", timeout=t(5)) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def health(port: int) -> tuple[int, int]:
    """HTTP status codes of ``/healthz`` and ``/readyz``."""
    codes = []
    for path in ("/healthz", "/readyz"):
        url = f"http://127.0.0.1:{port}{path}"
        with urllib.request.urlopen(url, timeout=t(5)) as response:
            codes.append(response.status)
    return codes[0], codes[1]


def worker_pids(port: int) -> dict[int, int]:
    return {w["worker"]: w["pid"] for w in status(port)["workers"] if w["pid"]}
