"""Wire formats: msgpack string bodies, stdio records, command parsing and routing."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from spectacles_gateway.brokers.wire import (
    CommandError,
    json_line,
    msgpack_event_map,
    msgpack_string,
    parse_command,
    target_shard,
    unwrap_msgpack_string,
)
from spectacles_gateway.compression import DecompressError, make_decompressor
from spectacles_gateway.records import msgpack_object_end

# A real zstd-stream HELLO from Discord and its text (ISC, twilight: tests/data/discord-hello.LICENSE).
VECTORS = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\xa0"),
        (31, b"\xbf"),
        (32, b"\xda\x00\x20"),  # the seed's legacy form: no str8 (0xd9)
        (255, b"\xda\x00\xff"),
        (65535, b"\xda\xff\xff"),
        (65536, b"\xdb\x00\x01\x00\x00"),
    ],
)
def test_msgpack_string_header_is_the_legacy_form(size: int, header: bytes) -> None:
    data = b"x" * size
    body = msgpack_string(data)
    assert body == header + data
    assert msgspec.msgpack.decode(body) == data.decode()  # what consumers decode


def test_body_is_the_raw_json_of_d_unchanged() -> None:
    d = b'{"content":"h\\u00e9llo",  "n":1.50,"id":"123"}'
    assert msgspec.msgpack.decode(msgpack_string(d)) == d.decode()


def test_json_line_embeds_d_without_reserialising() -> None:
    d = b'{"a": [1, 2.50]}'
    line = json_line("MESSAGE_CREATE", 3, 17, d, 2)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "event": "MESSAGE_CREATE",
        "shard_id": 3,
        "seq": 17,
        "generation": 2,
        "data": {"a": [1, 2.5]},
    }
    assert d in line
    assert json.loads(json_line('WEIRD"NAME', 0, None, b"null"))["event"] == 'WEIRD"NAME'


def test_msgpack_event_map_is_the_seed_record() -> None:
    record = msgpack_event_map("GUILD_CREATE", b'{"id":"1"}' * 10)
    assert msgspec.msgpack.decode(record) == {"event": "GUILD_CREATE", "data": '{"id":"1"}' * 10}
    assert msgpack_object_end(record, 0) == len(record)
    assert msgpack_object_end(record[:-1], 0) is None


@pytest.mark.parametrize(
    "obj",
    [
        {"a": [1, -2, 3.5, None, True, b"bin", "s" * 40, {"k": 70000}], "b": list(range(20))},
        {"event": "SEND", "data": "x" * 70000},
        [1, 2**40, -(2**40)],
    ],
)
def test_msgpack_object_end_frames_any_object(obj: object) -> None:
    encoded = msgspec.msgpack.encode(obj)
    stream = encoded + encoded
    end = msgpack_object_end(stream, 0)
    assert end == len(encoded)
    assert msgpack_object_end(stream, end) == len(stream)
    for cut in (1, len(encoded) // 2, len(encoded) - 1):
        assert msgpack_object_end(encoded[:cut], 0) is None


def test_msgpack_object_end_rejects_never_used_byte() -> None:
    with pytest.raises(ValueError, match="0xc1"):
        msgpack_object_end(b"\xc1", 0)


PACKET = {"op": 3, "d": {"status": "online", "afk": False, "since": None, "activities": []}}


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"guild_id": "81384788765712384", "packet": PACKET}).encode(),
        msgpack_string(json.dumps({"guild_id": "81384788765712384", "packet": PACKET}).encode()),
        msgspec.msgpack.encode(
            json.dumps({"guild_id": "81384788765712384", "packet": PACKET}).encode()
        ),
        msgspec.msgpack.encode(json.dumps({"guild_id": 81384788765712384, "packet": PACKET})),
    ],
    ids=["json", "msgpack-str-legacy", "msgpack-bin", "msgpack-str8-int-guild"],
)
def test_command_body_shapes(body: bytes) -> None:
    command = parse_command(body)
    assert command.guild_id == 81384788765712384
    assert command.shard_id is None
    assert json.loads(command.packet) == PACKET


def test_command_shard_id_and_broadcast() -> None:
    assert parse_command(json.dumps({"shard_id": 2, "packet": PACKET})).shard_id == 2
    command = parse_command(json.dumps({"packet": PACKET}))
    assert (command.guild_id, command.shard_id) == (None, None)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json at all", "not_json"),
        (b"\xa5abc", "not_msgpack"),  # says 5 bytes, has 3
        (b"[1,2]", "wrong_shape"),
        (b'{"guild_id":"1"}', "wrong_shape"),
        (b'{"packet":{"d":1}}', "wrong_shape"),
        (b'{"packet":{"op":"3","d":1}}', "wrong_shape"),
        (b'{"packet":{"op":3}}', "wrong_shape"),
        (b'{"packet":[3]}', "wrong_shape"),
        (b'{"guild_id":"abc","packet":{"op":3,"d":1}}', "wrong_shape"),
        (b'{"guild_id":true,"packet":{"op":3,"d":1}}', "wrong_shape"),
        (b'{"shard_id":-1,"packet":{"op":3,"d":1}}', "wrong_shape"),
        (b'{"packet":{"op":2,"d":{}}}', "forbidden_op"),
        (b'{"packet":{"op":6,"d":{}}}', "forbidden_op"),
        (b'{"packet":{"op":10,"d":{}}}', "unknown_op"),  # HELLO: Discord would close 4001
        (b'{"packet":{"op":5,"d":null}}', "unknown_op"),
        (b'{"packet":{"op":-1,"d":null}}', "unknown_op"),
        (b"\xff\xfe", "not_json"),
    ],
)
def test_malformed_commands_name_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(body)
    assert info.value.reason == reason


def test_unwrap_leaves_plain_json_alone() -> None:
    assert unwrap_msgpack_string(b'{"a":1}') == b'{"a":1}'
    assert unwrap_msgpack_string(b"") == b""


@pytest.mark.parametrize(
    ("guild_id", "count", "shard"),
    [
        (81384788765712384, 1, 0),
        (81384788765712384, 2, 0),
        (81384788765712384, 16, 2),
        (41771983423143937, 4, 2),
        (1 << 22, 4, 1),
        ((7 << 22) + 12345, 4, 3),
    ],
)
def test_routing_rule(guild_id: int, count: int, shard: int) -> None:
    assert target_shard(guild_id, count) == shard == (guild_id >> 22) % count


def test_real_discord_hello_decodes_with_a_stream_decompressor() -> None:
    compressed = (VECTORS / "discord-hello.zstd").read_bytes()
    expected = (VECTORS / "discord-hello.json").read_bytes().rstrip(b"\n")
    assert compressed[:4] == b"\x28\xb5\x2f\xfd"
    assert make_decompressor("zstd-stream").feed(compressed) == expected


def test_real_discord_hello_in_pieces_and_corrupt() -> None:
    compressed = (VECTORS / "discord-hello.zstd").read_bytes()
    expected = (VECTORS / "discord-hello.json").read_bytes().rstrip(b"\n")
    dec = make_decompressor("zstd-stream")
    out = b"".join(dec.feed(compressed[i : i + 10]) or b"" for i in range(0, len(compressed), 10))
    assert out == expected
    with pytest.raises(DecompressError):
        make_decompressor("zstd-stream").feed(b"\x28\xb5\x2f\xfd\xff\xff\xff\xff" * 4)


def test_zlib_stream_buffers_until_the_sync_flush_suffix() -> None:
    import zlib

    comp = zlib.compressobj()
    first = comp.compress(b'{"op":10,"d":{"heartbeat_interval":1}}') + comp.flush(zlib.Z_SYNC_FLUSH)
    second = comp.compress(b'{"op":11}') + comp.flush(zlib.Z_SYNC_FLUSH)
    dec = make_decompressor("zlib-stream")
    assert dec.feed(first[:5]) is None
    assert dec.feed(first[5:]) == b'{"op":10,"d":{"heartbeat_interval":1}}'
    assert dec.feed(second) == b'{"op":11}'
    with pytest.raises(DecompressError):
        make_decompressor("zlib-stream").feed(b"garbage\x00\x00\xff\xff")
