"""The environment that points ``spectacles-supervise`` at a simulator (for the benchmarks)."""

from __future__ import annotations

import os

__all__ = ["simulator_env"]


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
