"""Open files at scale (issue 15): what a process needs, the soft limit raised to the hard one,
and a clear stop (exit 78) when even the hard limit cannot hold the planned shards."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import pytest

from spectacles_gateway.limits import (
    PER_WORKER,
    SUPERVISOR_RESERVE,
    WORKER_RESERVE,
    shortfall,
    supervisor_need,
    worker_need,
)

from .gwproc import BIN, free_port, gateway_env, status
from .gwtest import simulator, t, wait_until


@pytest.mark.parametrize(
    ("shards", "need"),
    [(0, WORKER_RESERVE), (1, 1 + WORKER_RESERVE), (2500, 2500 + WORKER_RESERVE), (-3, 64)],
)
def test_worker_need(shards: int, need: int) -> None:
    assert worker_need(shards) == need


@pytest.mark.parametrize(
    ("workers", "clients", "need"),
    [
        (1, 0, SUPERVISOR_RESERVE + PER_WORKER),
        (4, 64, SUPERVISOR_RESERVE + 4 * PER_WORKER + 64),
        (0, 0, SUPERVISOR_RESERVE),
    ],
)
def test_supervisor_need(workers: int, clients: int, need: int) -> None:
    assert supervisor_need(workers, clients) == need


def test_shortfall_names_the_limit_the_need_and_the_remedies() -> None:
    assert shortfall(100, 100, "x") is None
    assert shortfall(100, 4096, "x") is None
    message = shortfall(2564, 1024, "2500 shards in one worker")
    assert message is not None
    assert "1024" in message and "2564" in message and "2500 shards in one worker" in message
    assert "ulimit -Hn" in message and "LimitNOFILE=" in message and "--workers" in message
    assert "\n" not in message


def _limits(soft: int, hard: int) -> object:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def _open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            fields = line.split()
            return int(fields[3]), int(fields[4])
    raise AssertionError("no open-file limit in /proc")


async def test_a_hard_limit_too_low_for_the_shards_exits_78_naming_it() -> None:
    async with simulator(shard_count=40) as sim:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "spectacles-supervise"), "--shards", "0-39", "--workers", "1",
            env=gateway_env(sim), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, preexec_fn=_limits(80, 80),
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), t(30))
    log = err.decode()
    assert proc.returncode == 78, log
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1, log
    assert "open-file limit (80, hard)" in errors[0]
    assert f"at least {worker_need(40)}" in errors[0] and "40 shards in one worker" in errors[0]
    assert sim.ledger.identifies == []  # stopped before any shard ran


async def test_the_soft_limit_is_raised_to_the_hard_one_in_supervisor_and_worker() -> None:
    port = free_port()
    async with simulator(shard_count=2) as sim:
        env = gateway_env(sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}")
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "spectacles-supervise"), "--shards", "0-1", "--workers", "1",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_limits(70, 300),
        )  # fmt: skip
        try:
            pids: dict[int, int] = {}

            def worker_started() -> bool:
                try:
                    pids.update({w["worker"]: w["pid"] for w in status(port)["workers"]})
                except OSError:
                    return False
                return bool(pids.get(0))

            await wait_until(worker_started, 20, "the worker")
            assert _open_files(proc.pid) == (300, 300)
            assert _open_files(pids[0]) == (300, 300)
        finally:
            proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), t(20))
    assert proc.returncode == 0
    assert "open-file limit raised from 70 to 300" in err.decode()
