"""``spectacles-supervise --simulate``: the bundled gateway simulator as a child process.

It accepts only its own fake token (``simulated-token``): a real token never leaves us. The child
gets a parent-death signal (Linux), so a supervisor killed with SIGKILL does not leave it behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["Simulated", "start_simulator"]

_PR_SET_PDEATHSIG = 1


@dataclass
class Simulated:
    process: subprocess.Popen[bytes]
    http_base: str
    gateway_url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    import ctypes  # already loaded by start_simulator: no import work between fork and exec

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the child outlives a SIGKILLed parent, as any child would


def start_simulator(shard_count: int, rate: float) -> Simulated:
    """Start the bundled gateway simulator on loopback and return where it listens."""
    import ctypes  # noqa: F401 - for _die_with_parent; only a supervisor that simulates loads it

    argv = [
        sys.executable,
        "-P",
        "-m",
        "spectacles_gateway.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--shards",
        str(shard_count),
        "--max-concurrency",
        str(shard_count),
        "--rate",
        str(rate),
    ]
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        argv,
        stdout=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - the supervisor has no threads here
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise RuntimeError(f"the simulator exited with status {process.returncode}")
    info = json.loads(line)
    return Simulated(process, info["http_base"], info["gateway_url"])
