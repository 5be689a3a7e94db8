"""Short-lived child processes of our own interpreter, for what the supervisor must not load
itself (the Redis client: reading the generation pointer, an operator's request to a fleet)."""

from __future__ import annotations

import subprocess
import sys

__all__ = ["run_module"]


def run_module(
    module: str, argv: list[str], *, timeout: float, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``python -m module *argv``, its output captured; raises ``OSError`` or
    ``subprocess.TimeoutExpired`` when it cannot run or takes too long."""
    return subprocess.run(  # noqa: S603 - our own interpreter and one of our modules
        [sys.executable, "-P", "-m", module, *argv],  # -P: not the working directory's code
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
