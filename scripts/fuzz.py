"""A long fuzz run: the properties of ``tests/test_fuzz.py`` with new seeds until the budget is
spent. CI runs them with 200 examples each; this runs thousands.

Usage: python scripts/fuzz.py [--seconds 600] [--examples 2000]
Prints every round; exits 1 at the first failure, with pytest's report of the failing example.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args()
    env = dict(os.environ, HYPOTHESIS_MAX_EXAMPLES=str(args.examples))
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < args.seconds:
        seed = random.randrange(1 << 32)
        result = subprocess.run(  # noqa: S603 - our own interpreter and test file
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--hypothesis-seed={seed}",
                "tests/test_fuzz.py",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        rounds += 1
        tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        print(f"round {rounds} seed {seed}: {tail}", flush=True)
        if result.returncode != 0:
            print(result.stdout[-8000:])
            return 1
    elapsed = time.monotonic() - started
    print(
        f"{rounds} rounds of {args.examples} examples per property in {elapsed:.0f} s: no failure"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
