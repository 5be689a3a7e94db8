"""An independent client from PyPI (hikari's GatewayShardImpl) against the simulator.

hikari reaches READY, and after the connection is dropped or it receives op 7 it RESUMEs on
``resume_gateway_url``: the ledger shows a successful resume and no second identify.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

hikari = pytest.importorskip("hikari")

from hikari.api.shard import GatewayCompression  # noqa: E402
from hikari.impl import config as hikari_config  # noqa: E402
from hikari.impl.shard import GatewayShardImpl  # noqa: E402

from spectacles_gateway.simulator import (  # noqa: E402
    Drop,
    Fault,
    Reconnect,
    Simulator,
    SimulatorConfig,
)


def _has_zstd() -> bool:
    if sys.version_info >= (3, 14):
        return True
    try:
        return importlib.util.find_spec("backports.zstd") is not None
    except ModuleNotFoundError:
        return False


HAS_ZSTD = _has_zstd()

COMPRESSIONS = [
    pytest.param(GatewayCompression.TRANSPORT_ZLIB_STREAM, id="zlib-stream"),
    pytest.param(
        GatewayCompression.TRANSPORT_ZSTD_STREAM,
        id="zstd-stream",
        marks=pytest.mark.skipif(not HAS_ZSTD, reason="hikari needs backports.zstd on < 3.14"),
    ),
    pytest.param(None, id="none"),
]


class EventManager:
    """The two callbacks GatewayShardImpl makes on hikari's event manager."""

    def __init__(self) -> None:
        self.raw: list[tuple[str, Any]] = []
        self.dispatched: list[Any] = []

    def consume_raw_event(self, name: str, shard: Any, payload: Any) -> None:
        self.raw.append((name, payload))

    async def dispatch(self, event: Any, *, return_tasks: bool = False) -> list[Any]:
        self.dispatched.append(event)
        return []


class EventFactory:
    def deserialize_connected_event(self, shard: Any) -> tuple[str, int]:
        return ("connected", shard.id)

    def deserialize_disconnected_event(self, shard: Any) -> tuple[str, int]:
        return ("disconnected", shard.id)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(shard_count=2, rate=50)) as simulator:
        yield simulator


def make_shard(
    sim: Simulator, compression: GatewayCompression | None, events: EventManager
) -> GatewayShardImpl:
    return GatewayShardImpl(
        token=sim.config.token,
        url=sim.gateway_url,
        intents=hikari.Intents.GUILDS | hikari.Intents.GUILD_MESSAGES,
        shard_id=1,
        shard_count=2,
        compression=compression,
        http_settings=hikari_config.HTTPSettings(),
        proxy_settings=hikari_config.ProxySettings(trust_env=False),
        event_manager=events,  # type: ignore[arg-type]
        event_factory=EventFactory(),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fault", [Drop(), Reconnect()], ids=["drop", "reconnect"])
async def test_hikari_ready_then_resume(
    sim: Simulator, compression: GatewayCompression | None, fault: Fault
) -> None:
    events = EventManager()
    shard = make_shard(sim, compression, events)
    await shard.start()  # returns once READY arrived
    try:
        (identify,) = sim.ledger.identifies
        assert identify.outcome == "ready" and identify.shard_id == 1
        assert identify.num_shards == 2
        await sim.wait_for(lambda _: sum(n == "MESSAGE_CREATE" for n, _ in events.raw) >= 5, 5)

        sim.inject(1, fault)
        await sim.wait_for(lambda ledger: ledger.resume_count(1, success=True) == 1, 15)
        (resume,) = sim.ledger.resumes
        assert resume.success and resume.outcome == "resumed"
        first, second = sim.ledger.connections[:2]
        assert second.path == "/resume-gw"
        assert second.query == first.query
        if isinstance(fault, Reconnect):
            assert first.closed_by == "client"
            assert first.client_close_code not in (1000, 1001)  # hikari closes with 3000
        else:
            assert first.closed_by == "server-drop"

        # Events keep flowing on the resumed session, with no gaps in seq.
        count = len(events.raw)
        await sim.wait_for(lambda _: len(events.raw) >= count + 5, 5)
        names = [name for name, _ in events.raw]
        assert names.count("READY") == 1 and names.count("RESUMED") == 1
        ids = [p["id"] for name, p in events.raw if name == "MESSAGE_CREATE"]
        assert len(ids) == len(set(ids)), "a replayed event was delivered twice"
        assert sim.ledger.identify_count() == 1
        assert sim.ledger.violations == []
        assert shard.is_alive
    finally:
        await shard.close()
