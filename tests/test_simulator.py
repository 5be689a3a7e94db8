"""The gateway simulator against a raw client, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import zstandard

from spectacles_gateway.simulator import (
    RESUME_PATH,
    Close,
    CorruptCompressed,
    Drop,
    HeartbeatRequest,
    InvalidSession,
    MalformedJson,
    Op7BeforeHello,
    Reconnect,
    Simulator,
    SimulatorConfig,
    UnknownDispatch,
    UnknownOpcode,
    WithholdAcks,
    new_zstd_compressor,
)
from tests.simclient import ZLIB_SUFFIX, SimClient, http_get

# A real zstd-stream HELLO captured from Discord (the first websocket message of a connection)
# and its text, kept in the repository (ISC, twilight: tests/data/discord-hello.LICENSE).
VECTORS = Path(__file__).resolve().parent / "data"
DISCORD_HELLO_JSON = (VECTORS / "discord-hello.json").read_bytes().rstrip(b"\n")
DISCORD_HELLO_ZSTD = (VECTORS / "discord-hello.zstd").read_bytes()
TOKEN = "simulated-token"

MakeSim = Callable[..., Awaitable[Simulator]]
Connect = Callable[..., Awaitable[SimClient]]


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    sims: list[Simulator] = []

    async def factory(**kwargs: Any) -> Simulator:
        sim = Simulator(SimulatorConfig(**kwargs))
        await sim.start()
        sims.append(sim)
        return sim

    yield factory
    for sim in sims:
        await sim.stop()


@pytest.fixture
async def connect(make_sim: MakeSim) -> AsyncIterator[Connect]:
    clients: list[SimClient] = []

    async def factory(url: str, **kwargs: Any) -> SimClient:
        client = await SimClient.connect(url, **kwargs)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.abort()
        await asyncio.wait_for(client.ws.wait_closed(), 2)


async def ready(
    connect: Connect, url: str, shard: tuple[int, int] = (0, 1), **kwargs: Any
) -> tuple[SimClient, dict[str, Any]]:
    client = await connect(url, **kwargs)
    await client.hello()
    await client.identify(shard=shard)
    payload = await client.recv()
    assert payload["t"] == "READY", payload
    return client, payload


async def ready_and_guilds(
    connect: Connect, sim: Simulator, shard: tuple[int, int] = (0, 1), **kwargs: Any
) -> tuple[SimClient, str]:
    client, payload = await ready(connect, sim.gateway_url, shard, **kwargs)
    for _ in range(sim.config.guilds_per_shard):
        assert (await client.recv())["t"] == "GUILD_CREATE"
    return client, payload["d"]["session_id"]


async def closed(sim: Simulator, index: int = 0) -> None:
    """Wait until the server side has finished with connection ``index``."""
    await sim.wait_for(lambda ledger: ledger.connections[index].closed_at is not None, 3)


def routed(guild_id: str, shard_id: int, num_shards: int) -> bool:
    return (int(guild_id) >> 22) % num_shards == shard_id


# --- HTTP -------------------------------------------------------------------------------------


async def test_gateway_bot_http(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(shard_count=3, max_concurrency=2, session_start_remaining=10)
    auth = {"Authorization": f"Bot {TOKEN}"}
    status, body = await http_get(f"{sim.http_base}/gateway/bot", auth)
    assert status == 200
    assert body["url"] == sim.gateway_url
    assert urlsplit(body["url"]).query == ""
    assert body["shards"] == 3
    limit = body["session_start_limit"]
    assert limit["total"] == 1000
    assert limit["remaining"] == 10
    assert limit["max_concurrency"] == 2
    assert 0 < limit["reset_after"] <= 14_400_000

    for headers in ({}, {"Authorization": "Bot wrong"}, {"Authorization": TOKEN}):
        status, body = await http_get(f"{sim.http_base}/gateway/bot", headers)
        assert (status, body) == (401, {"message": "401: Unauthorized", "code": 0})

    base = sim.http_base.removesuffix("/api/v10")
    assert (await http_get(f"{base}/api/v9/gateway/bot", auth))[0] == 200
    assert await http_get(f"{base}/api/v10/gateway") == (200, {"url": sim.gateway_url})
    assert (await http_get(f"{base}/nope"))[0] == 404

    await ready(connect, sim.gateway_url, (0, 3))
    _, body = await http_get(f"{sim.http_base}/gateway/bot", auth)
    assert body["session_start_limit"]["remaining"] == 9
    assert [r.status for r in sim.ledger.http] == [200, 401, 401, 401, 200, 200, 404, 200]


# --- zstd framing -----------------------------------------------------------------------------


def test_zstd_compressor_matches_the_real_discord_vector() -> None:
    text = DISCORD_HELLO_JSON
    real = DISCORD_HELLO_ZSTD
    compressor = new_zstd_compressor()
    ours = compressor.compress(text) + compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    # magic, frame header descriptor (no content size, no checksum), window descriptor 256 KiB
    assert real[:6] == bytes.fromhex("28b52ffd0040")
    assert ours[:6] == real[:6]
    assert ours == real  # same parameters: byte-identical to what Discord sent
    assert zstandard.ZstdDecompressor().decompressobj().decompress(real) == text
    assert zstandard.ZstdDecompressor().decompressobj().decompress(ours) == text


async def test_hello_framing_is_discords(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    real = DISCORD_HELLO_ZSTD
    client = await connect(sim.gateway_url)
    hello = await client.hello()
    first = client.frames[0]
    assert isinstance(first, bytes)
    assert first[:6] == real[:6]
    assert list(hello) == ["t", "s", "op", "d"]
    assert hello["t"] is None and hello["s"] is None
    assert hello["d"]["heartbeat_interval"] == 41250
    assert isinstance(hello["d"]["_trace"], list)

    await client.heartbeat(None)
    ack = await client.recv()
    assert ack == {"t": None, "s": None, "op": 11, "d": None}
    second = client.frames[1]
    assert isinstance(second, bytes)
    assert not second.startswith(b"\x28\xb5\x2f\xfd")  # same frame, never ended
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompressobj().decompress(second)
    with pytest.raises(zstandard.ZstdError):  # one-shot decompression can't size the frame
        zstandard.ZstdDecompressor().decompress(first)


# --- identify ---------------------------------------------------------------------------------


async def test_identify_ready_guilds_and_dispatches(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(shard_count=2, rate=400, guilds_per_shard=3)
    client = await connect(sim.gateway_url)
    await client.hello()
    await client.identify(shard=(1, 2), intents=513)
    payload = await client.recv()
    assert payload["op"] == 0 and payload["t"] == "READY" and payload["s"] == 1
    d = payload["d"]
    assert d["v"] == 10
    assert d["user"]["bot"] is True and d["user"]["id"].isdigit()
    assert d["shard"] == [1, 2]
    assert d["application"]["id"].isdigit() and "flags" in d["application"]
    assert "_trace" in d
    assert len(d["session_id"]) == 32
    resume = urlsplit(d["resume_gateway_url"])
    assert d["resume_gateway_url"] == sim.resume_url
    assert resume.path == RESUME_PATH != urlsplit(sim.gateway_url).path
    assert resume.query == "" and not d["resume_gateway_url"].endswith("/")
    assert [g["unavailable"] for g in d["guilds"]] == [True, True, True]
    assert all(routed(g["id"], 1, 2) for g in d["guilds"])

    creates = [await client.recv() for _ in range(3)]
    assert [c["t"] for c in creates] == ["GUILD_CREATE"] * 3
    assert [c["s"] for c in creates] == [2, 3, 4]
    assert {c["d"]["id"] for c in creates} == {g["id"] for g in d["guilds"]}

    messages = await client.recv_dispatches(40)
    assert [m["s"] for m in messages] == list(range(5, 45))
    assert {m["t"] for m in messages} == {"MESSAGE_CREATE"}
    assert all(routed(m["d"]["guild_id"], 1, 2) for m in messages)
    ids = [m["d"]["id"] for m in messages]
    assert len(set(ids)) == 40
    assert all(800 <= len(json.dumps(m["d"])) <= 1300 for m in messages)
    assert set(ids) <= set(sim.ledger.events_sent(1))

    (record,) = sim.ledger.identifies
    assert (record.shard_id, record.num_shards, record.intents) == (1, 2, 513)
    assert record.token_ok and record.outcome == "ready"
    assert record.properties == {"os": "linux", "browser": "simclient", "device": "simclient"}
    assert record.large_threshold == 250
    assert sim.ledger.identify_count(1) == 1 and sim.ledger.identify_count(0) == 0
    log = sim.ledger.sent_dispatches[d["session_id"]]
    assert log[0] == (1, "READY", None)
    assert log[1][:2] == (2, "GUILD_CREATE")
    assert sim.ledger.violations == []


@pytest.mark.parametrize(
    ("config", "identify", "code"),
    [
        ({}, {"token": "wrong"}, 4004),
        ({"shard_count": 2}, {"shard": (2, 2)}, 4010),
        ({"shard_count": 2}, {"shard": (0, 3)}, 4010),
        ({"shard_count": 2}, {"shard": (-1, 2)}, 4010),
        ({"required_shards": 2}, {"shard": (0, 1)}, 4011),
        ({}, {"intents": 1 << 17}, 4013),
        ({}, {"intents": None}, 4013),
        ({"allowed_privileged": 0}, {"intents": 513 | 32768}, 4014),
    ],
    ids=[
        "bad-token",
        "shard-id-out-of-range",
        "shard-count-mismatch",
        "negative-shard",
        "sharding-required",
        "undocumented-intent",
        "missing-intents",
        "privileged-intent",
    ],
)
async def test_identify_rejected(
    make_sim: MakeSim,
    connect: Connect,
    config: dict[str, Any],
    identify: dict[str, Any],
    code: int,
) -> None:
    sim = await make_sim(**config)
    client = await connect(sim.gateway_url)
    await client.hello()
    shard = identify.pop("shard", (0, sim.config.shard_count))
    await client.identify(shard=shard, **identify)
    assert await client.expect_close() == code
    assert any(v.startswith(str(code)) for v in sim.ledger.violations), sim.ledger.violations
    assert sim.ledger.identifies[0].outcome == f"close {code}"
    await closed(sim)
    assert sim.ledger.connections[0].server_close_code == code
    assert sim.ledger.connections[0].closed_by == "server"
    assert sim.ledger.sent_dispatches == {}


async def test_second_identify_is_4005(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, _ = await ready_and_guilds(connect, sim)
    await client.identify()
    assert await client.expect_close() == 4005
    assert any(v.startswith("4005") for v in sim.ledger.violations)


async def test_payload_before_identify_is_4003(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client = await connect(sim.gateway_url)
    await client.hello()
    await client.heartbeat(None)  # allowed before identify
    assert (await client.recv())["op"] == 11
    await client.send({"op": 3, "d": {"since": None, "activities": [], "status": "online"}})
    assert await client.expect_close() == 4003
    assert any(v.startswith("4003 op 3 before identify") for v in sim.ledger.violations)


@pytest.mark.parametrize(
    ("payload", "code", "violation"),
    [
        ({"op": 1, "d": None, "pad": "x" * 4100}, 4002, "4002 payload of"),
        ("{not json", 4002, "4002 undecodable text"),
        (b"\x00\xff\xfe binary garbage", 4002, "4002 undecodable binary"),
        ('["op", 1]', 4002, "4002 payload without an integer op"),
        ({"op": 5, "d": None}, 4001, "4001 unknown opcode 5"),
        ({"op": 11, "d": None}, 4001, "4001 unknown opcode 11"),
    ],
    ids=["over-4096-bytes", "invalid-json", "binary-garbage", "no-op", "op-5", "op-11"],
)
async def test_bad_payloads(
    make_sim: MakeSim, connect: Connect, payload: Any, code: int, violation: str
) -> None:
    sim = await make_sim()
    client = await connect(sim.gateway_url)
    await client.hello()
    await client.send(payload)
    assert await client.expect_close() == code
    assert any(v.startswith(violation) for v in sim.ledger.violations), sim.ledger.violations


async def test_binary_json_is_accepted(make_sim: MakeSim, connect: Connect) -> None:
    # hikari sends its JSON in binary frames, and Discord accepts that.
    sim = await make_sim()
    client = await connect(sim.gateway_url)
    await client.hello()
    identify = {
        "op": 2,
        "d": {
            "token": TOKEN,
            "intents": 0,
            "shard": [0, 1],
            "properties": {"os": "linux", "browser": "b", "device": "d"},
        },
    }
    await client.send(json.dumps(identify).encode())
    assert (await client.recv())["t"] == "READY"


@pytest.mark.parametrize("version", [None, "", "5", "ten"])
async def test_invalid_api_version_is_4012(
    make_sim: MakeSim, connect: Connect, version: str | None
) -> None:
    sim = await make_sim()
    client = await connect(sim.gateway_url, v=version)
    assert await client.expect_close() == 4012
    assert client.frames == []  # no HELLO


async def test_send_limit_is_4008(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(send_limit=(5, 2.0))
    client, _ = await ready_and_guilds(connect, sim)  # identify = payload 1
    for _ in range(4):  # payloads 2..5: within the limit
        await client.heartbeat(client.last_seq)
        assert (await client.recv())["op"] == 11
    await client.heartbeat(client.last_seq)  # payload 6 within 2 s
    assert await client.expect_close() == 4008
    assert any(v.startswith("4008 rate limit shard 0") for v in sim.ledger.violations)
    assert sim.is_resumable(sim.session_ids(0)[0])  # 4008 keeps the session


async def test_send_limit_window_slides(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(send_limit=(3, 0.3))
    client, _ = await ready_and_guilds(connect, sim)
    for _ in range(6):  # at most 2 payloads in any 0.3 s window
        await asyncio.sleep(0.16)
        await client.heartbeat(client.last_seq)
        assert (await client.recv())["op"] == 11
    assert sim.ledger.violations == []


async def test_identify_concurrency_buckets(make_sim: MakeSim, connect: Connect) -> None:
    window = 1.0
    sim = await make_sim(shard_count=4, max_concurrency=2, identify_window=window)
    await ready(connect, sim.gateway_url, (0, 4))
    client = await connect(sim.gateway_url)
    await client.hello()
    await client.identify(shard=(2, 4))  # bucket 0 again, too soon
    assert await client.recv() == {"t": None, "s": None, "op": 9, "d": False}
    await ready(connect, sim.gateway_url, (1, 4))  # the other bucket is free
    assert [r.outcome for r in sim.ledger.identifies] == ["ready", "invalid_session", "ready"]
    (violation,) = sim.ledger.violations
    assert violation.startswith("identify concurrency bucket 0: 2 identifies 0.")
    first = sim.ledger.identifies[0].time
    await asyncio.sleep(max(0.0, first + window + 0.05 - time.monotonic()))
    await client.identify(shard=(2, 4))  # same socket, after the window
    assert (await client.recv())["t"] == "READY"
    assert sim.ledger.identifies[-1].outcome == "ready"


async def test_session_start_limit(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(session_start_remaining=1, identify_window=0.0)
    await ready(connect, sim.gateway_url)
    client = await connect(sim.gateway_url)
    await client.hello()
    await client.identify()
    assert (await client.recv())["op"] == 9
    assert sim.session_start_remaining == 0
    assert any("session start limit exhausted" in v for v in sim.ledger.violations)


async def test_identify_field_checks(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client = await connect(sim.gateway_url)
    await client.hello()
    await client.identify(token=f"Bot {TOKEN}", properties={"$os": "linux"}, large_threshold=500)
    assert (await client.recv())["t"] == "READY"
    assert len(sim.ledger.violations) == 3
    assert any("'Bot ' prefix" in v for v in sim.ledger.violations)


# --- heartbeats -------------------------------------------------------------------------------


async def test_heartbeat_ack_and_ledger(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, _ = await ready_and_guilds(connect, sim)
    await client.heartbeat(client.last_seq)
    assert await client.recv() == {"t": None, "s": None, "op": 11, "d": None}
    assert [(h.shard_id, h.d) for h in sim.ledger.heartbeats] == [(0, 3)]
    await client.heartbeat(99)  # a seq never sent
    await client.recv()
    assert any("heartbeat d=99 ahead" in v for v in sim.ledger.violations)


async def test_missing_heartbeats_close_with_4009(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(heartbeat_interval_ms=200)
    client, session_id = await ready_and_guilds(connect, sim)
    assert await client.expect_close(2.0) == 4009
    assert any(v.startswith("4009 heartbeat timeout shard 0") for v in sim.ledger.violations)
    assert not sim.is_resumable(session_id)


async def test_heartbeats_keep_the_connection(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(heartbeat_interval_ms=400)  # closes after 0.6 s without one
    client, _ = await ready_and_guilds(connect, sim)
    for _ in range(4):
        await client.heartbeat(client.last_seq)
        assert (await client.recv())["op"] == 11
        await asyncio.sleep(0.25)
    assert sim.ledger.violations == []


# --- resume -----------------------------------------------------------------------------------


async def test_resume_replays_exactly_the_missed_events(
    make_sim: MakeSim, connect: Connect
) -> None:
    sim = await make_sim()
    client, session_id = await ready_and_guilds(connect, sim)  # READY s=1, GUILD_CREATE s=2, 3
    sent = [sim.dispatch(0, "MESSAGE_CREATE", {"id": str(1000 + i), "n": i}) for i in range(5)]
    assert sent == [4, 5, 6, 7, 8]
    got = await client.recv_dispatches(3)  # the client processed up to s=6 ...
    assert [p["s"] for p in got] == [4, 5, 6]
    client.abort()  # ... then lost its connection
    await closed(sim)
    queued = [sim.dispatch(0, "TYPING_START", {"id": str(2000 + i)}) for i in range(4)]
    assert queued == [9, 10, 11, 12]
    assert sim.ledger.sent_dispatches[session_id].written == 8

    resumed = await connect(sim.resume_url)
    await resumed.hello()
    await resumed.resume(session_id, 6)
    replay = await resumed.recv_until(lambda p: p.get("t") == "RESUMED")
    assert [(p["s"], p["t"]) for p in replay] == [
        (7, "MESSAGE_CREATE"),
        (8, "MESSAGE_CREATE"),
        (9, "TYPING_START"),
        (10, "TYPING_START"),
        (11, "TYPING_START"),
        (12, "TYPING_START"),
        (13, "RESUMED"),
    ]
    assert [p["d"]["id"] for p in replay[:-1]] == ["1003", "1004", "2000", "2001", "2002", "2003"]
    assert sim.dispatch(0, "MESSAGE_CREATE", {"id": "3000"}) == 14
    assert (await resumed.recv())["s"] == 14

    (record,) = sim.ledger.resumes
    assert record.success and record.shard_id == 0 and record.seq == 6 and record.replayed == 6
    assert sim.ledger.identify_count() == 1 and sim.ledger.resume_count(0, success=True) == 1
    first, second = sim.ledger.connections
    assert first.closed_by == "client-drop"
    assert (first.path, second.path) == ("/", RESUME_PATH)
    assert second.query == first.query
    assert sorted(sim.ledger.events_sent(0)) == sorted(
        [str(1000 + i) for i in range(5)] + [str(2000 + i) for i in range(4)] + ["3000"]
    )


async def test_resume_unknown_session_is_op9(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client = await connect(sim.resume_url)
    await client.hello()
    await client.resume("0123456789abcdef", 5)
    assert await client.recv() == {"t": None, "s": None, "op": 9, "d": False}
    assert sim.ledger.resume_count(success=False) == 1
    assert sim.ledger.resumes[0].outcome == "invalid_session"


async def test_resume_seq_ahead_is_4007(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, session_id = await ready_and_guilds(connect, sim)
    await client.close(4000)
    resumed = await connect(sim.resume_url)
    await resumed.hello()
    await resumed.resume(session_id, 50)
    assert await resumed.expect_close() == 4007
    assert not sim.is_resumable(session_id)


async def test_resume_window_expires(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(resume_window=0.2)
    client, session_id = await ready_and_guilds(connect, sim)
    client.abort()
    await closed(sim)
    await asyncio.sleep(0.3)
    resumed = await connect(sim.resume_url)
    await resumed.hello()
    await resumed.resume(session_id, 3)
    assert (await resumed.recv())["op"] == 9


@pytest.mark.parametrize(("code", "resumable"), [(1000, False), (1001, False), (4000, True)])
async def test_client_close_code_decides_the_session(
    make_sim: MakeSim, connect: Connect, code: int, resumable: bool
) -> None:
    sim = await make_sim()
    client, session_id = await ready_and_guilds(connect, sim)
    await client.close(code)
    await closed(sim)
    assert sim.ledger.connections[0].closed_by == "client"
    assert sim.ledger.connections[0].client_close_code == code
    resumed = await connect(sim.resume_url)
    await resumed.hello()
    await resumed.resume(session_id, 3)
    payload = await resumed.recv()
    if resumable:
        assert (payload["t"], payload["s"]) == ("RESUMED", 4)
    else:
        assert payload == {"t": None, "s": None, "op": 9, "d": False}


async def test_resume_takes_over_a_zombie_connection(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    old, session_id = await ready_and_guilds(connect, sim)
    new = await connect(sim.resume_url)
    await new.hello()
    await new.resume(session_id, 3)
    assert (await new.recv())["t"] == "RESUMED"
    assert await old.expect_close() == 4000  # the older connection is closed (resumable)
    sim.dispatch(0, "MESSAGE_CREATE", {"id": "1"})
    assert (await new.recv())["s"] == 5


# --- faults -----------------------------------------------------------------------------------


async def test_fault_reconnect(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(reconnect_close_after=0.2)
    client, session_id = await ready_and_guilds(connect, sim)
    sim.inject(0, Reconnect())
    assert await client.recv() == {"t": None, "s": None, "op": 7, "d": None}
    assert await client.expect_close() == 4000  # the client didn't leave: the server closes
    assert sim.is_resumable(session_id)
    assert sim.ledger.faults[0].conn_ids == [1]


@pytest.mark.parametrize("resumable", [True, False])
async def test_fault_invalid_session(make_sim: MakeSim, connect: Connect, resumable: bool) -> None:
    sim = await make_sim()
    client, session_id = await ready_and_guilds(connect, sim)
    sim.inject(0, InvalidSession(resumable))
    assert await client.recv() == {"t": None, "s": None, "op": 9, "d": resumable}
    await client.close(4000)
    assert sim.is_resumable(session_id) is resumable


async def test_fault_withhold_acks(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, _ = await ready_and_guilds(connect, sim)
    sim.inject(0, WithholdAcks(True))
    await client.heartbeat(3)
    with pytest.raises(TimeoutError):
        await client.recv(timeout=0.3)
    sim.inject(0, WithholdAcks(False))
    await client.heartbeat(3)
    assert (await client.recv())["op"] == 11
    assert len(sim.ledger.heartbeats) == 2


async def test_fault_heartbeat_request(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, _ = await ready_and_guilds(connect, sim)
    sim.inject(0, HeartbeatRequest())
    assert await client.recv() == {"t": None, "s": None, "op": 1, "d": None}


@pytest.mark.parametrize(
    ("code", "resumable"), [(4000, True), (4008, True), (4003, False), (4007, False), (4009, False)]
)
async def test_fault_close(make_sim: MakeSim, connect: Connect, code: int, resumable: bool) -> None:
    sim = await make_sim()
    client, session_id = await ready_and_guilds(connect, sim)
    sim.inject(0, Close(code))
    assert await client.expect_close() == code
    assert sim.is_resumable(session_id) is resumable
    await closed(sim)
    assert sim.ledger.connections[0].server_close_code == code


async def test_fault_drop(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, session_id = await ready_and_guilds(connect, sim)
    sim.inject(0, Drop())
    assert await client.expect_close() is None  # no close frame
    await closed(sim)
    assert sim.ledger.connections[0].closed_by == "server-drop"
    assert sim.is_resumable(session_id)


@pytest.mark.parametrize(
    ("compress", "error"), [("zstd-stream", zstandard.ZstdError), ("zlib-stream", zlib.error)]
)
async def test_fault_corrupt_compressed(
    make_sim: MakeSim, connect: Connect, compress: str, error: type[Exception]
) -> None:
    sim = await make_sim()
    client, _ = await ready_and_guilds(connect, sim, compress=compress)
    sim.inject(0, CorruptCompressed())
    with pytest.raises(error):
        await client.recv()


async def test_fault_malformed_json(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, _ = await ready_and_guilds(connect, sim)
    sim.inject(0, MalformedJson())
    data = client.decode(await client.recv_message())
    assert data is not None
    with pytest.raises(json.JSONDecodeError):
        json.loads(data)


async def test_fault_op7_before_hello(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(reconnect_close_after=0.2)
    sim.inject(0, Op7BeforeHello())
    client = await connect(sim.gateway_url)
    assert (await client.recv())["op"] == 7
    assert await client.expect_close() == 4000
    second = await connect(sim.gateway_url)
    assert (await second.recv())["op"] == 10


async def test_fault_unknown_opcode_and_dispatch(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, _ = await ready_and_guilds(connect, sim)
    sim.inject(0, UnknownOpcode())
    assert (await client.recv())["op"] == 99
    sim.inject(0, UnknownDispatch())
    future = await client.recv()
    assert (future["op"], future["t"], future["s"]) == (0, "FUTURE_EVENT", 4)
    assert "future_field" in future["d"]
    assert sim.ledger.events_sent(0) == [future["d"]["id"]]


async def test_inject_without_connection_is_recorded(make_sim: MakeSim) -> None:
    sim = await make_sim()
    sim.inject(0, Reconnect())
    assert sim.ledger.faults[0].conn_ids == []
    with pytest.raises(LookupError):
        sim.dispatch(0, "MESSAGE_CREATE", {"id": "1"})


# --- big and split messages -------------------------------------------------------------------


async def test_big_guild_create_over_1_mib(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(big_guild_create_bytes=1_200_000)
    client, _ = await ready(connect, sim.gateway_url)
    big = await client.recv()
    assert big["t"] == "GUILD_CREATE"
    assert len(json.dumps(big["d"])) >= 1_200_000
    assert big["d"]["large"] is True and len(big["d"]["members"]) == big["d"]["member_count"]
    assert client.messages_per_payload[-1] == 1  # one websocket message
    assert len(client.frames[-1]) > 1024
    small = await client.recv()
    assert small["t"] == "GUILD_CREATE" and small["d"]["members"] == []


async def test_zlib_stream_and_split_message(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(zlib_split_over=16_384)
    client, _ = await ready_and_guilds(connect, sim, compress="zlib-stream")
    assert client.frames[0][:1] == b"\x78"  # zlib header once per connection
    assert all(isinstance(f, bytes) and f.endswith(ZLIB_SUFFIX) for f in client.frames)
    blob = os.urandom(60_000).hex()  # incompressible: > 16 KiB compressed
    sim.dispatch(0, "MESSAGE_CREATE", {"id": "1", "content": blob})
    payload = await client.recv()
    assert payload["d"]["content"] == blob
    assert client.messages_per_payload[-1] == 2
    assert not client.frames[-2].endswith(ZLIB_SUFFIX)
    assert client.frames[-1].endswith(ZLIB_SUFFIX)
    sim.dispatch(0, "MESSAGE_CREATE", {"id": "2"})
    assert (await client.recv())["d"]["id"] == "2"
    assert client.messages_per_payload[-1] == 1


async def test_websocket_fragmentation(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(ws_fragment_over=100, big_guild_create_bytes=300_000)
    client, _ = await ready_and_guilds(connect, sim)
    sim.dispatch(0, "MESSAGE_CREATE", {"id": "1", "content": os.urandom(2000).hex()})
    assert (await client.recv())["d"]["id"] == "1"


async def test_no_compression_sends_text(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, _ = await ready_and_guilds(connect, sim, compress=None)
    assert all(isinstance(f, str) for f in client.frames)
    assert client.frames[0].startswith('{"t":null,"s":null,"op":10,')


async def test_identify_payload_compression(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client = await connect(sim.gateway_url, compress=None)
    await client.hello()
    await client.identify(compress=True)
    data = await client.recv_message()
    assert isinstance(data, bytes)
    assert json.loads(zlib.decompress(data))["t"] == "READY"


# --- rate, burst, pause -----------------------------------------------------------------------


async def test_burst_delivers_exactly_n(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(shard_count=2, heartbeat_interval_ms=60_000)
    client, _ = await ready_and_guilds(connect, sim, shard=(1, 2))
    sim.burst(1, 20_000, size=512)
    messages = await client.recv_dispatches(20_000, timeout=30)
    assert [m["s"] for m in messages] == list(range(4, 20_004))
    ids = [m["d"]["id"] for m in messages]
    assert len(set(ids)) == 20_000
    assert all(routed(m["d"]["guild_id"], 1, 2) for m in messages[:100])
    with pytest.raises(TimeoutError):
        await client.recv(timeout=0.2)
    assert sorted(sim.ledger.events_sent(1)) == sorted(ids)
    assert sim.ledger.events_sent(0) == []


async def test_rate_pause_and_resume(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim(rate=300, size_mix=((300, 1.0), (2000, 1.0)))
    client, session_id = await ready_and_guilds(connect, sim)
    first = await client.recv_dispatches(30)
    sizes = {len(json.dumps(m["d"])) // 500 for m in first}
    assert len(sizes) == 2  # both sizes of the mix show up
    sim.pause_dispatch()
    await asyncio.sleep(0.05)
    log = sim.ledger.sent_dispatches[session_id]
    if client.last_seq != log.written:  # drain what was written before the pause
        await client.recv_until(lambda p: p.get("s") == log.written)
    held = sim.dispatch(0, "MESSAGE_CREATE", {"id": "424242"})
    assert "424242" not in sim.ledger.events_sent()
    with pytest.raises(TimeoutError):
        await client.recv(timeout=0.15)
    sim.set_rate(0)
    sim.resume_dispatch()
    assert (await client.recv())["s"] == held
    assert "424242" in sim.ledger.events_sent()


async def test_dispatch_bytes_and_commands(make_sim: MakeSim, connect: Connect) -> None:
    sim = await make_sim()
    client, _ = await ready_and_guilds(connect, sim)
    seq = sim.dispatch(0, "GUILD_UPDATE", b'{"id":"77","name":"raw"}')
    assert (await client.recv())["s"] == seq
    guild_id = sim.ledger.sent_dispatches[sim.session_ids(0)[0]]
    assert guild_id.uid(seq) == "77"

    await client.send({"op": 3, "d": {"since": None, "activities": [], "status": "idle"}})
    await client.send({"op": 4, "d": {"guild_id": "1", "channel_id": None}})
    request = {"guild_id": "5", "query": "", "limit": 0, "nonce": "n1"}
    await client.send({"op": 8, "d": request})
    chunk = await client.recv()
    assert chunk["t"] == "GUILD_MEMBERS_CHUNK" and chunk["d"]["nonce"] == "n1"
    await client.send({"op": 8, "d": request})
    limited = await client.recv()
    assert limited["t"] == "RATE_LIMITED" and limited["d"]["opcode"] == 8
    assert limited["d"]["meta"] == {"guild_id": "5", "nonce": "n1"}
    await client.send({"op": 31, "d": {"guild_ids": ["5", "6"]}})
    assert [(await client.recv())["t"] for _ in range(2)] == ["SOUNDBOARD_SOUNDS"] * 2
    await client.send({"op": 43, "d": {"guild_id": "5", "fields": ["status"]}})
    assert (await client.recv())["t"] == "CHANNEL_INFO"
    assert [c.op for c in sim.ledger.commands] == [3, 4, 8, 8, 31, 43]
    assert sim.ledger.violations == []


# --- CLI --------------------------------------------------------------------------------------


async def test_cli_prints_urls_and_exits_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spectacles_gateway.simulator",
        "--shards",
        "2",
        "--rate",
        "5",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        urls = json.loads(line)
        assert set(urls) == {"http_base", "gateway_url", "resume_url"}
        assert urlsplit(urls["gateway_url"]).hostname == "127.0.0.1"
        status, body = await http_get(
            urls["http_base"] + "/gateway/bot", {"Authorization": f"Bot {TOKEN}"}
        )
        assert (status, body["shards"]) == (200, 2)
        client = await SimClient.connect(urls["gateway_url"])
        await client.hello()
        await client.identify(shard=(0, 2))
        assert (await client.recv())["t"] == "READY"
        await client.close(1000)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        _, stderr = await proc.communicate()
    assert b"Traceback" not in stderr
