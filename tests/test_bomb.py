"""A decompression bomb from the simulator (issue 10): one websocket message of about 4 KiB of
zstd that decompresses to 128 MiB, to a worker whose limit is 16 MiB. The worker stops reading
it at the limit (the output is bounded, never one huge allocation), its peak resident memory
grows by less than twice the limit, and the shard resumes; sent again on every resume, the same
message makes the shard identify once rather than loop, and consumers are told of the gap.
"""

from __future__ import annotations

import asyncio

import pytest

from spectacles_gateway.simulator.faults import DecompressionBomb

from .gwproc import free_port, gateway, gateway_env, worker_pids
from .gwtest import ready_count, simulator, wait_until

MiB = 1 << 20
LIMIT = 16 * MiB


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (now) and ``VmHWM`` (the peak so far) of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


@pytest.mark.parametrize("replayed", [False, True])
async def test_a_decompression_bomb_is_cut_at_the_limit_and_the_shard_goes_on(
    replayed: bool,
) -> None:
    port = free_port()
    async with simulator(shard_count=1, rate=20) as sim:
        env = gateway_env(
            sim,
            DISCORD_MAX_MESSAGE_SIZE="16MiB",
            PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
            DISCORD_EVENTS="MESSAGE_CREATE,GATEWAY_GAP",
        )
        async with gateway(env) as gw:
            await wait_until(lambda: ready_count(sim.ledger) == 1, 30, "ready", gw.log)
            await wait_until(lambda: len(gw.ids()) > 50, 20, "events")
            (pid,) = worker_pids(port).values()
            await asyncio.sleep(1.0)  # settled after start-up
            before = memory_kib(pid)
            sim.inject(0, DecompressionBomb(size=128 * MiB, replay=replayed))
            if replayed:  # it fails twice at the same seq: the shard starts a new session
                await wait_until(lambda: len(sim.session_ids(0)) == 2, 60, "a new session")
            else:
                await wait_until(
                    lambda: sim.ledger.resume_count(0, success=True) >= 1, 60, "the resume"
                )
            count = len(gw.ids())
            await wait_until(lambda: len(gw.ids()) > count + 50, 20, "events after it")
            after = memory_kib(pid)
            assert worker_pids(port) == {0: pid}  # the same worker: it never died
            code = await gw.stop()
    assert code == 0, gw.log()[-3000:]
    grew = (after["VmHWM"] - before["VmRSS"]) * 1024
    assert grew < 2 * LIMIT, f"peak RSS grew by {grew / MiB:.1f} MiB"
    assert "too large" in gw.log()
    sim.pause_dispatch()
    seen = set(gw.ids())
    lost = [uid for uid in sim.ledger.events_sent() if uid not in seen]
    gaps = [r["data"] for r in gw.records() if r["event"] == "GATEWAY_GAP"]
    if replayed:
        assert sim.ledger.identify_count() == 2  # once, not a loop
        assert [g["reason"] for g in gaps] == ["unprocessable"]
    else:
        assert sim.ledger.identify_count() == 1 and not lost and not gaps
    print(
        f"bomb (replayed={replayed}): 128 MiB against a 16 MiB limit; worker RSS "
        f"{before['VmRSS'] / 1024:.1f} MiB before, peak {after['VmHWM'] / 1024:.1f} MiB "
        f"(+{grew / MiB:.1f} MiB)"
    )
