"""Fixtures shared by several test modules (their helpers live in ``tests/support/``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator

import pytest

from .support.redis import PrivateRedis, private_redis_server
from .support.share import machine_share
from .support.simulators import SimulatorPool


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    """Hold the machine's lock (shared, or exclusive for a test marked ``alone``) for the whole
    test, its fixtures' set-up and tear-down included (see tests/support/share.py)."""
    with machine_share(alone=item.get_closest_marker("alone") is not None):
        return (yield)


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
