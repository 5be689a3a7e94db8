"""The AMQP broker: its pure parts (frames, confirm bookkeeping) with bytes and tables, then the
broker in a worker against the simulator and the real RabbitMQ (restart, blocked publishing,
bad commands, forwarding, an unreachable server). The helpers shared with the other AMQP tests
(unique group names, a short-lived pika connection per operation) are in tests/support/brokers.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pika import frame, spec

from spectacles_gateway.brokers.amqp import AmqpBroker
from spectacles_gateway.brokers.amqp_confirms import FORWARD, ConfirmTracker
from spectacles_gateway.brokers.amqp_frames import (
    FrameBuilder,
    event_headers_table,
    message_body,
    message_id,
)
from spectacles_gateway.brokers.wire import msgpack_string

from .gwtest import simulator, t, wait_until
from .support.brokers import (
    PRESENCE,
    Driver,
    channel,
    declare_event_queue,
    delete_group,
    depth,
    drain,
    gateway,
    publish,
    sample,
    shard_ready,
    unique_group,
)


async def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out.decode()}"
    return out.decode()


def d_of(props: Any, body: bytes) -> dict[str, Any]:
    """Decode a body as the Spectacles libraries do: msgpack to a string, then JSON."""
    text = msgspec.msgpack.decode(body)
    assert isinstance(text, str)
    return json.loads(text)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Frames: byte for byte what pika would write


def pika_frames(
    channel_number: int,
    exchange: str,
    routing_key: str,
    props: spec.BasicProperties,
    body: bytes,
    body_max: int = 131072 - 8,
) -> bytes:
    out = frame.Method(
        channel_number,
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
    ).marshal()
    out += frame.Header(channel_number, len(body), props).marshal()
    for start in range(0, len(body), body_max):
        out += frame.Body(channel_number, body[start : start + body_max]).marshal()
    return out


def pika_props(
    built: bytes,
    shard_id: int,
    generation: int,
    seq: int | None,
    session: str,
    persistent: bool,
    expiration: str,
) -> spec.BasicProperties:
    """The properties pika would write for this event; the timestamp is read from ``built``
    (the last 8 bytes of the content header frame, which follows the method frame)."""
    header_at = 7 + int.from_bytes(built[3:7]) + 1
    stamp_at = header_at + 7 + int.from_bytes(built[header_at + 3 : header_at + 7]) - 8
    headers: dict[str, int] = {"shard_id": shard_id, "generation": generation}
    if seq is not None:
        headers["seq"] = seq
    return spec.BasicProperties(
        headers=headers,
        delivery_mode=2 if persistent else None,
        expiration=expiration,
        message_id=message_id(session, seq, shard_id).decode(),
        timestamp=int.from_bytes(built[stamp_at : stamp_at + 8]),
    )


@pytest.mark.parametrize(
    ("fmt", "persistent", "shard_id", "seq"),
    [
        ("msgpack", False, 0, 1),
        ("msgpack", True, 7, 123456),
        ("json", False, 1023, 2**31 - 1),
        ("msgpack", False, 3, 2**31),  # beyond int32: pika (and we) switch to a 64-bit field
        ("msgpack", False, 5, None),
    ],
)
def test_event_frames_are_what_pika_writes(
    fmt: str, persistent: bool, shard_id: int, seq: int | None
) -> None:
    builder = FrameBuilder(
        exchange="gateway",
        expiration_ms=120000,
        persistent=persistent,
        fmt=fmt,
        channel=3,
        generation=shard_id % 3,
    )
    data = b'{"id":"1","content":"h\\u00e9llo"}'
    session = "9c3f1e2d4b5a69788796a5b4c3d2e1f0"
    for _ in range(2):  # the second time from the caches
        built = builder.event("MESSAGE_CREATE", shard_id, seq, session, data)
        props = pika_props(built, shard_id, shard_id % 3, seq, session, persistent, "120000")
        body = msgpack_string(data) if fmt == "msgpack" else data
        assert built == pika_frames(3, "gateway", "MESSAGE_CREATE", props, body)
        assert message_body(built) == body
        assert builder.event_data(built) == data
    assert abs(props.timestamp - __import__("time").time()) < 5


def test_big_bodies_are_split_at_the_frame_size_like_pika() -> None:
    builder = FrameBuilder(exchange="g", expiration_ms=1000, frame_max=4096)
    data = json.dumps({"id": "1", "blob": "x" * 20000}).encode()
    built = builder.event("GUILD_CREATE", 0, 2, "s", data)
    props = spec.BasicProperties(
        headers={"shard_id": 0, "generation": 0, "seq": 2},
        expiration="1000",
        message_id="s:2",
        timestamp=int.from_bytes(built[built.index(b"s:2") + 3 :][:8]),
    )
    assert built == pika_frames(1, "g", "GUILD_CREATE", props, msgpack_string(data), 4096 - 8)
    assert builder.event_data(built) == data


@settings(max_examples=300, deadline=None)
@given(
    fmt=st.sampled_from(["msgpack", "json"]),
    persistent=st.booleans(),
    frame_max=st.sampled_from([4096, 70000, 131072]),
    shard_id=st.sampled_from([0, 1, 1023, 2**31 - 1, 2**31]),
    seq=st.one_of(st.none(), st.integers(-(2**40), 2**40)),
    session=st.text(min_size=0, max_size=300),
    size=st.sampled_from([0, 1, 31, 32, 33, 4087, 4088, 65530, 65535, 65536, 70000, 140000]),
    twice=st.booleans(),
)
@example("msgpack", False, 131072, 3, 5, "\u00e9" * 200, 33, True)  # a 400-byte id: hashed
def test_every_event_frame_path_is_what_pika_writes(
    fmt: str,
    persistent: bool,
    frame_max: int,
    shard_id: int,
    seq: int | None,
    session: str,
    size: int,
    twice: bool,
) -> None:
    """Both paths of FrameBuilder.event (the cached common case and the general one, chosen by
    body size, seq range, shard cache and message id length) against pika's own marshalling."""
    builder = FrameBuilder(
        exchange="gateway", expiration_ms=5000, persistent=persistent, fmt=fmt,
        frame_max=frame_max, channel=2, generation=7,
    )  # fmt: skip
    data = (b'{"x":"' + b"y" * size + b'"}')[:size]
    if twice:  # the second event of a shard comes from the caches
        builder.event("TYPING_START", shard_id, 1, "s", b"{}")
    built = builder.event("MESSAGE_CREATE", shard_id, seq, session, data)
    body = msgpack_string(data) if fmt == "msgpack" else data
    props = pika_props(built, shard_id, 7, seq, session, persistent, "5000")
    assert built == pika_frames(2, "gateway", "MESSAGE_CREATE", props, body, frame_max - 8)
    assert builder.event_data(built) == data


@pytest.mark.parametrize("persistent", [False, True])
def test_command_frames_are_what_pika_writes(persistent: bool) -> None:
    builder = FrameBuilder(exchange="g", expiration_ms=1000, persistent=persistent)
    packet = b'{"op":3,"d":{"status":"idle"}}'
    built = builder.command("g:5", packet)
    props = spec.BasicProperties(delivery_mode=2 if persistent else None)
    assert built == pika_frames(1, "", "g:5", props, packet)
    assert message_body(built) == packet


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (31, b"\xbf"),
        (32, b"\xda\x00\x20"),
        (65535, b"\xda\xff\xff"),
        (65536, b"\xdb\x00\x01\x00\x00"),
    ],
)
def test_body_is_the_legacy_msgpack_string_of_the_raw_json(size: int, header: bytes) -> None:
    data = b'"' + b"x" * (size - 2) + b'"'
    body = message_body(FrameBuilder(exchange="g", expiration_ms=1).event("E", 0, 1, "s", data))
    assert body == header + data
    assert msgspec.msgpack.decode(body) == data.decode()


def test_headers_table_and_message_ids() -> None:
    assert event_headers_table(2, 9, 1) == (
        b"\x00\x00\x00\x27\x08shard_idI\x00\x00\x00\x02\x0agenerationI\x00\x00\x00\x01"
        b"\x03seqI\x00\x00\x00\x09"
    )
    assert message_id("abc", 42, 0) == b"abc:42"
    assert message_id("abc", 42, 0) == message_id("abc", 42, 7)  # the same event, replayed
    assert message_id("abc", None, 7) == b"abc:~7"
    assert len(message_id("x" * 300, 1, 0)) == 64  # hashed to fit a short string


# --------------------------------------------------------------------------------------------
# Confirm bookkeeping


class Confirms:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str, int]] = []
        self.tracker = ConfirmTracker(
            lambda shard, session, seq: self.calls.append((shard, session, seq))
        )

    def add(self, shard: int, seq: int, session: str = "s") -> None:
        self.tracker.add(shard, seq, session, "E", f"{shard}/{seq}".encode())

    def send(self) -> list[bytes]:
        return self.tracker.take_pending()

    def take(self) -> list[tuple[int, str, int]]:
        calls, self.calls = self.calls, []
        return calls


def test_a_multiple_ack_confirms_the_highest_seq_of_each_shard_once() -> None:
    c = Confirms()
    for seq in (1, 2, 3):
        c.add(0, seq)
        c.add(1, seq + 10)
    assert c.send() == [b"0/1", b"1/11", b"0/2", b"1/12", b"0/3", b"1/13"]  # tags 1..6
    c.tracker.settle(4, True, True)
    assert sorted(c.take()) == [(0, "s", 2), (1, "s", 12)]
    c.tracker.settle(6, True, True)
    assert sorted(c.take()) == [(0, "s", 3), (1, "s", 13)]
    assert c.tracker.unconfirmed == 0 and c.tracker.confirmed == 6
    assert not c.tracker.inflight and not c.tracker.by_shard


def test_single_acks_in_any_order_confirm_only_an_unbroken_run_per_shard() -> None:
    c = Confirms()
    for seq in range(1, 6):
        c.add(0, seq)
    c.send()  # tags 1..5 = seqs 1..5
    c.tracker.settle(3, False, True)
    c.tracker.settle(2, False, True)
    assert c.take() == []  # seq 1 is still out
    c.tracker.settle(1, False, True)
    assert c.take() == [(0, "s", 3)]
    c.tracker.settle(5, False, True)
    assert c.take() == []
    c.tracker.settle(4, False, True)
    assert c.take() == [(0, "s", 5)]
    assert c.tracker.unconfirmed == 0 and not c.tracker.inflight


def test_a_nack_holds_back_its_shard_only_and_the_retry_keeps_publish_order() -> None:
    c = Confirms()
    c.add(0, 1)
    c.add(1, 1)
    c.add(0, 2)
    c.add(0, 3)
    c.send()  # tags: 1=(0,1) 2=(1,1) 3=(0,2) 4=(0,3)
    c.tracker.settle(1, False, False)  # (0,1) refused
    c.tracker.settle(4, True, True)  # everything else acked
    assert c.take() == [(1, "s", 1)]  # shard 1 goes on; shard 0 waits for seq 1
    assert c.tracker.unconfirmed == 3
    c.add(0, 4)
    assert c.tracker.retry() == 1
    assert c.send() == [b"0/1", b"0/4"]  # the old one first; new tags 5, 6
    c.tracker.settle(5, False, True)
    assert c.take() == [(0, "s", 3)]
    c.tracker.settle(6, False, True)
    assert c.take() == [(0, "s", 4)]
    assert c.tracker.unconfirmed == 0


def test_a_lost_channel_requeues_everything_unconfirmed_in_order_with_new_tags() -> None:
    c = Confirms()
    for seq in (1, 2, 3):
        c.add(0, seq)
    c.send()
    c.tracker.settle(1, False, True)
    assert c.take() == [(0, "s", 1)]
    c.add(0, 4)  # waiting, never written
    assert c.tracker.reset() == 2
    assert c.tracker.tag == 0
    assert c.send() == [b"0/2", b"0/3", b"0/4"]
    c.tracker.settle(3, True, True)
    assert c.take() == [(0, "s", 4)]


def test_a_new_session_confirms_the_last_seq_of_each_session() -> None:
    c = Confirms()
    c.add(0, 7, "old")
    c.add(0, 8, "old")
    c.add(0, 1, "new")
    c.add(0, 2, "new")
    c.send()
    c.tracker.settle(4, True, True)
    assert c.take() == [(0, "old", 8), (0, "new", 2)]


def test_forwarded_commands_are_handed_back_for_their_ack_when_confirmed() -> None:
    c = Confirms()
    acked: list[int] = []
    c.tracker.add(FORWARD, None, "", "g:3", b"cmd", ack=lambda: acked.append(1))
    c.add(0, 1)
    c.send()
    forwarded = c.tracker.settle(2, True, True)
    assert [m.frames for m in forwarded] == [b"cmd"]
    assert c.take() == [(0, "s", 1)]
    assert c.tracker.unconfirmed == 0


# --------------------------------------------------------------------------------------------
# Against RabbitMQ


async def test_events_reach_a_spectacles_queue_with_our_properties() -> None:
    group = unique_group()
    queue = declare_event_queue(group)  # first, as a consumer would: our declare must match
    guilds = declare_event_queue(group, "GUILD_CREATE")
    try:
        async with simulator(rate=200, big_guild_create_bytes=300_000) as sim:
            async with gateway(sim, group, persistent=True) as (worker, broker):
                await wait_until(lambda: broker.tracker.confirmed >= 100, 10, "100 confirms")
                assert broker.connected
                sim.pause_dispatch()
                core = worker.runners[0].core
                log = sim.ledger.sessions_for(0)[-1]
                # Everything written to the socket read (an event can be on its way when the
                # dispatch pauses), and confirmed.
                await wait_until(
                    lambda: core.seq == log.written and core.confirmed_seq == core.seq,
                    10,
                    "every event read and confirmed",
                )
            sent = sim.ledger.events_sent()
        messages = await asyncio.to_thread(drain, queue)
        assert [d_of(*m)["id"] for m in messages] == sent  # in order, each once
        session = sim.session_ids(0)[-1]
        for props, _ in messages:
            assert props.expiration == "120000"
            assert props.delivery_mode == 2
            assert props.headers["shard_id"] == 0
            assert props.message_id == f"{session}:{props.headers['seq']}"
            assert props.timestamp > 1.7e9
        big, *rest = [d_of(*m) for m in await asyncio.to_thread(drain, guilds)]
        assert len(msgspec.json.encode(big)) > 2 * 131072  # three body frames at least
        assert len(rest) == 1 and all(g["id"].isdigit() for g in [big, *rest])  # 2 guilds
    finally:
        delete_group(group, [queue, guilds])


async def test_json_format_sends_the_raw_json_of_d() -> None:
    group = unique_group()
    queue = declare_event_queue(group)
    try:
        async with simulator(rate=100) as sim:
            async with gateway(sim, group, fmt="json") as (_, broker):
                await wait_until(lambda: broker.tracker.confirmed >= 20, 10, "20 confirms")
        messages = await asyncio.to_thread(drain, queue)
        assert messages and all(json.loads(body)["id"] for _, body in messages)
    finally:
        delete_group(group, [queue])


@pytest.mark.alone  # restarts the RabbitMQ every test uses
async def test_rabbitmq_restart_mid_stream_loses_nothing_and_duplicates_share_ids() -> None:
    group = unique_group()
    queue = declare_event_queue(group)
    reconnects = sample("gateway_broker_reconnects_total", broker="amqp")
    try:
        async with simulator(shard_count=2, max_concurrency=2, rate=300) as sim:
            async with gateway(sim, group, (0, 1), persistent=True) as (worker, broker):
                await wait_until(lambda: broker.tracker.confirmed >= 300, 15, "events flowing")
                try:
                    await rabbitmqctl("stop_app")
                    await wait_until(lambda: not broker.connected, 5, "the connection lost")
                    # The shards go on; events wait in the buffer.
                    await wait_until(lambda: broker.tracker.unconfirmed > 100, 5, "a backlog")
                    waiting = broker.tracker.unconfirmed
                finally:
                    await rabbitmqctl("start_app")
                    await rabbitmqctl("await_startup")
                await wait_until(lambda: broker.connected, 15, "the broker reconnecting")
                confirmed = broker.tracker.confirmed
                await wait_until(lambda: broker.tracker.confirmed > confirmed + waiting, 15, "more")
                sim.pause_dispatch()
                cores = [r.core for r in worker.runners.values()]
                await wait_until(
                    lambda: all(c.confirmed_seq == c.seq for c in cores), 15, "all confirmed"
                )
                assert broker.reconnects == 1
                assert all(c.session_id == sim.session_ids(i)[0] for i, c in enumerate(cores))
            sent = sim.ledger.events_sent()
        assert sample("gateway_broker_reconnects_total", broker="amqp") == reconnects + 1
        messages = await asyncio.to_thread(drain, queue)
        ids = [d_of(*m)["id"] for m in messages]
        assert set(ids) == set(sent), "an event was lost"
        by_message_id: dict[str, set[str]] = {}
        for (props, _), event_id in zip(messages, ids, strict=True):
            by_message_id.setdefault(props.message_id, set()).add(event_id)
        assert all(len(v) == 1 for v in by_message_id.values())
        assert len(by_message_id) == len(set(ids))  # duplicates carry their original's id
        print(f"restart: {len(ids)} messages, {len(ids) - len(set(ids))} duplicates")
    finally:
        await rabbitmqctl("await_startup")
        delete_group(group, [queue])


async def test_a_dropped_connection_republishes_the_unconfirmed_with_the_same_ids() -> None:
    group = unique_group()
    queue = declare_event_queue(group)
    try:
        async with simulator() as sim:
            async with gateway(sim, group) as (worker, broker):
                await wait_until(lambda: shard_ready(worker) and broker.connected, 10, "ready")
                tracker = broker.tracker
                await wait_until(lambda: tracker.confirmed == 2, 10, "the 2 GUILD_CREATEs")
                conn = broker.link.conn
                assert conn is not None
                # RabbitMQ takes everything, but its confirms stay unread ...
                asyncio.get_running_loop().remove_reader(conn.fileno())
                confirmed = broker.tracker.confirmed
                sim.burst(0, 500)
                await wait_until(lambda: depth(queue) == 500, 10, "500 messages in the queue")
                assert broker.tracker.confirmed == confirmed
                assert broker.tracker.unconfirmed == 500
                # ... and then the connection drops, as on a socket error.
                conn.drop(ConnectionResetError("dropped by the test"))
                await wait_until(lambda: broker.reconnects == 1, 10, "a new connection")
                await wait_until(lambda: broker.tracker.unconfirmed == 0, 10, "all confirmed")
                core = worker.runners[0].core
                assert core.confirmed_seq == core.seq
            sent = sim.ledger.events_sent()
        messages = await asyncio.to_thread(drain, queue)
        ids = [d_of(*m)["id"] for m in messages]
        assert len(ids) == 1000 and set(ids) == set(sent)  # each one twice
        assert ids[:500] == ids[500:] == sent  # the second time in the same order
        assert [p.message_id for p, _ in messages[:500]] == [
            p.message_id for p, _ in messages[500:]
        ]
    finally:
        delete_group(group, [queue])


@pytest.mark.alone  # raises the memory alarm of the RabbitMQ every test uses
async def test_blocked_rabbitmq_pauses_the_shards_in_a_bounded_buffer_then_resumes() -> None:
    group = unique_group()
    queue = declare_event_queue(group)
    watermark = (
        await rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    ).strip()
    try:
        async with simulator(rate=400) as sim:
            async with gateway(sim, group, buffer=50) as (worker, broker):
                await wait_until(lambda: broker.tracker.confirmed >= 100, 10, "events flowing")
                runner = worker.runners[0]
                try:
                    await rabbitmqctl("set_vm_memory_high_watermark", "0")
                    await wait_until(lambda: broker.blocked and broker.paused, 10, "blocked")
                    assert runner.connection is not None
                    assert not runner.connection.transport.is_reading()
                    seq = runner.core.seq
                    peak = 0
                    for _ in range(20):  # 2 s: nothing is read, nothing grows
                        peak = max(peak, broker.tracker.unconfirmed)
                        await asyncio.sleep(0.1)
                    assert peak <= 50 + 400  # the bound, plus at most one socket read
                    assert runner.core.seq - seq < 400
                    assert sim.ledger.sessions_for(0)[-1].last_seq > runner.core.seq + 400
                finally:
                    await rabbitmqctl("set_vm_memory_high_watermark", watermark)
                await wait_until(lambda: not broker.blocked, 10, "unblocked")
                await wait_until(lambda: runner.core.seq > seq + 800, 10, "reading again")
                sim.pause_dispatch()
                core = runner.core
                log = sim.ledger.sessions_for(0)[-1]
                await wait_until(
                    lambda: core.seq == log.written and core.confirmed_seq == core.seq,
                    15,
                    "every event read and confirmed",
                )
                assert not broker.paused
            sent = sim.ledger.events_sent()
        ids = [d_of(*m)["id"] for m in await asyncio.to_thread(drain, queue)]
        assert set(ids) == set(sent)
        assert sim.ledger.identify_count() == 1
    finally:
        await rabbitmqctl("set_vm_memory_high_watermark", watermark)
        delete_group(group, [queue])


async def test_refused_messages_are_published_again_until_taken_and_hold_their_shard_back() -> None:
    group = unique_group()
    queue = f"{group}:MESSAGE_CREATE"
    with channel() as ch:  # a full queue refuses (basic.nack) what is routed to it
        ch.exchange_declare(group, "direct", durable=True)
        ch.queue_declare(
            queue, durable=True, arguments={"x-max-length": 20, "x-overflow": "reject-publish"}
        )
        ch.queue_bind(queue, group, "MESSAGE_CREATE")
    nacked = sample("gateway_publish_failures_total", reason="nacked")
    received: list[str] = []
    try:
        async with simulator(rate=200) as sim:
            async with gateway(sim, group, buffer=100) as (worker, broker):
                await wait_until(lambda: broker.paused, 10, "the buffer filling up")
                assert sample("gateway_publish_failures_total", reason="nacked") > nacked
                core = worker.runners[0].core
                assert core.confirmed_seq is not None and core.confirmed_seq < core.seq - 50
                sim.pause_dispatch()
                loop = asyncio.get_running_loop()
                deadline = loop.time() + t(30)
                while core.confirmed_seq != core.seq and loop.time() < deadline:
                    batch = await asyncio.to_thread(drain, queue)
                    received += [d_of(*m)["id"] for m in batch]
                assert core.confirmed_seq == core.seq
            sent = sim.ledger.events_sent()
        received += [d_of(*m)["id"] for m in await asyncio.to_thread(drain, queue)]
        assert set(received) == set(sent)
    finally:
        delete_group(group, [queue])


#: (reason counted, body) published with routing key SEND ...
BAD_SEND = [
    ("not_msgpack", b"\xda\x00\x40{}"),
    ("not_json", b"this is not json"),
    ("not_json", msgpack_string(b"{not json")),
    ("wrong_shape", b'{"packet":{"op":3}}'),
    ("wrong_shape", b"[1,2,3]"),
    ("wrong_shape", b'{"guild_id":"abc","packet":{"op":3,"d":{}}}'),
    ("unknown_shard", b'{"shard_id":5,"packet":{"op":3,"d":{}}}'),
    (
        "too_large",
        json.dumps({"shard_id": 0, "packet": {"op": 3, "d": {"x": "y" * 5000}}}).encode(),
    ),
    ("too_large", b"x" * 70000),
    ("forbidden_op", b'{"shard_id":0,"packet":{"op":2,"d":{}}}'),
]
#: ... and with routing key "0" (the per-shard queue of shard 0).
BAD_SHARD = [("not_json", b"not json"), ("wrong_shape", b'{"op":3}')]


async def test_malformed_commands_are_logged_counted_acked_and_survived(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    group = unique_group()
    reasons = [reason for reason, _ in [*BAD_SEND, *BAD_SHARD]]
    before = {r: sample("gateway_input_dropped_total", source="amqp", reason=r) for r in reasons}

    def dropped() -> float:
        return sum(
            sample("gateway_input_dropped_total", source="amqp", reason=r) - before[r]
            for r in set(reasons)
        )

    try:
        async with simulator() as sim:
            async with gateway(sim, group) as (worker, broker):
                await wait_until(lambda: shard_ready(worker), 10, "ready")
                for _, body in BAD_SEND:
                    await asyncio.to_thread(publish, group, "SEND", body)
                for _, body in BAD_SHARD:
                    await asyncio.to_thread(publish, group, "0", body)
                good = {"shard_id": 0, "packet": {"op": 3, "d": PRESENCE}}
                await asyncio.to_thread(
                    publish, group, "SEND", msgpack_string(json.dumps(good).encode())
                )
                await wait_until(lambda: len(sim.ledger.commands) == 1, 10, "the good command")
                await wait_until(lambda: dropped() == len(reasons), 10, "every bad command")
                assert broker.connected
        assert sim.ledger.commands[0].d == PRESENCE and sim.ledger.commands[0].shard_id == 0
        assert await asyncio.to_thread(depth, f"{group}:SEND") == 0
        assert await asyncio.to_thread(depth, f"{group}:0") == 0
    finally:
        delete_group(group)
    after = {r: sample("gateway_input_dropped_total", source="amqp", reason=r) for r in reasons}
    for reason in set(reasons):
        assert after[reason] - before[reason] == reasons.count(reason), reason
    rejected = [r.getMessage() for r in caplog.records if "rejected a command" in r.getMessage()]
    assert len(rejected) == len(reasons), rejected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_commands_reach_their_shard_or_are_handed_on_to_its_queue() -> None:
    group = unique_group()
    guild_on_0 = (1234 << 22) | 7  # (guild_id >> 22) % 2 == 0
    guild_on_1 = (1235 << 22) | 7
    packet = {"op": 3, "d": PRESENCE}
    try:
        async with simulator(shard_count=2, max_concurrency=2) as sim:
            async with gateway(sim, group, (0,)) as (worker, broker):
                await wait_until(lambda: shard_ready(worker), 10, "ready")
                sends = [
                    {"guild_id": str(guild_on_0), "packet": packet},
                    {"guild_id": str(guild_on_1), "packet": packet},
                    {"shard_id": 1, "packet": packet},
                ]
                for send in sends:
                    await asyncio.to_thread(publish, group, "SEND", json.dumps(send).encode())
                await asyncio.to_thread(publish, group, "0", json.dumps(packet).encode())
                await wait_until(lambda: len(sim.ledger.commands) == 2, 10, "shard 0's commands")
                await wait_until(lambda: not broker.tracker.unconfirmed, 10, "forwards confirmed")
                # A last command for shard 0: once it is there, anything else would be too.
                last = {"op": 3, "d": dict(PRESENCE, since=1)}
                await asyncio.to_thread(publish, group, "0", json.dumps(last).encode())
                await wait_until(lambda: len(sim.ledger.commands) == 3, 10, "the last command")
        assert [c.shard_id for c in sim.ledger.commands] == [0, 0, 0]
        assert sim.ledger.commands[-1].d == last["d"]
        handed_on = await asyncio.to_thread(drain, f"{group}:1")
        assert [json.loads(body) for _, body in handed_on] == [packet, packet]
        assert await asyncio.to_thread(depth, f"{group}:SEND") == 0
    finally:
        delete_group(group)


async def test_an_unreachable_rabbitmq_is_not_connected_and_buffers_then_gives_up_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    broker = AmqpBroker(
        "amqp://guest:s3cret@127.0.0.1:1/%2F", group=unique_group(), connect_wait=0.3, buffer=3
    )
    paused: list[bool] = []
    driver = Driver(
        broker,
        pause=lambda: paused.append(True),
        resume=lambda: paused.append(False),
        commands=lambda body, ack: None,
    )
    await broker.start()
    assert not broker.connected
    for seq in (1, 2, 3):
        broker.publish(0, "MESSAGE_CREATE", seq, b"{}", "s")
    driver.flush()
    assert paused == [True] and broker.tracker.unconfirmed == 3
    await wait_until(lambda: caplog.text.count("cannot connect") >= 2, 5, "a few attempts")
    await asyncio.wait_for(broker.aclose(), 5)
    assert not broker.connected
    assert "cannot connect to RabbitMQ" in caplog.text
    assert "not confirmed by RabbitMQ" in caplog.text
    assert "s3cret" not in caplog.text
