"""Simulators and raw clients for the simulator's own tests: started by a test, stopped (and
aborted) at its end by the ``sim_pool`` fixture."""

from __future__ import annotations

from typing import Any

from spectacles_gateway.simulator import Simulator, SimulatorConfig
from tests.simclient import SimClient


class SimulatorPool:
    def __init__(self) -> None:
        self.sims: list[Simulator] = []
        self.clients: list[SimClient] = []

    async def start(self, **config: Any) -> Simulator:
        sim = Simulator(SimulatorConfig(**config))
        await sim.start()
        self.sims.append(sim)
        return sim

    async def connect(self, url: str, **kwargs: Any) -> SimClient:
        client = await SimClient.connect(url, **kwargs)
        self.clients.append(client)
        return client

    async def identify(
        self,
        sim: Simulator,
        shard: tuple[int, int] = (0, 1),
        intents: int = 513,
        **kwargs: Any,
    ) -> tuple[SimClient, dict[str, Any]]:
        """A client through HELLO and IDENTIFY; returns it and READY's ``d`` (the
        GUILD_CREATEs that follow are left to read)."""
        client = await self.connect(sim.gateway_url, **kwargs)
        await client.hello()
        await client.identify(shard=shard, intents=intents)
        payload = await client.recv()
        assert payload["t"] == "READY", payload
        return client, payload["d"]

    async def ready(self, sim: Simulator, **kwargs: Any) -> SimClient:
        """:meth:`identify`, then the session's GUILD_CREATEs read."""
        client, ready = await self.identify(sim, **kwargs)
        for _ in ready["guilds"]:
            assert (await client.recv())["t"] == "GUILD_CREATE"
        return client

    async def resume(self, sim: Simulator, session_id: str, seq: int) -> SimClient:
        """A client that RESUMEd ``session_id`` from ``seq`` and read up to RESUMED."""
        client = await self.connect(sim.resume_url)
        await client.hello()
        await client.resume(session_id, seq)
        await client.recv_until(lambda p: p.get("t") == "RESUMED")
        return client

    async def close(self) -> None:
        while self.clients:
            self.clients.pop().abort()
        while self.sims:
            await self.sims.pop().stop()
