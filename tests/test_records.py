"""Stdio records: splitting stdin into records, bounded; parsing stdin commands; the relay's
whole-record boundary."""

from __future__ import annotations

import json

import msgspec
import pytest

from spectacles_gateway.brokers.wire import CommandError, msgpack_event_map
from spectacles_gateway.records import (
    Dropped,
    RecordSplitter,
    parse_stdin_record,
    whole_records_end,
)

SEND = {"event": "SEND", "data": {"guild_id": "81384788765712384", "packet": {"op": 3, "d": {}}}}


def test_json_lines_split_whole_skip_blank_and_drop_oversized() -> None:
    splitter = RecordSplitter("json", max_record=100)
    line = json.dumps(SEND).encode()[:90]
    out = splitter.feed(b"a\n\n  \nb")
    assert out == [b"a"]
    out = splitter.feed(b"c\n" + b"x" * 150)  # an oversized line, its newline not yet here
    assert out[0] == b"bc" and isinstance(out[1], Dropped) and out[1].reason == "too_large"
    assert splitter.buffered == 0  # not kept while it grows
    out = splitter.feed(b"y" * 500 + b"\n" + line + b"\n")
    assert out == [line]  # the tail of the long line is skipped, the next one is whole


def test_msgpack_objects_split_and_a_huge_declared_size_is_dropped_at_once() -> None:
    splitter = RecordSplitter("msgpack", max_record=1 << 16)
    record = msgspec.msgpack.encode(SEND)
    assert splitter.feed(record + record[:5]) == [record]
    assert splitter.feed(record[5:]) == [record]
    (dropped,) = splitter.feed(b"\xc6\xff\xff\xff\xff")  # bin32 of 4 GiB: never buffered
    assert isinstance(dropped, Dropped) and dropped.reason == "too_large"
    assert splitter.buffered == 0
    assert splitter.feed(record) == [record]


def test_an_incomplete_msgpack_record_is_not_scanned_again_until_it_can_be_whole() -> None:
    splitter = RecordSplitter("msgpack")
    record = msgspec.msgpack.encode({"event": "SEND", "data": "x" * 60_000})
    splitter.feed(record[:100])
    assert splitter._need == len(record)
    for i in range(100, len(record) - 1, 1000):
        assert splitter.feed(record[i : min(i + 1000, len(record) - 1)]) == []
    assert splitter.feed(record[-1:]) == [record]


def test_garbage_in_a_msgpack_stream_is_dropped_not_fatal() -> None:
    splitter = RecordSplitter("msgpack")
    (dropped,) = splitter.feed(b"\xc1garbage")
    assert isinstance(dropped, Dropped) and dropped.reason == "not_msgpack"
    assert splitter.feed(msgspec.msgpack.encode(SEND)) == [msgspec.msgpack.encode(SEND)]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"{not json", "not_json"),
        (b"[" * 5000 + b"]" * 5000, "not_json"),  # nested far too deep: RecursionError inside
        (b"[1,2]", "wrong_shape"),
        (b'{"event":"READY","data":{}}', "unknown_event"),
        (b'{"event":"SEND","data":5}', "wrong_shape"),
        (
            '{"event":"SEND","data":{"guild_id":"١٢٣","packet":{"op":3,"d":{}}}}'.encode(),
            "wrong_shape",
        ),  # Arabic-Indic digits: str.isdigit() says yes, int() would have raised ValueError
        (b'{"event":"SEND","data":{"packet":{"op":2,"d":{}}}}', "forbidden_op"),
    ],
)
def test_bad_stdin_records_name_the_reason(record: bytes, reason: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_stdin_record(record, "json")
    assert info.value.reason == reason


def test_stdin_commands_in_every_shape() -> None:
    packet = {"op": 3, "d": {"status": "idle"}}
    plain = {"event": "SEND", "data": {"shard_id": 1, "packet": packet}}
    as_string = {"event": "SEND", "data": json.dumps({"guild_id": 1 << 22, "packet": packet})}
    assert parse_stdin_record(json.dumps(plain).encode(), "json").shard_id == 1
    command = parse_stdin_record(msgspec.msgpack.encode(as_string), "msgpack")
    assert command.target(4) == 1 and json.loads(command.packet) == packet


def test_the_relay_forwards_whole_records_only() -> None:
    assert whole_records_end(b'{"a":1}\n{"b"', "json") == 8
    record = msgpack_event_map("MESSAGE_CREATE", b'{"id":"1"}')
    assert whole_records_end(record + record[:3], "msgpack") == len(record)
    assert whole_records_end(b"\xc1junk", "msgpack") == 5  # our own output: never stuck
