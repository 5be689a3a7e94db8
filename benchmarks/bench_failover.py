"""Fleet failover timings over several runs (issue 11): three ``spectacles-supervise --fleet``
members share 12 shards through the real Redis and the simulator; one member's whole process
tree is killed with SIGKILL (its shards resume elsewhere once their leases run out) or sent
SIGTERM (it hands them off first). Prints, per run and over all runs, the time from the signal to
each lost shard's RESUMED, the identifies (0 is the goal) and the events seen twice.

    .venv/bin/python benchmarks/bench_failover.py [--runs 5] [--lease 4]

Needs Redis on 127.0.0.1:6379 (``TEST_REDIS_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import test_fleet
from tests.gwtest import wait_until
from tests.test_fleet import all_events_out, fleet, owned_once, resumed_after


async def one_run(how: str, lease: float) -> tuple[list[float], int, int]:
    test_fleet.LEASE = lease
    async with fleet() as group:
        for name in ("a", "b", "c"):
            await group.start(name)  # with the lease set above
        sim = group.sim
        await wait_until(lambda: owned_once(group, 12, 3), 60, "each shard owned once")
        await wait_until(lambda: len(group.ids()) > 300, 30, "events flowing")
        victim = group.members["c"]
        lost = victim.owned()
        await wait_until(lambda: test_fleet.sessions_stored(group, lost), 10, "sessions saved")
        identifies = sim.ledger.identify_count()
        start = time.monotonic()
        if how == "kill":
            victim.signal_tree(signal.SIGKILL)
        else:
            victim.process.send_signal(signal.SIGTERM)
        await wait_until(
            lambda: all(resumed_after(sim, s, start) for s in lost), lease + 30, "resumed"
        )
        delays = [resumed_after(sim, s, start) - start for s in lost]  # type: ignore[operator]
        counts = await all_events_out(group)
        await group.stop()
        twice = sum(n - 1 for n in counts.values())
        return delays, sim.ledger.identify_count() - identifies, twice


def summary(label: str, delays: list[float]) -> str:
    return (
        f"{label}: median {statistics.median(delays):.2f} s, worst {max(delays):.2f} s, "
        f"best {min(delays):.2f} s over {len(delays)} shards"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lease", type=float, default=4.0)
    args = parser.parse_args()
    os.environ.setdefault("TEST_TIME_FACTOR", "1")
    for how in ("kill", "term"):
        everything: list[float] = []
        for run in range(args.runs):
            delays, identifies, twice = await one_run(how, args.lease)
            everything += delays
            print(
                f"{how} run {run + 1}: resumed after "
                f"{', '.join(f'{d:.2f}' for d in sorted(delays))} s; "
                f"{identifies} identifies, {twice} events twice",
                flush=True,
            )
        print(summary(f"{how} (lease {args.lease:g} s)", everything), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
