"""The shard core against hostile or absurd input: clamps, poison messages, TLS-only URLs,
bounded command queues (driven with bytes and a fake clock)."""

from __future__ import annotations

from typing import Any

import pytest

from spectacles_gateway.protocol.closecodes import CloseAction
from spectacles_gateway.protocol.events import CommandsDropped, Gap, NoticeKind
from spectacles_gateway.protocol.shard import CommandRejected, Phase, Session

from .support.shard import (
    RESUME,
    close_request,
    connected_ready,
    dispatch,
    hello,
    j,
    kinds,
    make,
    ready,
    sent,
    take,
    tickets,
)


@pytest.mark.parametrize(
    ("interval_ms", "used"),
    [(1e300, 900.0), (1e-6, 0.25), (41250, 41.25), (250, 0.25), (900_000, 900.0)],
)
def test_absurd_heartbeat_intervals_are_clamped_with_a_warning(
    interval_ms: float, used: float
) -> None:
    core = make(rand=1.0)
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(j({"op": 10, "d": {"heartbeat_interval": interval_ms}}), 0.0)
    assert sent(core)[0]["op"] == 2  # identified anyway
    assert core.next_deadline() == pytest.approx(used)  # jitter 1.0: one whole interval
    assert ("hello_clamped" in kinds(core)) == (used != interval_ms / 1000)


@pytest.mark.parametrize("interval", [-5, 0, "soon", None, float("nan")])
def test_hello_without_a_usable_interval_closes_resumably(interval: Any) -> None:
    core = make()
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(b'{"op":10,"d":{"heartbeat_interval":%b}}' % str(interval).encode(), 0.0)
    request = close_request(core)
    assert request is not None and request[0] == 4000
    assert sent(core) == []  # no IDENTIFY on a connection we are dropping


def test_deep_nesting_in_d_is_a_decode_error_not_a_crash() -> None:
    core = make()
    connected_ready(core)
    deep = b"[" * 100_000 + b"]" * 100_000
    core.receive(b'{"op":0,"t":"MESSAGE_CREATE","s":2,"d":%b}' % deep, 1.0)
    assert kinds(core) == ["decode_error"]
    assert close_request(core) == (4000, "decode error")


def test_a_message_that_fails_twice_at_the_same_seq_makes_the_shard_identify() -> None:
    bad = b'{"op":0,"t":"MESSAGE_CREATE","s":3,"d":' + b"[" * 100_000
    core = make()
    connected_ready(core)
    core.receive(dispatch(2), 1.0)
    core.receive(bad, 1.0)  # first time: resume (it may have been a transient fault)
    assert kinds(core) == ["decode_error"]
    assert core.connection_closed(1.1, None) is CloseAction.RESUME
    core.connection_opened(1.2, identify_permitted=False)
    core.receive(hello(), 1.2)
    assert sent(core)[0]["op"] == 6
    core.receive(bad, 1.3)  # replayed, fails again at the same place: give the session up
    assert kinds(core) == ["poison"]
    assert core.connection_closed(1.4, None) is CloseAction.IDENTIFY
    assert core.session_id is None
    plan = core.plan_connect(1.4)
    assert plan is not None and plan.identify
    core.connection_opened(3.0, identify_permitted=True)
    core.receive(hello(), 3.0)
    core.receive(ready(session="sess-2"), 3.1)
    (gap,) = take(core, Gap)  # the unprocessable event and what followed are lost: say so
    assert (gap.reason, gap.old_session, gap.last_seq) == ("unprocessable", "sess-1", 2)


def test_a_transient_failure_is_forgotten_once_the_resume_gets_through() -> None:
    core = make()
    connected_ready(core)
    core.message_failed("zstd: corrupt")
    core.connection_closed(1.0, None)
    core.connection_opened(1.0, identify_permitted=False)
    core.receive(hello(), 1.0)
    core.receive(j({"op": 0, "t": "RESUMED", "s": 1, "d": {}}), 1.1)
    core.message_failed("zstd: corrupt")  # same seq, but a RESUMED came in between
    assert "poison" not in kinds(core)
    assert core.connection_closed(1.2, None) is CloseAction.RESUME


def test_a_plain_ws_resume_url_is_refused_when_the_gateway_is_wss() -> None:
    core = make()  # gateway wss://gateway.discord.gg/
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(hello(), 0.0)
    core.receive(ready(resume="ws://evil.example"), 0.1)
    assert core.resume_url is None
    assert "decode_error" in kinds(core)
    core.connection_closed(1.0, None)
    plan = core.plan_connect(1.0)
    assert plan is not None and plan.url.startswith("wss://gateway.discord.gg/")


def test_a_ws_gateway_accepts_ws_resume_urls() -> None:
    core = make(gateway_url="ws://127.0.0.1:9999/")
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(hello(), 0.0)
    core.receive(ready(resume="ws://127.0.0.1:9999"), 0.1)
    assert core.resume_url == "ws://127.0.0.1:9999"
    assert core.session() == Session("sess-1", 1, "ws://127.0.0.1:9999")


def test_the_command_queue_is_bounded() -> None:
    core = make(command_queue_limit=3)
    core.connection_opened(0.0, identify_permitted=True)  # not READY: commands wait
    for i in range(3):
        core.queue_command(b'{"op":3,"d":%d}' % i, 0.0, ticket=i)
    with pytest.raises(CommandRejected) as info:
        core.queue_command(b'{"op":3,"d":9}', 0.0, ticket=9)
    assert info.value.reason == "queue_full"
    assert core.stats().commands_waiting == 3


def test_commands_older_than_max_age_are_dropped_and_handed_back() -> None:
    core = make(command_max_age=30.0)
    core.connection_opened(0.0, identify_permitted=True)
    core.queue_command(b'{"op":3,"d":1}', 0.0, ticket="old")
    core.queue_command(b'{"op":3,"d":2}', 20.0, ticket="young")
    assert core.next_deadline() == pytest.approx(min(20.0, 30.0))  # HELLO timeout first
    core.receive(hello(), 1.0)
    sent(core)
    core.tick(30.0)
    assert "commands_expired" in kinds(core)
    (dropped,) = take(core, CommandsDropped)
    assert dropped == CommandsDropped(("old",), "expired")
    core.receive(ready(), 31.0)
    assert [p["d"] for p in sent(core) if p["op"] == 3] == [2]
    assert tickets(core) == ["young"]


def test_stopping_hands_queued_commands_back() -> None:
    core = make()
    core.connection_opened(0.0, identify_permitted=True)
    core.queue_command(b'{"op":3,"d":1}', 0.0, ticket="a")
    core.stop(keep_session=True)
    (dropped,) = take(core, CommandsDropped)
    assert dropped.tickets == ("a",) and dropped.reason == "stopping"


def test_stats_are_a_snapshot_and_counts_are_taken_once() -> None:
    core = make()
    connected_ready(core)
    before = core.stats()
    core.take_counts()
    core.receive(dispatch(2), 1.0)
    after = core.stats()
    assert (before.seq, after.seq) == (1, 2)  # a snapshot: it does not follow the core
    counts = core.take_counts()
    assert counts.packets_received == {("MESSAGE_CREATE", 0): 1}
    counts.packets_received.clear()  # handed over: the core counts afresh
    core.receive(dispatch(3), 1.0)
    assert core.take_counts().packets_received == {("MESSAGE_CREATE", 0): 1}
    assert after.phase == Phase.READY.value and after.ready
    assert NoticeKind.POISON.reconnect == "poison"
    assert core.session() == Session("sess-1", 1, RESUME)


def test_heartbeats_of_many_shards_fall_on_a_shared_grid() -> None:
    """Deadlines are moved a little earlier onto a grid of a fortieth of the interval, so the
    heartbeats of many shards share wake-ups; never later than the interval."""
    times = set()
    for i in range(50):
        core = make(rand=i / 50)
        core.connection_opened(0.0, identify_permitted=True)
        core.receive(hello(), 0.0)  # 41.25 s
        first = core.next_deadline()
        assert first is not None and first <= 41.25 * i / 50 + 1e-9
        core.tick(first)
        second = core.next_deadline()
        assert second is not None and 41.25 - 41.25 / 40 < second - first <= 41.25 + 1e-9
        times.add(round(second, 6))
    assert len(times) <= 41  # fifty shards, at most one wake-up per grid step


def test_a_session_given_up_is_reported_as_a_gap_at_the_next_ready() -> None:
    core = make()
    connected_ready(core)
    core.receive(dispatch(2), 1.0)
    core.receive(j({"op": 9, "d": False}), 2.0)  # the session is gone: events after 2 are lost
    assert take(core, Gap) == []  # not before we know the new session
    core.connection_closed(2.1, None)
    core.connection_opened(5.0, identify_permitted=True)
    core.receive(hello(), 5.0)
    core.receive(ready(session="sess-2"), 5.5)
    (gap,) = take(core, Gap)
    assert gap == Gap("invalid_session", "sess-1", 2, 2.0, "sess-2", 5.5)


@pytest.mark.parametrize(("code", "reason"), [(4009, "session_closed"), (4007, "session_closed")])
def test_a_session_closed_for_good_is_a_gap(code: int, reason: str) -> None:
    core = make()
    connected_ready(core)
    core.connection_closed(3.0, code)
    core.connection_opened(3.5, identify_permitted=True)
    core.receive(hello(), 3.5)
    core.receive(ready(session="sess-2"), 4.0)
    (gap,) = take(core, Gap)
    assert (gap.reason, gap.old_session, gap.new_session, gap.since) == (
        reason,
        "sess-1",
        "sess-2",
        3.0,
    )


def test_a_resume_is_no_gap() -> None:
    core = make()
    connected_ready(core)
    core.connection_closed(1.0, 1006)
    core.connection_opened(1.0, identify_permitted=False)
    core.receive(hello(), 1.0)
    core.receive(j({"op": 0, "t": "RESUMED", "s": 2, "d": {}}), 1.1)
    assert take(core, Gap) == []
