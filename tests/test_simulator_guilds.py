"""A growing bot (issue 12): guilds placed by id, GUILD_CREATE per owned guild, guild events
to every owning session of every shard count, 4011, a recommended count raised at run time,
a settable session start limit, and the ledger checks a reshard test needs."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from spectacles_gateway.simulator import Simulator
from spectacles_gateway.simulator.guilds import guild_ids
from tests.gwtest import t, wait_until
from tests.simclient import SimClient, http_get
from tests.support.simulators import SimulatorPool

AUTH = {"Authorization": "Bot simulated-token"}


async def start(pool: SimulatorPool, **config: Any) -> Simulator:
    return await pool.start(**{"max_concurrency": 16, "identify_window": 0.0, **config})


def owner(guild_id: int | str, shard: tuple[int, int]) -> bool:
    return (int(guild_id) >> 22) % shard[1] == shard[0]


class Reader:
    """Reads one client's dispatches in the background: (seq, event, d) in order."""

    def __init__(self, client: SimClient) -> None:
        self.client = client
        self.got: list[tuple[int, str, dict[str, Any]]] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            payload = await self.client.recv(timeout=60)
            if payload.get("op") == 0:
                self.got.append((payload["s"], payload["t"], payload["d"]))

    def ids(self, event: str = "MESSAGE_CREATE") -> list[str]:
        return [d["id"] for _, t_, d in self.got if t_ == event]

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# --- placement, READY, GUILD_CREATE, 4011 -----------------------------------------------------


async def test_each_session_gets_the_guilds_its_shard_owns(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, shard_count=4, guilds=40)
    assert len(sim.guild_ids) == 40 == len(set(sim.guild_ids))
    assert sim.guild_ids == guild_ids(40)  # from the seed: runs repeat
    seen: set[int] = set()
    for shard_id in range(4):
        client, ready = await sim_pool.identify(sim, (shard_id, 4))
        listed = [int(g["id"]) for g in ready["guilds"]]
        assert all(g["unavailable"] for g in ready["guilds"])  # how a client knows the count
        assert listed == sim.guilds_of(shard_id, 4)
        assert all(owner(g, (shard_id, 4)) for g in listed)
        creates = [await client.recv() for _ in listed]
        assert [(c["t"], int(c["d"]["id"])) for c in creates] == [
            ("GUILD_CREATE", g) for g in listed
        ]
        seen.update(listed)
    assert seen == set(sim.guild_ids)


async def test_a_shard_holding_too_many_guilds_is_4011(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, guilds=60, max_guilds_per_shard=10)
    too_few = 2
    assert max(len(sim.guilds_of(i, too_few)) for i in range(too_few)) > 10
    client = await sim_pool.connect(sim.gateway_url)
    await client.hello()
    await client.identify(shard=(0, too_few))
    assert await client.expect_close() == 4011
    assert any(
        "4011 sharding required: shard [0, 2] would hold" in v for v in sim.ledger.violations
    )
    enough = next(n for n in range(2, 60) if all(len(sim.guilds_of(i, n)) <= 10 for i in range(n)))
    _, ready = await sim_pool.identify(sim, (0, enough))  # any count is fine for a growing bot
    assert len(ready["guilds"]) == len(sim.guilds_of(0, enough)) <= 10


# --- guild events -----------------------------------------------------------------------------


async def test_guild_events_reach_every_owner_of_both_generations(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, shard_count=2, guilds=24, guild_rate=25.0)
    shards = [(0, 2), (1, 2), (0, 4), (1, 4), (2, 4), (3, 4)]
    readers = {shard: Reader((await sim_pool.identify(sim, shard))[0]) for shard in shards}
    all_up = sim.ledger.identifies[-1].time
    await asyncio.sleep(t(1.5))
    sim.pause_dispatch()  # then let what is on its way arrive before the readers stop

    def received() -> set[str]:
        return set().union(*(set(reader.ids()) for reader in readers.values()))

    await wait_until(
        lambda: not sim.ledger.missing_guild_events(received()), 10, "events in flight"
    )
    for reader in readers.values():
        await reader.stop()
    rows = list(sim.ledger.guild_events.rows())
    latest = max(at for _, _, at, _, _ in rows)
    assert len(rows) > 24 * 25 * 0.5
    guild_of = {uid: guild for uid, guild, *_ in rows}
    for shard, reader in readers.items():
        ids = reader.ids()
        assert ids and all(owner(guild_of[uid], shard) for uid in ids)  # its own guilds only
    old = set(readers[0, 2].ids()) | set(readers[1, 2].ids())
    new = set().union(*(set(readers[s].ids()) for s in shards[2:]))
    # While both generations ran, each event went to one owner in each (and arrived there).
    settled = [r for r in rows if all_up < r[2] < latest - 0.2]
    assert settled and all((owners, got) == (2, 2) for _, _, _, owners, got in settled)
    both = {uid for uid, *_ in settled}
    assert both <= old and both <= new
    assert sim.ledger.missing_guild_events(old | new) == []
    lost = sorted(both)[5]
    assert sim.ledger.missing_guild_events((old | new) - {lost}) == [lost]
    times = [at for at, _ in sim.ledger.guild_events.emissions(sim.guild_ids[1])]
    assert times == sorted(times) and len(times) > 10
    assert max(b - a for a, b in itertools.pairwise(times)) < t(0.2)  # 25/s, jitter
    gaps = sim.ledger.guild_gaps(old | new)
    assert set(gaps) == set(sim.guild_ids) and max(gaps.values()) < t(0.5)
    # Losing one guild's events for a while shows as a gap in that guild's stream.
    lost_guild = sim.guild_ids[0]
    cut = {uid for uid, guild, at, _, _ in rows
           if guild == lost_guild and latest - 1.2 < at < latest - 0.1}  # fmt: skip
    assert sim.ledger.guild_gaps((old | new) - cut)[lost_guild] > 1.0


async def test_a_session_away_gets_its_guild_events_on_resume(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, guilds=6, guild_rate=40.0)
    client, ready = await sim_pool.identify(sim, (0, 1))
    reader = Reader(client)
    await asyncio.sleep(t(0.3))
    await reader.stop()
    client.abort()
    await sim.wait_for(lambda ledger: ledger.connections[0].closed_at is not None, t(5))
    away_from = time.monotonic()
    await asyncio.sleep(t(0.3))  # events keep coming for the live, detached session
    resumed = await sim_pool.connect(sim.resume_url)
    await resumed.hello()
    await resumed.resume(ready["session_id"], reader.got[-1][0])
    replay = await resumed.recv_until(lambda p: p.get("t") == "RESUMED")
    back_at = time.monotonic()
    away = [p["d"]["id"] for p in replay if p["t"] == "MESSAGE_CREATE"]
    emitted_away = [uid for uid, _, at, _, _ in sim.ledger.guild_events.rows() if away_from < at]
    assert len(away) > 5 and set(emitted_away) - {*away} <= {
        uid for uid, _, at, _, _ in sim.ledger.guild_events.rows() if at > back_at - 0.05
    }
    missing = sim.ledger.missing_guild_events({*reader.ids(), *away})
    late = {uid for uid, _, at, _, _ in sim.ledger.guild_events.rows() if at > back_at - 0.05}
    assert set(missing) <= late  # only what came after RESUMED is not read yet


async def test_a_guild_without_an_owner_is_a_gap(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, shard_count=2, guilds=10, guild_rate=30.0)
    first, _ = await sim_pool.identify(sim, (0, 2))
    second, _ = await sim_pool.identify(sim, (1, 2))
    reader = Reader(second)
    await first.close(1000)  # shard 0's session ends: its guilds have no owner now
    await asyncio.sleep(t(0.5))
    await reader.stop()
    orphans = set(sim.ledger.guild_events.orphaned_ids())
    guild_of = {uid: guild for uid, guild, *_ in sim.ledger.guild_events.rows()}
    assert orphans and all(owner(guild_of[uid], (0, 2)) for uid in orphans)
    assert orphans <= set(sim.ledger.missing_guild_events(reader.ids()))


async def test_guild_events_follow_intents(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, guilds=4, guild_rate=60.0, profile="realistic")
    messages_only, _ = await sim_pool.identify(sim, (0, 1), intents=513)  # GUILDS | GUILD_MESSAGES
    reader = Reader(messages_only)
    await asyncio.sleep(t(0.6))
    await reader.stop()
    kinds = {event for _, event, _ in reader.got}
    assert kinds <= {"MESSAGE_CREATE", "MESSAGE_UPDATE", "GUILD_CREATE"}, kinds
    seen = [
        d["id"] for _, event, d in reader.got if event != "GUILD_CREATE" or "_simulated" not in d
    ]
    # Events no owner had the intent for are not owed; all the others arrived.
    assert sim.ledger.missing_guild_events(seen) == []
    rows = list(sim.ledger.guild_events.rows())
    assert any(delivered == 0 for *_, delivered in rows)  # typing, presences: not owed


# --- recommended shards, session start limit, joins, control ----------------------------------


async def test_recommended_shards_raised_at_run_time(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, shard_count=2, guilds=8)
    url = f"{sim.http_base}/gateway/bot"
    assert (await http_get(url, AUTH))[1]["shards"] == 2
    sim.set_recommended_shards(4)
    assert (await http_get(url, AUTH))[1]["shards"] == 4
    control = sim.http_base.removesuffix("/api/v10") + "/control"
    status, body = await http_get(f"{control}/recommended_shards?shards=8", method="POST")
    assert (status, body) == (200, {"recommended_shards": 8})
    assert (await http_get(url, AUTH))[1]["shards"] == 8 == sim.recommended_shards
    assert (await http_get(f"{control}/recommended_shards?shards=0", method="POST"))[0] == 400
    assert (await http_get(f"{control}/recommended_shards", method="GET"))[0] == 404
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "spectacles_gateway.simulator", "--control", sim.http_base,
         "--set-recommended-shards", "16"],
        capture_output=True, check=True, timeout=t(30),
    )  # fmt: skip
    assert json.loads(out.stdout) == {"recommended_shards": 16}
    assert (await http_get(url, AUTH))[1]["shards"] == 16


async def test_session_start_limit_counts_and_is_settable(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, shard_count=4, guilds=8, session_start_remaining=10)
    url = f"{sim.http_base}/gateway/bot"
    for shard_id in range(3):
        await sim_pool.identify(sim, (shard_id, 4))
    assert (await http_get(url, AUTH))[1]["session_start_limit"]["remaining"] == 7
    control = sim.http_base.removesuffix("/api/v10") + "/control"
    status, limit = await http_get(
        f"{control}/session_start_limit?remaining=1&total=50&reset_after=60000", method="POST"
    )
    assert status == 200 and (limit["remaining"], limit["total"]) == (1, 50)
    assert 59_000 < limit["reset_after"] <= 60_000
    await sim_pool.identify(sim, (3, 4))
    client = await sim_pool.connect(sim.gateway_url)
    await client.hello()
    await client.identify(shard=(0, 8))
    assert (await client.recv())["op"] == 9  # the budget is spent
    assert sim.session_start_remaining == 0
    assert sim.set_session_start_limit(remaining=5)["remaining"] == 5


async def test_an_identify_refused_for_its_bucket_spends_a_session_start(
    sim_pool: SimulatorPool,
) -> None:
    sim = await start(sim_pool, shard_count=4, guilds=8, identify_window=60.0, max_concurrency=2)
    await sim_pool.identify(sim, (0, 4))
    assert sim.session_start_remaining == 999
    client = await sim_pool.connect(sim.gateway_url)
    await client.hello()
    await client.identify(shard=(2, 4))  # bucket 0 again, within the window
    assert (await client.recv())["op"] == 9
    assert sim.session_start_remaining == 998  # refused, and spent all the same
    assert [r.outcome for r in sim.ledger.identifies] == ["ready", "invalid_session"]


async def test_the_bot_joins_guilds(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, guilds=3, guild_rate=0.0)
    client, ready = await sim_pool.identify(sim, (0, 1))
    for _ in ready["guilds"]:
        await client.recv()
    added = sim.add_guilds(2)
    assert len(added) == 2 and not set(added) & set(guild_ids(3))
    creates = [await client.recv() for _ in added]
    assert sorted(int(c["d"]["id"]) for c in creates) == sorted(added)
    control = sim.http_base.removesuffix("/api/v10") + "/control"
    status, body = await http_get(f"{control}/guilds?add=1", method="POST")
    assert status == 200 and body["guilds"] == 6
    assert (await client.recv())["t"] == "GUILD_CREATE"
    status, stats = await http_get(f"{control}/stats")
    assert (stats["guilds"], stats["recommended_shards"]) == (6, 1)


async def test_without_guilds_nothing_changes(sim_pool: SimulatorPool) -> None:
    sim = await start(sim_pool, shard_count=2)
    assert sim.guild_ids == [] and sim.config.strict_shard_count is True
    with pytest.raises(RuntimeError):
        sim.add_guilds(1)
    control = sim.http_base.removesuffix("/api/v10") + "/control"
    assert (await http_get(f"{control}/guilds?add=1", method="POST"))[0] == 400
    started = time.monotonic()
    _, ready = await sim_pool.identify(sim, (0, 2))
    assert len(ready["guilds"]) == sim.config.guilds_per_shard
    assert time.monotonic() - started < t(5)
