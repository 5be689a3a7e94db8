"""Resharding a fleet (issue 12): two ``spectacles-supervise --fleet`` members share a growing bot
through the real Redis. One member takes the fleet's reshard lock and runs the whole new
generation in standby; at the switch its agent leases every new shard and points the fleet at
the new generation, the other member retires its old shards, and the new shards move to it by
handoff (a resume, no identify). A member killed in the middle: the reshard finishes, or rolls
back and is run again by the survivor; nothing the simulator emitted is lost either way.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from spectacles_gateway.simulator import Simulator

from .gwproc import BIN, status
from .gwtest import ready_count, t, wait_until
from .test_fleet import REDIS_URL, Fleet, Member, fleet, owned_once

pytestmark = pytest.mark.slow

EXTRA = {"RESHARD_CHECK_INTERVAL": "1s", "DISCORD_EVENTS": "MESSAGE_CREATE"}
BOT: dict[str, Any] = {"max_concurrency": 2, "guilds": 48, "guild_rate": 4.0}


def reshard_of(member: Member) -> dict[str, Any]:
    try:
        section: dict[str, Any] = status(member.port).get("reshard", {})
    except OSError:
        return {}
    return section


def settled_at(group: Fleet, shards: int) -> bool:
    """Every live member runs ``shards`` shards, each owned once, shared evenly."""
    live = [m for m in group.members.values() if m.process.returncode is None]
    try:
        counts = [status(m.port)["shard_count"] for m in live]
    except OSError:
        return False
    even = shards // len(live)
    return (
        all(c == shards for c in counts)
        and owned_once(group, shards, len(live))
        and all(len(m.owned()) == even for m in live)
    )


def missing(group: Fleet) -> list[str]:
    return group.sim.ledger.missing_guild_events(group.ids())


def stalls(sim: Simulator, group: Fleet) -> dict[int, float]:
    """Per guild, the longest an event took from emission to its first arrival anywhere."""
    first: dict[str, float] = {}
    for member in group.members.values():
        for at, record in member.records:
            if record["event"] == "MESSAGE_CREATE":
                uid = record["data"]["id"]
                first[uid] = min(first.get(uid, at), at)
    worst: dict[int, float] = {}
    for uid, guild, emitted, _, got in sim.ledger.guild_events.rows():
        if got and uid in first:
            worst[guild] = max(worst.get(guild, 0.0), first[uid] - emitted)
    return worst


async def everything_out(group: Fleet) -> None:
    group.sim.pause_dispatch()
    await wait_until(
        lambda: not missing(group),
        30,
        "every guild event on some member's stdout",
        lambda: f"{len(missing(group))} missing\n{group.logs()}",
    )


async def two_members(group: Fleet, **extra: str) -> None:
    """Members a and b share 4 shards, all READY, events flowing."""
    for name in ("a", "b"):
        await group.start(name, **{**EXTRA, **extra})
    await wait_until(lambda: owned_once(group, 4, 2), 40, "4 shards owned", group.logs)
    await wait_until(lambda: ready_count(group.sim.ledger) == 4, 40, "4 ready", group.logs)
    await wait_until(lambda: len(group.ids()) > 300, 20, "events flowing")


async def test_two_members_reshard_from_four_to_eight() -> None:
    async with fleet(shards=4, rate=0, **BOT) as group:
        await two_members(group)
        sim = group.sim
        old = {s: sim.session_ids(s)[-1] for s in range(4)}
        sim.set_recommended_shards(8)
        asked = time.monotonic()
        await wait_until(lambda: settled_at(group, 8), 90, "8 shards, 4 each", group.logs)
        took = time.monotonic() - asked
        await wait_until(
            lambda: any(reshard_of(m).get("last") for m in group.members.values()), 30, "done"
        )
        leaders = [m for m in group.members.values() if reshard_of(m).get("last")]
        await everything_out(group)
        codes = await group.stop()
    assert codes == {"a": 0, "b": 0}, group.logs()
    assert len(leaders) == 1  # one reshard in the fleet, run by one member
    new = [r for r in sim.ledger.identifies if r.num_shards == 8]
    assert sorted(r.shard_id for r in new) == list(range(8))  # handoffs resumed, no identify
    assert sim.ledger.identify_count() == 12
    for shard, session in old.items():  # both members' old sessions ended with 1000
        last = [c for c in sim.ledger.connections_for(shard) if c.session_id == session][-1]
        assert last.client_close_code == 1000, (shard, last)
    worst = stalls(sim, group)
    assert max(worst.values()) < t(2.0), sorted(worst.values())[-5:]
    generations = {r.get("generation") for m in group.members.values() for _, r in m.records}
    assert generations == {0, 1}
    print(
        f"fleet reshard 4 -> 8 on 2 members: settled in {took:.1f} s, worst stall "
        f"{max(worst.values()):.3f} s"
    )


@pytest.mark.parametrize("victim", ["leader", "other"])
async def test_a_member_killed_in_the_middle_of_a_reshard_loses_nothing(victim: str) -> None:
    async with fleet(shards=4, rate=0, **BOT) as group:
        await two_members(group)
        sim = group.sim
        sim.set_recommended_shards(8)
        await wait_until(
            lambda: any(reshard_of(m).get("state") == "starting" for m in group.members.values()),
            30,
            "a reshard under way",
            group.logs,
        )
        (leader,) = [m for m in group.members.values() if reshard_of(m)["state"] == "starting"]
        (other,) = [m for m in group.members.values() if m is not leader]
        await wait_until(lambda: sim.ledger.identify_count() >= 6, 30, "new shards identifying")
        killed = leader if victim == "leader" else other
        survivor = other if victim == "leader" else leader
        killed.signal_tree(signal.SIGKILL)
        await killed.process.wait()
        await wait_until(lambda: settled_at(group, 8), 120, "8 shards on the survivor", group.logs)
        await wait_until(lambda: bool(reshard_of(survivor).get("last")), 30, "done", group.logs)
        last = reshard_of(survivor)["last"]
        await everything_out(group)
        codes = await group.stop()
    assert codes[survivor.name] == 0, group.logs()
    assert last["outcome"] == "done" and last["to"] == 8
    print(f"{victim} killed mid-reshard: the survivor finished; nothing lost")


async def test_an_operator_asks_the_fleet_through_redis() -> None:
    async with fleet(shards=4, rate=0, **BOT) as group:
        await two_members(group, RESHARD_POLICY="manual")
        sim = group.sim
        sim.set_recommended_shards(6)  # a growing bot: Discord takes any count that fits
        env = {
            "PATH": "/usr/bin:/bin",
            "FLEET_NAME": "test",
            "SHARD_STORE_TYPE": "redis",
            "SHARD_STORE_PREFIX": group.prefix,
            "REDIS_URL": REDIS_URL,
        }
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "spectacles-supervise"),
            "reshard",
            "--to",
            "5",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "asked fleet test to reshard to 5 shards" in out.decode()
        await wait_until(lambda: settled_at(group, 6), 90, "6 shards, 3 each", group.logs)
        await everything_out(group)
        assert await group.stop() == {"a": 0, "b": 0}
    # 5 rounded up to a multiple of max_concurrency 2; one member took the request.
    assert len([r for r in sim.ledger.identifies if r.num_shards == 6]) == 6
    logs = "".join(m.log() for m in group.members.values())
    assert logs.count("an operator asked for a reshard") == 1
