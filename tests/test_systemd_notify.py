"""The supervisor talks to a real sd_notify socket: READY=1 only once the shards are connected,
then WATCHDOG=1 from its main loop, STOPPING=1 on TERM."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from .gwproc import gateway, gateway_env
from .gwtest import ready_count, simulator, wait_until


async def test_ready_only_after_shards_connect_then_watchdog_pings(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    received: list[tuple[float, str, int]] = []  # (time, message, READY shards at that time)

    async with simulator(shard_count=2, max_concurrency=1) as sim:

        async def listen() -> None:
            loop = asyncio.get_running_loop()
            while True:
                data = await loop.sock_recv(sock, 4096)
                received.append((time.monotonic(), data.decode(), ready_count(sim.ledger)))

        listener = asyncio.create_task(listen())
        env = gateway_env(sim, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="1000000")
        try:
            async with gateway(env) as gw:
                await wait_until(
                    lambda: any("READY=1" in m for _, m, _ in received), 30, "READY=1", gw.log
                )
                ready_at = next(at for at, m, _ in received if "READY=1" in m)
                await wait_until(
                    lambda: sum("WATCHDOG=1" in m for at, m, _ in received if at > ready_at) >= 3,
                    5,
                    "three watchdog pings after READY=1",
                    gw.log,
                )
                code = await gw.stop()
                # STOPPING=1 (sent at the stop) has arrived, so has everything sent before it.
                await wait_until(
                    lambda: any("STOPPING=1" in m for _, m, _ in received), 5, "STOPPING=1"
                )
        finally:
            listener.cancel()
            sock.close()
    assert code == 0
    ready_msgs = [(at, n) for at, m, n in received if "READY=1" in m]
    assert len(ready_msgs) == 1
    assert ready_msgs[0][1] == 2  # every shard had its READY when systemd was told
    # The two shards identify 5 s apart, so READY=1 cannot have come early by luck.
    identifies = sorted(r.time for r in sim.ledger.identifies)
    assert identifies[-1] - identifies[0] >= 5.0
    pings = [at for at, m, _ in received if "WATCHDOG=1" in m and at > ready_at]
    assert len(pings) >= 3, received  # every 0.5 s (half of WATCHDOG_USEC) from the main loop
    assert any("STOPPING=1" in m for _, m, _ in received)
