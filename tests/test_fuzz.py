"""Property-based fuzzing of every parser and of the shard core (issue 10).

Each property runs ``HYPOTHESIS_MAX_EXAMPLES`` examples (200 in CI by default);
``scripts/fuzz.py`` runs the same properties for as long as it is given.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectacles_gateway.brokers.wire import CommandError, parse_command, parse_packet
from spectacles_gateway.control import FrameError, FrameReader, encode
from spectacles_gateway.protocol.events import CloseRequest, SendData
from spectacles_gateway.protocol.shard import CommandRejected
from spectacles_gateway.records import MAX_RECORD, Dropped, RecordSplitter, parse_stdin_record

from .support.shard import connected_ready, make

EXAMPLES = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
# Inputs that look almost right are where parsers break: mix real shapes with garbage.
command_objects = st.fixed_dictionaries(
    {},
    optional={
        "guild_id": st.one_of(
            json_values, st.text(alphabet="0123456789\u0661\u0662\u0663\u0664", min_size=1)
        ),
        "shard_id": json_values,
        "packet": st.one_of(
            json_values,
            st.fixed_dictionaries({"op": json_values, "d": json_values}),
            st.fixed_dictionaries({"op": st.integers(-5, 50), "d": json_values}),
        ),
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    command_objects.map(lambda o: json.dumps(o).encode()),
    command_objects.map(lambda o: msgspec.msgpack.encode(json.dumps(o))),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)


@FUZZ
@given(bodies)
def test_parse_command_raises_only_command_errors(body: bytes) -> None:
    try:
        command = parse_command(body)
    except CommandError as exc:
        assert exc.reason
        return
    assert json.loads(command.packet)["op"] not in (1, 2, 6)
    assert command.shard_id is None or command.shard_id >= 0


@FUZZ
@given(json_values)
def test_parse_packet_raises_only_command_errors(packet: Any) -> None:
    with contextlib.suppress(CommandError):
        parse_packet(packet)


stdin_records = st.one_of(
    st.binary(max_size=200),
    st.fixed_dictionaries({"event": json_values, "data": json_values}).map(
        lambda o: json.dumps(o).encode()
    ),
    st.fixed_dictionaries({"event": st.just("SEND"), "data": command_objects}).map(
        lambda o: json.dumps(o).encode()
    ),
)


@FUZZ
@given(stdin_records, st.sampled_from(["json", "msgpack"]))
def test_stdin_records_raise_only_command_errors(record: bytes, fmt: str) -> None:
    if fmt == "msgpack":
        with contextlib.suppress(ValueError, OverflowError):  # garbage stays as it is
            record = msgspec.msgpack.encode(json.loads(record))
    with contextlib.suppress(CommandError):
        parse_stdin_record(record, fmt)


@FUZZ
@given(st.lists(st.binary(max_size=400), max_size=20), st.sampled_from(["json", "msgpack"]))
def test_the_splitter_never_raises_and_stays_bounded(chunks: list[bytes], fmt: str) -> None:
    splitter = RecordSplitter(fmt, max_record=256)
    for chunk in chunks:
        for record in splitter.feed(chunk):
            assert isinstance(record, Dropped) or len(record) <= 256
        assert splitter.buffered <= 256 + len(chunk)
    assert MAX_RECORD > 256


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_control_frames_never_raise(chunks: list[bytes]) -> None:
    reader = FrameReader(max_frame=1 << 16)
    from spectacles_gateway.control import Grant

    good = encode(Grant(7))
    for chunk in chunks:
        for message in reader.feed(chunk + good):
            assert isinstance(message, FrameError | Grant) or message is not None


gateway_messages = st.one_of(
    st.binary(max_size=200),
    st.fixed_dictionaries(
        {"op": st.integers(-2, 50), "d": json_values},
        optional={"s": st.one_of(st.none(), st.integers(-5, 1 << 40)), "t": json_values},
    ).map(lambda o: json.dumps(o).encode()),
    st.fixed_dictionaries(
        {"op": st.just(10), "d": st.fixed_dictionaries({"heartbeat_interval": json_values})}
    ).map(lambda o: json.dumps(o).encode()),
    st.integers(1, 5000).map(lambda n: b'{"op":0,"s":2,"t":"X","d":' + b"[" * n + b"]" * n + b"}"),
)


@FUZZ
@given(st.lists(gateway_messages, max_size=25), st.booleans())
def test_the_shard_core_survives_any_frames(messages: list[bytes], ready_first: bool) -> None:
    core = make(rand=0.5)
    if ready_first:
        connected_ready(core)
    else:
        core.connection_opened(0.0, identify_permitted=True)
    now = 0.0
    for message in messages:
        now += 0.5
        core.receive(message, now)
        core.tick(now)
        try:
            core.queue_command(message, now)
        except CommandRejected as exc:
            assert exc.reason
        for event in core.events_received():
            if isinstance(event, CloseRequest):
                assert event.code not in (1000, 1001)  # never ends the session by mistake
            if isinstance(event, SendData):
                assert len(event.payload) <= 4096
    core.connection_closed(now, None)
    assert core.plan_connect(now) is not None
