"""The sans-I/O shard core, driven with bytes and a fake clock (discord.md §4–§9, §14)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from spectacles_gateway.protocol.closecodes import CloseAction
from spectacles_gateway.protocol.shard import CommandRejected, Phase, Session

from .support.shard import (
    BASE,
    RESUME,
    TOKEN,
    Q,
    close_request,
    connected_ready,
    dispatch,
    hello,
    identify_sent,
    j,
    kinds,
    make,
    ready,
    receive,
    sent,
    tickets,
)

# ----------------------------------------------------------------------------- connecting


def test_first_connection_identifies_at_the_gateway_url_with_query() -> None:
    core = make()
    plan = core.plan_connect(0.0)
    assert plan is not None
    assert (plan.url, plan.at, plan.identify) == (BASE + Q, 0.0, True)


def test_identify_fields_and_heartbeat_jitter_after_hello() -> None:
    presence = {
        "since": None,
        "activities": [{"name": "x", "type": 0}],
        "status": "online",
        "afk": False,
    }
    core = make(rand=0.25, presence=presence)
    core.connection_opened(10.0, identify_permitted=True)
    assert sent(core) == []  # nothing before HELLO: no heartbeat, no identify
    core.receive(hello(40000), 10.0)
    (identify,) = sent(core)
    assert identify["op"] == 2
    d = identify["d"]
    assert d["token"] == TOKEN  # bare token: "Bot " belongs to REST
    assert d["intents"] == 513
    assert d["shard"] == [1, 4]
    assert d["large_threshold"] == 250
    assert d["compress"] is False
    assert set(d["properties"]) == {"os", "browser", "device"}
    assert d["presence"] == presence
    assert core.phase is Phase.IDENTIFYING
    assert identify_sent(core) == 10.0
    # First heartbeat after interval * jitter = 40 * 0.25 = 10 s, with d null before any dispatch.
    assert core.next_deadline() == pytest.approx(20.0)
    core.tick(19.9)
    assert sent(core) == []
    core.tick(20.0)
    assert sent(core) == [{"op": 1, "d": None}]
    assert core.next_deadline() == pytest.approx(60.0)


def test_identify_over_4096_bytes_is_refused_at_construction() -> None:
    presence = {"status": "online", "activities": [{"name": "x" * 5000, "type": 0}]}
    with pytest.raises(ValueError, match="4096"):
        make(presence=presence)


def test_invalid_shard_id_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="outside"):
        make(shard_id=4)


def test_ready_records_session_and_seq_and_heartbeats_carry_it() -> None:
    core = make(rand=0.0)
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(hello(1000), 0.0)
    assert receive(core, ready(s=1), 0.1) is None  # READY is not in this filter
    assert core.session_id == "sess-1" and core.resume_url == RESUME and core.seq == 1
    assert core.phase is Phase.READY
    core.receive(dispatch(2), 0.2)
    sent(core)
    core.tick(0.0)  # jitter 0: first beat at HELLO time
    assert sent(core) == [{"op": 1, "d": 2}]


def test_seq_zero_is_a_seq_not_null() -> None:
    core = make(rand=0.0)
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(hello(1000), 0.0)
    core.receive(ready(s=0), 0.0)
    sent(core)
    core.tick(0.0)
    assert sent(core) == [{"op": 1, "d": 0}]


def test_seq_only_from_dispatches() -> None:
    core = make()
    connected_ready(core)
    core.receive(j({"op": 11, "s": 99}), 1.0)
    core.receive(j({"op": 9, "d": True, "s": 98}), 1.0)
    assert core.seq == 1


# ----------------------------------------------------------------------------- dispatches


def test_dispatch_keeps_d_raw_and_filters_events() -> None:
    core = make(events=frozenset({"MESSAGE_CREATE"}))
    connected_ready(core)
    raw = b'{"op":0,"t":"MESSAGE_CREATE","s":2,"d":{"content":"h\\u00e9",  "n":1.50}}'
    out = receive(core, raw, 1.0)
    assert out is not None
    assert (out.event, out.seq, out.data) == (
        "MESSAGE_CREATE",
        2,
        b'{"content":"h\\u00e9",  "n":1.50}',
    )
    assert receive(core, dispatch(3, "TYPING_START"), 1.0) is None
    assert core.seq == 3


def test_no_filter_publishes_every_dispatch_including_ready() -> None:
    core = make(events=None)
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(hello(), 0.0)
    out = receive(core, ready(), 0.1)
    assert out is not None and out.event == "READY" and out.seq == 1
    assert core.confirmed_seq == 0  # READY itself waits for the broker's confirmation
    core.confirm(1, "sess-1")
    assert core.confirmed_seq == 1


def test_unknown_opcodes_events_and_fields_are_tolerated() -> None:
    core = make()
    connected_ready(core)
    assert receive(core, j({"op": 99, "d": {"x": 1}}), 1.0) is None
    assert kinds(core) == ["unknown_opcode"]
    out = receive(
        core, j({"op": 0, "t": "FUTURE_EVENT", "s": 2, "d": {"new": True}, "extra": 1}), 1.0
    )
    assert out is not None and out.event == "FUTURE_EVENT"
    assert core.phase is Phase.READY


def test_packets_are_tallied_by_t_and_op() -> None:
    core = make()
    connected_ready(core)
    core.receive(dispatch(2), 1.0)
    core.receive(dispatch(3), 1.0)
    core.receive(j({"op": 11}), 1.0)
    counts = core.take_counts()
    assert counts.packets_received == {
        ("", 10): 1,
        ("READY", 0): 1,
        ("MESSAGE_CREATE", 0): 2,
        ("", 11): 1,
    }
    # Taken: the next take has only what came since.
    core.receive(dispatch(4), 2.0)
    assert core.take_counts().packets_received == {("MESSAGE_CREATE", 0): 1}
    assert core.take_counts().packets_received == {}


# ----------------------------------------------------------------------------- heartbeats


def test_op1_from_server_gets_an_immediate_heartbeat() -> None:
    core = make()
    connected_ready(core)
    core.receive(j({"op": 1, "d": None}), 5.0)
    assert sent(core) == [{"op": 1, "d": 1}]


def test_missing_ack_is_a_zombie_closed_with_a_resumable_code() -> None:
    core = make(rand=0.0)
    connected_ready(core)
    core.tick(0.0)
    assert sent(core) == [{"op": 1, "d": 1}]
    core.receive(j({"op": 11}), 0.05)
    assert core.stats().latency == pytest.approx(0.05)
    core.tick(41.25)  # acked: beat again
    assert sent(core) == [{"op": 1, "d": 1}]
    core.tick(82.5)  # not acked since: zombie
    assert sent(core) == []
    code, _ = close_request(core) or (0, "")
    assert code not in (1000, 1001)
    assert "zombie" in kinds(core)
    assert core.connection_closed(82.6, None) is CloseAction.RESUME
    plan = core.plan_connect(82.6)
    assert plan is not None
    assert (plan.url, plan.identify, plan.at) == (RESUME + "/" + Q, False, 82.6)


def test_hello_timeout_closes_and_backs_off() -> None:
    core = make(hello_timeout=5.0)
    core.connection_opened(0.0, identify_permitted=True)
    assert core.next_deadline() == 5.0
    core.tick(5.0)
    code, reason = close_request(core) or (0, "")
    assert code == 4000 and "hello" in reason
    core.connection_closed(5.1, None)
    plan = core.plan_connect(5.1)
    assert plan is not None and plan.at > 5.1 and plan.identify


# ----------------------------------------------------------------------------- resume


def test_reconnect_resumes_after_the_last_event_handed_to_the_broker() -> None:
    """A live process still holds what its broker has not confirmed (the broker retries it):
    resuming after it avoids duplicates. The stored session keeps the confirmed seq, for a
    process that starts afresh."""
    core = make()
    connected_ready(core)
    for s in (2, 3, 4):
        core.receive(dispatch(s), 1.0)
    core.confirm(3, "sess-1")
    core.connection_closed(2.0, 1006)
    assert core.session() == Session("sess-1", 3, RESUME)
    plan = core.plan_connect(2.0)
    assert plan is not None and plan.url == RESUME + "/" + Q and not plan.identify
    core.connection_opened(2.0, identify_permitted=False)
    core.receive(hello(), 2.0)
    assert sent(core) == [{"op": 6, "d": {"token": TOKEN, "session_id": "sess-1", "seq": 4}}]
    assert core.phase is Phase.RESUMING
    core.receive(j({"op": 0, "t": "RESUMED", "s": 5, "d": {}}), 2.2)
    assert core.phase is Phase.READY and "resumed" in kinds(core)
    assert core.seq == 5
    assert core.confirmed_seq == 3  # event 4 is still the broker's to confirm
    core.confirm(4, "sess-1")
    assert core.confirmed_seq == 5


def test_confirm_from_an_old_session_is_ignored() -> None:
    core = make()
    connected_ready(core)
    core.receive(dispatch(2), 1.0)
    core.confirm(2, "some-other-session")
    assert core.confirmed_seq == 1
    core.confirm(2, "sess-1")
    assert core.confirmed_seq == 2


def test_filtered_events_count_as_confirmed_between_published_ones() -> None:
    core = make(events=frozenset({"MESSAGE_CREATE"}))
    connected_ready(core)
    core.receive(dispatch(2), 1.0)
    core.receive(dispatch(3, "TYPING_START"), 1.0)
    core.receive(dispatch(4), 1.0)
    assert core.confirmed_seq == 1
    core.confirm(2, "sess-1")
    assert core.confirmed_seq == 3
    core.confirm(4, "sess-1")
    assert core.confirmed_seq == 4


def test_op7_after_ready_reconnects_immediately_and_resumes() -> None:
    core = make()
    connected_ready(core)
    core.receive(j({"op": 7, "d": None}), 3.0)
    code, _ = close_request(core) or (0, "")
    assert code == 4000
    core.connection_closed(3.0, 4000)
    plan = core.plan_connect(3.0)
    assert plan is not None and plan.at == 3.0 and not plan.identify


def test_op7_instead_of_hello_reconnects_without_identifying() -> None:
    core = make()
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(j({"op": 7, "d": None}), 0.1)
    assert sent(core) == []
    code, _ = close_request(core) or (0, "")
    assert code not in (1000, 1001)
    core.connection_closed(0.2, None)
    plan = core.plan_connect(0.2)
    assert plan is not None and plan.identify and plan.url == BASE + Q
    assert identify_sent(core) is None


def test_op9_false_drops_the_session_and_identifies_after_1_to_5_seconds() -> None:
    core = make(rand=0.5)
    connected_ready(core)
    core.receive(dispatch(2), 1.0)
    core.receive(j({"op": 9, "d": False}), 5.0)
    assert core.session_id is None and core.seq is None
    code, _ = close_request(core) or (0, "")
    assert code not in (1000, 1001)
    core.connection_closed(5.0, None)
    plan = core.plan_connect(5.0)
    assert plan is not None and plan.identify and plan.url == BASE + Q
    assert plan.at == pytest.approx(5.0 + 1.0 + 4.0 * 0.5)
    core.connection_opened(plan.at, identify_permitted=True)
    core.receive(hello(), plan.at)
    assert sent(core)[0]["op"] == 2


def test_op9_true_keeps_the_session_and_resumes() -> None:
    core = make()
    connected_ready(core)
    core.receive(j({"op": 9, "d": True}), 5.0)
    assert core.session_id == "sess-1"
    core.connection_closed(5.0, None)
    plan = core.plan_connect(5.0)
    assert plan is not None and not plan.identify


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (None, "resume"),
        (1000, "resume"),
        (1001, "resume"),
        (1006, "resume"),
        (4000, "resume"),
        (4001, "resume"),
        (4002, "resume"),
        (4003, "identify"),
        (4004, "fatal"),
        (4005, "resume"),
        (4007, "identify"),
        (4008, "resume"),
        (4009, "identify"),
        (4010, "fatal"),
        (4011, "fatal"),
        (4012, "fatal"),
        (4013, "fatal"),
        (4014, "fatal"),
    ],
)
def test_every_close_code_resumes_identifies_or_stops(code: int | None, outcome: str) -> None:
    core = make()
    connected_ready(core)
    core.connection_closed(10.0, code)
    plan = core.plan_connect(10.0)
    if outcome == "fatal":
        assert plan is None and core.fatal_code == code and core.phase is Phase.STOPPED
    elif outcome == "identify":
        assert plan is not None and plan.identify and plan.url == BASE + Q
        assert core.session_id is None
    else:
        assert plan is not None and not plan.identify and plan.url == RESUME + "/" + Q
        assert plan.at == 10.0  # a healthy session that closes reconnects at once


def test_failed_connects_back_off_and_stale_resume_url_falls_back() -> None:
    core = make(rand=1.0)
    connected_ready(core)
    core.connection_closed(0.0, 1006)
    delays = []
    now = 0.0
    for _ in range(4):
        plan = core.plan_connect(now)
        assert plan is not None
        delays.append(plan.at - now)
        now = plan.at
        core.connect_failed(now, "refused")
    assert delays[0] == 0.0
    assert delays[1:] == [1.0, 2.0, 4.0]
    plan = core.plan_connect(now)
    assert plan is not None and plan.url == BASE + Q and not plan.identify


def test_new_session_resets_seq_and_pending() -> None:
    core = make()
    connected_ready(core)
    core.receive(dispatch(2), 1.0)
    core.receive(dispatch(3), 1.0)
    core.connection_closed(2.0, 4009)
    assert core.seq is None and core.confirmed_seq is None
    core.connection_opened(3.0, identify_permitted=True)
    core.receive(hello(), 3.0)
    core.receive(ready(session="sess-2", s=1), 3.1)
    assert (core.session_id, core.seq, core.confirmed_seq) == ("sess-2", 1, 1)


def test_restored_session_resumes_on_first_connection() -> None:
    core = make(session=Session("stored", 41, "ws://resume.example"))
    plan = core.plan_connect(0.0)
    assert plan is not None and not plan.identify and plan.url.startswith("ws://resume.example/?")
    core.connection_opened(0.0, identify_permitted=False)
    core.receive(hello(), 0.0)
    assert sent(core) == [{"op": 6, "d": {"token": TOKEN, "session_id": "stored", "seq": 41}}]


def test_malformed_json_closes_resumably_and_counts() -> None:
    core = make()
    connected_ready(core)
    assert receive(core, b'{"op":0,"t":"MESSAGE_CREATE","s":2,"d":{', 1.0) is None
    code, _ = close_request(core) or (0, "")
    assert code == 4000
    assert kinds(core) == ["decode_error"]
    # Anything after the close request is not processed (it will be replayed after resume).
    assert receive(core, dispatch(2), 1.0) is None
    assert core.seq == 1


def test_transport_error_closes_resumably() -> None:
    core = make()
    connected_ready(core)
    core.message_failed("zstd: corrupt")
    code, _ = close_request(core) or (0, "")
    assert code == 4000
    assert core.connection_closed(1.0, None) is CloseAction.RESUME
    assert core.session_id == "sess-1"


# ----------------------------------------------------------------------------- closing


def test_shutdown_closes_with_1000_and_forgets_the_session() -> None:
    core = make()
    connected_ready(core)
    core.stop(keep_session=False)
    assert close_request(core) == (1000, "shutting down")
    core.connection_closed(1.0, 1000)
    assert core.plan_connect(1.0) is None and core.session() is None


def test_shutdown_keeping_the_session_closes_resumably() -> None:
    core = make()
    connected_ready(core)
    core.receive(dispatch(2), 1.0)
    core.confirm(2, "sess-1")
    core.stop(keep_session=True)
    code, _ = close_request(core) or (0, "")
    assert code not in (1000, 1001)
    core.connection_closed(1.0, code)
    assert core.session() == Session("sess-1", 2, RESUME)


def test_reconnect_paths_never_close_with_1000_or_1001() -> None:
    triggers = [
        j({"op": 7, "d": None}),
        j({"op": 9, "d": True}),
        j({"op": 9, "d": False}),
        b"not json",
    ]
    for trigger in triggers:
        core = make()
        connected_ready(core)
        core.receive(trigger, 1.0)
        code, _ = close_request(core) or (0, "")
        assert code == 4000, trigger


# ----------------------------------------------------------------------------- commands


def test_commands_wait_for_ready_then_respect_the_send_limit() -> None:
    core = make(rand=0.0)
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(hello(), 0.0)
    sends: list[tuple[float, dict[str, Any]]] = [(0.0, p) for p in sent(core)]
    for i in range(130):  # discord.md §14.11: 130 presence updates queued at once
        core.queue_command(b'{"op":3,"d":{"n":%d}}' % i, 0.0, ticket=i)
    assert sent(core) == []  # nothing but identify and heartbeats before READY
    core.receive(ready(), 0.5)
    now = 0.5
    done: list[object] = []
    while now < 200.0:
        for payload in sent(core):
            sends.append((now, payload))
            if payload["op"] == 1:
                core.receive(j({"op": 11}), now)  # the server ACKs at once
        done += tickets(core)
        deadline = core.next_deadline()
        assert deadline is not None
        now = max(now, deadline)
        core.tick(now)
    commands = [(t, p["d"]["n"]) for t, p in sends if p["op"] == 3]
    assert [n for _, n in commands] == list(range(130))  # all sent, in order
    assert done == list(range(130))
    times = [t for t, _ in sends]
    for t in times:  # never more than 120 in any 60 s window, heartbeats included
        assert sum(1 for u in times if t <= u < t + 60.0) <= 120
    beats = [t for t, p in sends if p["op"] == 1]
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    # Never late, and early by less than the grid that lets shards share wake-ups.
    assert gaps and all(41.25 - 41.25 / 40 < g <= 41.25 + 1e-9 for g in gaps)
    assert commands[-1][0] == pytest.approx(0.5 + 61.5)  # the last ones waited for the window


def test_oversize_command_is_rejected_before_queueing() -> None:
    core = make()
    connected_ready(core)
    with pytest.raises(CommandRejected, match="4096"):
        core.queue_command(b'{"op":3,"d":"' + b"x" * 4100 + b'"}', 1.0)
    assert core.stats().commands_waiting == 0


def test_sent_and_confirmed_tallies_for_metrics() -> None:
    core = make(rand=0.0)
    core.connection_opened(0.0, identify_permitted=True)
    core.receive(hello(), 0.0)
    core.receive(ready(), 0.1)
    core.tick(0.1)  # first heartbeat
    core.queue_command(b'{"op":3,"d":{}}', 0.2)
    core.queue_command(b'{"op":8,"d":{"guild_id":"1","query":"","limit":0}}', 0.2)
    for s in (2, 3, 4):
        core.receive(dispatch(s), 0.3)
    core.confirm(3, "sess-1")
    counts = core.take_counts()
    assert counts.packets_sent == {2: 1, 1: 1, 3: 1, 8: 1}
    assert counts.commands_sent == 2
    assert counts.confirmed_events == 2
    core.receive(j({"op": 11}), 0.4)
    core.confirm(4, "sess-1")
    counts = core.take_counts()  # only what came after the last take
    assert (counts.packets_sent, counts.commands_sent) == ({}, 0)
    assert (counts.confirmed_events, counts.heartbeats_acked) == (1, 1)
    with pytest.raises(CommandRejected, match="not a gateway payload"):
        core.queue_command(b"nope", 0.3)


def test_a_shard_config_never_shows_its_token() -> None:
    config = make().config
    assert config.token == TOKEN
    for text in (repr(config), str(config), f"{config!r}", repr([config])):
        assert TOKEN not in text and "token" not in text
        assert "shard_id=1" in text and "intents=513" in text
    assert "token" not in dict(config.__rich_repr__())
