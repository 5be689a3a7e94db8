"""The shard core's part in a reshard (issue 12), with bytes and a fake clock: standby (a new
generation reads and publishes nothing), the switch to publishing at a message boundary, and
counting the guilds READY listed until each one's GUILD_CREATE arrived."""

from __future__ import annotations

from typing import Any

from spectacles_gateway.protocol.events import Dispatch, Gap
from spectacles_gateway.protocol.shard import Phase

from .support.shard import dispatch, hello, j, make, take


def ready_with(guilds: list[str], session: str = "sess-1", s: int = 1) -> bytes:
    d: dict[str, Any] = {
        "session_id": session,
        "resume_gateway_url": "wss://r.example",
        "guilds": [{"id": g, "unavailable": True} for g in guilds],
    }
    return j({"op": 0, "t": "READY", "s": s, "d": d})


def guild_create(s: int, guild: str) -> bytes:
    return dispatch(s, "GUILD_CREATE", {"id": guild, "name": "x", "channels": [{"id": "9"}]})


def up(core: Any, guilds: list[str], now: float = 0.0) -> None:
    core.connection_opened(now, identify_permitted=True)
    core.receive(hello(), now)
    core.receive(ready_with(guilds), now)


def test_standby_reads_and_publishes_nothing_and_holds_nothing_back() -> None:
    core = make(standby=True, events=None)
    up(core, [])
    for s in range(2, 12):
        core.receive(dispatch(s), 1.0)
    assert take(core, Dispatch) == []
    stats = core.stats()
    assert (stats.publishing, stats.seq) == (False, 11)
    # Nothing waits for the broker: the stored session may resume after all of it.
    assert stats.confirmed_seq == 11
    assert core.phase is Phase.READY


def test_the_switch_publishes_from_the_next_message_on() -> None:
    core = make(standby=True, events=frozenset({"MESSAGE_CREATE"}))
    up(core, [])
    core.receive(dispatch(2), 1.0)
    core.start_publishing()
    core.receive(dispatch(3), 1.1)
    core.receive(dispatch(4, "TYPING_START"), 1.2)  # the configured filter applies again
    assert [d.seq for d in take(core, Dispatch)] == [3]
    assert core.stats().publishing is True
    assert core.confirmed_seq == 2  # 3 waits for the broker


def test_a_publishing_core_is_not_in_standby() -> None:
    core = make(events=None)
    up(core, [])
    core.receive(dispatch(2), 1.0)
    assert [d.seq for d in take(core, Dispatch)] == [1, 2]  # READY, then the dispatch
    assert core.stats().publishing is True


def test_guilds_listed_by_ready_are_pending_until_each_arrives() -> None:
    core = make(events=None, intents=513)
    up(core, ["10", "11", "12"])
    assert core.stats().guilds_pending == 3
    core.receive(guild_create(2, "11"), 1.0)
    core.receive(guild_create(3, "99"), 1.0)  # a guild joined later: not one we wait for
    assert core.stats().guilds_pending == 2
    core.receive(dispatch(4, "GUILD_DELETE", {"id": "10", "unavailable": True}), 1.0)
    core.receive(guild_create(5, "12"), 1.0)
    assert core.stats().guilds_pending == 0
    # Every one of them was published as it came, nothing was swallowed.
    assert [d.event for d in take(core, Dispatch)].count("GUILD_CREATE") == 3


def test_a_malformed_guild_create_is_published_and_the_count_survives() -> None:
    core = make(events=None, intents=1)
    up(core, ["10"])
    core.receive(dispatch(2, "GUILD_CREATE", {"name": "no id"}), 1.0)
    assert core.stats().guilds_pending == 1
    assert [d.event for d in take(core, Dispatch)] == ["READY", "GUILD_CREATE"]


def test_without_the_guilds_intent_nothing_is_waited_for() -> None:
    core = make(events=None, intents=512)  # GUILD_MESSAGES only: Discord sends no GUILD_CREATE
    up(core, ["10", "11"])
    assert core.stats().guilds_pending == 0


def test_a_new_session_starts_a_new_count() -> None:
    core = make(events=None, intents=1)
    up(core, ["10", "11"])
    core.receive(j({"op": 9, "d": False}), 2.0)
    core.connection_closed(2.0, None)
    core.connection_opened(10.0, identify_permitted=True)
    core.receive(hello(), 10.0)
    core.receive(ready_with(["20"], session="sess-2"), 10.0)
    assert core.stats().guilds_pending == 1


def test_standby_tells_no_gap_the_old_generation_published_it() -> None:
    core = make(standby=True, events=None, intents=1)
    up(core, [])
    core.receive(j({"op": 9, "d": False}), 2.0)
    core.connection_closed(2.0, None)
    core.connection_opened(10.0, identify_permitted=True)
    core.receive(hello(), 10.0)
    core.receive(ready_with([], session="sess-2"), 10.0)
    assert take(core, Gap) == []
    # Once publishing, a session given up is a gap again.
    core.start_publishing()
    core.receive(j({"op": 9, "d": False}), 20.0)
    core.connection_closed(20.0, None)
    core.connection_opened(30.0, identify_permitted=True)
    core.receive(hello(), 30.0)
    core.receive(ready_with([], session="sess-3"), 30.0)
    (gap,) = take(core, Gap)
    assert (gap.old_session, gap.new_session) == ("sess-2", "sess-3")


def test_a_retiring_shard_tells_where_its_session_ends() -> None:
    core = make(events=None, intents=1)
    up(core, [])
    core.receive(dispatch(7), 1.0)
    gap = core.take_gap("reshard", 5.0)
    assert gap == Gap("reshard", "sess-1", 7, 5.0, "", 5.0)


def test_a_session_given_up_and_never_replaced_is_the_retiring_gap() -> None:
    core = make(events=None, intents=1)
    up(core, [])
    core.receive(dispatch(3), 1.0)
    core.receive(j({"op": 9, "d": False}), 2.0)  # then 4011 on identify: no READY ever comes
    core.connection_closed(2.0, None)
    core.connection_opened(3.0, identify_permitted=True)
    core.receive(hello(), 3.0)
    core.connection_closed(3.1, 4011)
    gap = core.take_gap("reshard", 9.0)
    assert gap == Gap("invalid_session", "sess-1", 3, 2.0, "", 9.0)
    assert core.take_gap("reshard", 9.5) is None  # told once; no session since


def test_a_standby_shard_retires_without_a_gap() -> None:
    core = make(standby=True, events=None, intents=1)
    up(core, [])
    assert core.take_gap("reshard", 5.0) is None


def message_in(s: int, guild: int, t: str = "MESSAGE_CREATE") -> bytes:
    return dispatch(s, t, {"id": str(1000 + s), "guild_id": str(guild)})


def test_standby_publishes_the_guilds_of_running_shards_that_are_gone() -> None:
    core = make(standby=True, events=frozenset({"MESSAGE_CREATE", "GUILD_CREATE"}))
    up(core, [])
    core.cover(4, frozenset({1}))  # shard 1 of 4 was refused with 4011
    on_1 = (77 << 22) | 5  # (id >> 22) % 4 == 1
    on_2 = (78 << 22) | 5
    core.receive(message_in(2, on_1), 1.0)
    core.receive(message_in(3, on_2), 1.0)
    core.receive(dispatch(4, "GUILD_CREATE", {"id": str(on_1)}), 1.0)
    core.receive(message_in(5, on_1, "TYPING_START"), 1.0)  # not an event the config publishes
    core.receive(dispatch(6, "MESSAGE_CREATE", {"id": "1"}), 1.0)  # a DM: shard 0's
    assert [d.seq for d in take(core, Dispatch)] == [2, 4]
    assert core.confirmed_seq == 1  # what was published waits for the broker
    core.cover(4, frozenset({0}))
    core.receive(dispatch(7, "MESSAGE_CREATE", {"id": "1"}), 1.0)
    core.receive(dispatch(8, "MESSAGE_CREATE", [1, 2]), 1.0)  # not an object: shard 0's too
    assert [d.seq for d in take(core, Dispatch)] == [7, 8]
    core.start_publishing()  # after the switch, everything as configured
    core.receive(message_in(9, on_2), 1.0)
    assert [d.seq for d in take(core, Dispatch)] == [9]
