"""Two tests at a time on one machine (pytest-xdist), and the few that must run alone.

Every test holds the machine's lock shared while it runs; a test marked ``alone`` (it restarts
the RabbitMQ every test uses, raises its memory alarm, runs a Docker engine, or opens thousands
of sockets) holds it exclusively, so no other test runs beside it. A turnstile lock in front
gives the exclusive side its turn: once it waits, no new test starts until it has run.

The locks are files in the checkout (``tests/.share/``), so two checkouts never wait on each
other; without xdist there is one test at a time anyway and the locks cost two ``flock`` calls.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_DIR", "machine_share"]

LOCK_DIR = Path(__file__).resolve().parents[1] / ".share"


@contextmanager
def machine_share(*, alone: bool, directory: Path = LOCK_DIR) -> Iterator[None]:
    directory.mkdir(exist_ok=True)
    with open(directory / "turnstile", "a") as turn, open(directory / "machine", "a") as machine:
        fcntl.flock(turn, fcntl.LOCK_EX)
        try:
            fcntl.flock(machine, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)
