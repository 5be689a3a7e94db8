"""What the benchmarks share: the environment that points ``spectacles-supervise`` at a simulator,
and a process's CPU time from ``/proc``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["context_switches", "cpu_seconds", "simulator_env"]

TICKS = os.sysconf("SC_CLK_TCK")


def simulator_env(http_base: str, *, inherit: bool = True, **extra: str) -> dict[str, str]:
    """Our environment (``inherit``; else only ``PATH``) with the simulator at ``http_base`` as
    Discord's API, a simulated token and MESSAGE_CREATE events; ``extra`` adds or overrides."""
    host = http_base.split("://", 1)[1].split("/", 1)[0]
    env = dict(os.environ) if inherit else {"PATH": os.environ.get("PATH", "")}
    env.update(
        DISCORD_TOKEN="simulated-token",
        DISCORD_API_PROTOCOL="http",
        DISCORD_API_HOST=host,
        DISCORD_EVENTS="MESSAGE_CREATE",
        LOG_LEVEL="warn",
    )
    env.update(extra)
    return env


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of ``pid`` (its wake-ups; 0 once gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return sum(
        int(line.split()[1])
        for line in text.splitlines()
        if line.endswith(tuple("0123456789"))
        and line.split(":")[0] in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
    )
