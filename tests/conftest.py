"""Fixtures shared by several test modules (their helpers live in ``tests/support/``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from .support.redis import PrivateRedis, private_redis_server
from .support.simulators import SimulatorPool


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A private ``redis-server`` on a free port, for tests that stop and restart Redis."""
    yield from private_redis_server()


@pytest.fixture
async def sim_pool() -> AsyncIterator[SimulatorPool]:
    """Simulators and raw clients a test starts, stopped and aborted at its end."""
    pool = SimulatorPool()
    yield pool
    await pool.close()
