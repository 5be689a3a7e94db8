"""Failover (issue 11): a session RESUMEd on a new connection while its older connection is
still open closes the older one, and the ledger counts how long both were open."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from spectacles_gateway.simulator import Simulator
from tests.gwtest import t
from tests.simclient import ClosedError, SimClient
from tests.support.simulators import SimulatorPool


@pytest.fixture
async def sim(request: pytest.FixtureRequest, sim_pool: SimulatorPool) -> Simulator:
    config: dict[str, Any] = getattr(request, "param", {})
    return await sim_pool.start(**config)


async def identified(pool: SimulatorPool, sim: Simulator) -> tuple[SimClient, str]:
    client = await pool.ready(sim)
    return client, sim.session_ids(0)[-1]


async def test_the_older_connection_is_closed_with_4000(
    sim: Simulator, sim_pool: SimulatorPool
) -> None:
    old, session_id = await identified(sim_pool, sim)
    new = await sim_pool.resume(sim, session_id, 3)
    with pytest.raises(ClosedError) as closed:
        await old.recv(timeout=t(5))
    assert closed.value.code == 4000
    assert closed.value.reason == "Session resumed on another connection"
    first, second = sim.ledger.connections
    await sim.wait_for(lambda _: first.closed_at is not None, t(5))
    assert (first.superseded_by, second.superseded_by) == (second.conn_id, None)
    assert first.closed_by == "server" and first.server_close_code == 4000
    assert sim.is_resumable(session_id)  # 4000 kept the session, now on the new connection
    sim.dispatch(0, "MESSAGE_CREATE", {"id": "9"})
    assert (await new.recv())["d"] == {"id": "9"}
    overlap = sim.ledger.overlap_seconds(session_id)
    assert 0 < overlap < t(1.0)  # the closing handshake of a client that answers
    assert sim.ledger.overlaps() == {session_id: overlap}


@pytest.mark.parametrize("sim", [{"close_timeout": 0.5}], indirect=True)
async def test_a_frozen_older_connection_overlaps_until_dropped(
    sim: Simulator, sim_pool: SimulatorPool
) -> None:
    """A member paused (SIGSTOP) does not answer the close: both connections stay open until
    the server gives up after close_timeout, and the ledger says for how long."""
    old, session_id = await identified(sim_pool, sim)
    old.ws.transport.pause_reading()  # frozen: reads nothing, answers nothing
    await sim_pool.resume(sim, session_id, 3)
    first = sim.ledger.connections[0]
    assert first.closed_at is None and sim.ledger.overlap_seconds(session_id) > 0
    await sim.wait_for(lambda _: first.closed_at is not None, t(5))
    overlap = sim.ledger.overlap_seconds(session_id)
    assert 0.45 < overlap < t(2.0)
    assert sim.ledger.overlap_seconds(session_id) == overlap  # over: it no longer grows


async def test_overlaps_add_up_over_several_takeovers(
    sim: Simulator, sim_pool: SimulatorPool
) -> None:
    _, session_id = await identified(sim_pool, sim)
    await sim_pool.resume(sim, session_id, 3)
    await sim.wait_for(lambda ledger: ledger.connections[0].closed_at is not None, t(5))
    once = sim.ledger.overlap_seconds(session_id)
    third = await sim_pool.resume(sim, session_id, 3)
    await sim.wait_for(lambda ledger: ledger.connections[1].closed_at is not None, t(5))
    twice = sim.ledger.overlap_seconds(session_id)
    assert twice > once > 0
    assert [c.superseded_by for c in sim.ledger.connections] == [2, 3, None]
    # A resume after the old connection is gone is no overlap at all.
    third.abort()
    await sim.wait_for(lambda ledger: ledger.connections[2].closed_at is not None, t(5))
    await sim_pool.resume(sim, session_id, 3)
    assert sim.ledger.overlap_seconds(session_id) == pytest.approx(twice)
    assert sim.ledger.overlap_seconds("no-such-session") == 0.0


@pytest.mark.parametrize("sim", [{"superseded_close_code": 4009}], indirect=True)
async def test_the_close_code_is_configurable(sim: Simulator, sim_pool: SimulatorPool) -> None:
    old, session_id = await identified(sim_pool, sim)
    new = await sim_pool.resume(sim, session_id, 3)
    assert await old.expect_close(t(5)) == 4009
    await asyncio.sleep(0)
    # 4009 kills a session, but the session moved to the new connection first: it lives on.
    sim.dispatch(0, "MESSAGE_CREATE", {"id": "1"})
    assert (await new.recv())["d"]["id"] == "1"
