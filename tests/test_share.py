"""The machine's lock for tests run two at a time (tests/support/share.py): a test marked alone
waits for the running ones, and no test starts while it waits or runs."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

from .support.share import machine_share


def test_an_alone_test_waits_for_running_ones_and_later_ones_wait_for_it(tmp_path: Path) -> None:
    order: list[str] = []
    first_in, release_first, alone_waits = threading.Event(), threading.Event(), threading.Event()

    def shared(name: str, started: threading.Event | None, release: threading.Event) -> None:
        with machine_share(alone=False, directory=tmp_path):
            order.append(f"{name} in")
            if started is not None:
                started.set()
            release.wait(10)
            order.append(f"{name} out")

    def alone() -> None:
        alone_waits.set()
        with machine_share(alone=True, directory=tmp_path):
            order.append("alone in")
            order.append("alone out")

    first = threading.Thread(target=shared, args=("first", first_in, release_first))
    first.start()
    assert first_in.wait(10)
    lone = threading.Thread(target=alone)
    lone.start()
    assert alone_waits.wait(10)
    # The alone test waits at the machine lock holding the turnstile (seen from outside: the
    # turnstile cannot be taken); a later shared test then cannot start before it, although
    # the machine lock is only held shared.
    deadline = time.monotonic() + 10
    while not _held(tmp_path / "turnstile"):
        assert time.monotonic() < deadline, "the alone test never reached the turnstile"
        time.sleep(0.005)
    go = threading.Event()
    go.set()
    later = threading.Thread(target=shared, args=("later", None, go))
    later.start()
    later.join(0.3)  # it would be in and out by now if it did not wait
    assert order == ["first in"]
    release_first.set()
    for thread in (first, lone, later):
        thread.join(10)
    assert order == ["first in", "first out", "alone in", "alone out", "later in", "later out"]


def _held(path: Path) -> bool:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False
