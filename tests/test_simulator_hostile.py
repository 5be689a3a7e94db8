"""A hostile Discord (issue 10): the simulator's bomb, fragment, nesting, HELLO, redirect and
``ws://`` faults, seen from raw clients over real sockets."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import tracemalloc
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import zstandard
from websockets.asyncio.client import connect

from spectacles_gateway.simulator import (
    AbsurdHello,
    DecompressionBomb,
    DeepNesting,
    FragmentedMessage,
    GatewayBotRedirect,
    InsecureGatewayUrl,
)
from tests.simclient import http_get
from tests.support.simulators import SimulatorPool

TOKEN = "simulated-token"
AUTH = {"Authorization": f"Bot {TOKEN}"}
MiB = 1 << 20


class CountingSink:
    """Where a streaming decompressor writes: keeps the first KiB and the tail, counts all."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.size = 0
        self.head = bytearray()
        self.tail = b""

    def write(self, data: bytes) -> int:
        if len(self.head) < 1024:
            self.head += data[: 1024 - len(self.head)]
        self.tail = (self.tail + data)[-64:]
        self.size += len(data)
        return len(data)


class StreamDecoder:
    """A zstd-stream decoder that never holds a whole message (for 128 MiB bombs)."""

    def __init__(self) -> None:
        self.sink = CountingSink()
        self._writer = zstandard.ZstdDecompressor().stream_writer(self.sink, write_size=MiB)

    def feed(self, message: bytes | str) -> CountingSink:
        assert isinstance(message, bytes)
        self.sink.reset()  # one decompression context for the connection, counts per message
        self._writer.write(message)
        return self.sink


# --- decompression bomb -----------------------------------------------------------------------


async def test_zstd_bomb_is_4_kib_for_128_mib_and_the_stream_stays_valid(
    sim_pool: SimulatorPool,
) -> None:
    sim = await sim_pool.start()
    client = await sim_pool.ready(sim)
    decoder = StreamDecoder()
    for frame in client.frames:  # keep the decoder in step with the stream so far
        decoder.feed(frame)
    tracemalloc.start()
    try:
        sim.inject(0, DecompressionBomb(size=128 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB  # the simulator never holds the 128 MiB message

    wire = await client.recv_message()
    assert 2048 < len(wire) < 8192  # "about 4 KiB"
    out = decoder.feed(wire)
    assert out.size == 128 * MiB
    assert bytes(out.head).startswith(b'{"t":"MESSAGE_CREATE","s":4,"op":0,"d":{"content":"AAAA')
    assert out.tail.endswith(b'AAAA"}}')

    # The compressor's stream is still in step: a normal dispatch decodes after the bomb.
    seq = sim.dispatch(0, "MESSAGE_CREATE", {"id": "77", "content": "after the bomb"})
    after = decoder.feed(await client.recv_message())
    assert json.loads(after.head) == {
        "t": "MESSAGE_CREATE",
        "s": seq,
        "op": 0,
        "d": {"id": "77", "content": "after the bomb"},
    }
    (fault,) = sim.ledger.faults
    assert fault.conn_ids == [1] and isinstance(fault.fault, DecompressionBomb)
    assert sim.ledger.events_sent() == ["77"]  # the bomb has no id: nobody owes it delivery


async def test_zlib_bomb_reaches_deflates_best_ratio(sim_pool: SimulatorPool) -> None:
    sim = await sim_pool.start(zlib_split_over=0)
    client = await sim_pool.ready(sim, compress="zlib-stream")
    sim.inject(0, DecompressionBomb(size=32 * MiB))
    wire = await client.recv_message()
    assert isinstance(wire, bytes) and wire.endswith(b"\x00\x00\xff\xff")
    assert 32 * MiB / len(wire) > 900
    inflate = client._zlib  # the connection's own context, in step with the stream
    assert inflate is not None
    total, data = 0, wire
    while data:
        chunk = inflate.decompress(data, MiB)
        total += len(chunk)
        data = inflate.unconsumed_tail
    assert total == 32 * MiB


@pytest.mark.parametrize("replay", [True, False])
async def test_bomb_replay_follows_its_flag(sim_pool: SimulatorPool, replay: bool) -> None:
    sim = await sim_pool.start()
    client = await sim_pool.ready(sim)  # READY 1, GUILD_CREATE 2 and 3
    session_id = sim.session_ids(0)[0]
    sim.inject(0, DecompressionBomb(size=MiB, replay=replay))
    bomb = await client.recv()
    assert bomb["s"] == 4 and len(bomb["d"]["content"]) > MiB - 100
    client.abort()
    await sim.wait_for(lambda ledger: ledger.connections[0].closed_at is not None, 5)
    sim.dispatch(0, "MESSAGE_CREATE", {"id": "5"})

    resumed = await sim_pool.connect(sim.resume_url)
    await resumed.hello()
    await resumed.resume(session_id, 3)
    got = await resumed.recv_until(lambda p: p.get("t") == "RESUMED")
    assert [p["s"] for p in got] == ([4, 5, 6] if replay else [5, 6])


# --- fragments, nesting -----------------------------------------------------------------------


async def test_oversized_message_in_thousands_of_fragments(sim_pool: SimulatorPool) -> None:
    sim = await sim_pool.start()
    client = await sim_pool.ready(sim)
    sim.inject(0, FragmentedMessage(size=8 * MiB, fragments=10_000))
    fragments = [f async for f in client.ws.recv_streaming()]
    assert len(fragments) == 10_000
    compressed = b"".join(f if isinstance(f, bytes) else f.encode() for f in fragments)
    assert len(compressed) > 3 * MiB  # random hex: the compressed message is big too
    text = client.decode(compressed)
    assert text is not None and len(text) == 8 * MiB
    payload = json.loads(text)
    assert (payload["t"], payload["s"]) == ("MESSAGE_CREATE", 4)
    assert set(payload["d"]["content"]) <= set("0123456789abcdef")


@pytest.mark.parametrize("objects", [False, True], ids=["arrays", "objects"])
async def test_deeply_nested_dispatch(sim_pool: SimulatorPool, objects: bool) -> None:
    sim = await sim_pool.start()
    client = await sim_pool.ready(sim)
    sim.inject(0, DeepNesting(depth=10_000, objects=objects))
    text = client.decode(await client.recv_message())
    assert text is not None
    assert text.startswith(b'{"t":"MESSAGE_CREATE","s":4,"op":0,"d":{"nested":')
    opener = b'{"a":' if objects else b"["
    assert text.count(opener) == 10_000
    with pytest.raises(RecursionError):
        json.loads(text)


# --- HELLO ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "wire"),
    [(1e300, b"1e+300"), (1e-6, b"1e-06"), (-41250, b"-41250"), ("41250", b'"41250"')],
    ids=["huge", "tiny", "negative", "string"],
)
async def test_absurd_hello_interval(
    sim_pool: SimulatorPool, interval: object, wire: bytes
) -> None:
    sim = await sim_pool.start(heartbeat_interval_ms=60_000)
    sim.inject(0, AbsurdHello(interval))
    client = await sim_pool.connect(sim.gateway_url, compress=None)
    hello = await client.hello()
    assert hello["d"]["heartbeat_interval"] == interval
    text = client.frames[0]
    assert isinstance(text, str) and '"heartbeat_interval":' + wire.decode() in text
    # The simulator still expects the configured interval: a heartbeat is acknowledged.
    await client.heartbeat(None)
    assert (await client.recv())["op"] == 11
    second = await sim_pool.connect(sim.gateway_url)  # one-shot: the next HELLO is normal
    assert (await second.hello())["d"]["heartbeat_interval"] == 60_000


# --- REST: redirects and ws:// ----------------------------------------------------------------


def _get(url: str, headers: dict[str, str]) -> tuple[int, str | None]:
    """One request without following redirects: (status, Location)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Location")
    finally:
        conn.close()


@pytest.mark.parametrize("status", [301, 302, 307])
async def test_gateway_bot_redirect_to_another_host(sim_pool: SimulatorPool, status: int) -> None:
    sim = await sim_pool.start()
    sim.inject_rest(GatewayBotRedirect(status=status, times=2))
    url = f"{sim.http_base}/gateway/bot"
    got, location = await asyncio.to_thread(_get, url, AUTH)
    assert got == status and location is not None
    target = urlsplit(location)
    assert target.hostname == "127.0.0.2" != urlsplit(url).hostname
    assert target.path == "/api/v10/gateway/bot"

    # A client that follows redirects with its headers (urllib does) leaks the token ...
    request = urllib.request.Request(url, headers=AUTH)
    body = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(request, timeout=10)))
    assert body["url"] == sim.gateway_url and body["shards"] == 1
    # ... and the ledger says so; a careful client that drops it is told apart.
    assert (await http_get(location))[0] == 200
    other = [r for r in sim.ledger.http if r.listener == "other"]
    assert [r.authorization for r in other] == [True, False]
    assert [r.status for r in sim.ledger.http if r.listener == "main"] == [status, status]
    # times=2 used up: the next answer is Discord's again.
    assert (await http_get(url, AUTH))[0] == 200
    (fault,) = sim.ledger.faults
    assert fault.shard_id is None and fault.fault == GatewayBotRedirect(status, 2)


async def test_insecure_gateway_url_over_tls(sim_pool: SimulatorPool) -> None:
    sim = await sim_pool.start(tls=True)
    context = ssl.create_default_context(cafile=sim.tls_ca_file)
    assert sim.http_base.startswith("https://") and sim.gateway_url.startswith("wss://")
    status, body = await http_get(f"{sim.http_base}/gateway/bot", AUTH, ssl=context)
    assert (status, body["url"]) == (200, sim.gateway_url)
    secure = await sim_pool.connect(sim.gateway_url, ssl=context)
    assert (await secure.hello())["op"] == 10

    sim.inject_rest(InsecureGatewayUrl())
    status, body = await http_get(f"{sim.http_base}/gateway/bot", AUTH, ssl=context)
    insecure_url = body["url"]
    assert status == 200 and insecure_url.startswith("ws://")
    # A client that takes it sends its IDENTIFY in clear text, and the ledger shows it.
    client = await sim_pool.connect(insecure_url)
    await client.hello()
    await client.identify()
    assert (await client.recv())["t"] == "READY"
    first, second = sim.ledger.connections
    assert (first.listener, first.secure) == ("main", True)
    assert (second.listener, second.secure) == ("other", False)
    assert sim.ledger.identifies[0].conn_id == second.conn_id


async def test_tls_refuses_an_untrusting_client(sim_pool: SimulatorPool) -> None:
    sim = await sim_pool.start(tls=True)
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(sim.gateway_url, proxy=None, ssl=ssl.create_default_context()):
            pass
    assert Path(sim.tls_ca_file).is_file()
    await sim.stop()
    assert not Path(sim.tls_ca_file).exists()  # the throwaway key goes with the simulator


async def test_zlib_payload_compression_of_a_bomb(sim_pool: SimulatorPool) -> None:
    # identify compress=true (per-message zlib, no transport compression) works for bombs too
    sim = await sim_pool.start()
    client = await sim_pool.connect(sim.gateway_url, compress=None)
    await client.hello()
    await client.identify(compress=True)
    ready = zlib.decompress(bytes(await client.recv_message()))  # type: ignore[arg-type]
    assert json.loads(ready)["t"] == "READY"
    for _ in range(2):
        await client.recv_message()
    sim.inject(0, DecompressionBomb(size=4 * MiB))
    wire = await client.recv_message()
    assert isinstance(wire, bytes) and len(wire) < 16 * 1024
    assert len(zlib.decompress(wire)) == 4 * MiB


async def test_a_client_nesting_json_too_deep_is_4002(sim_pool: SimulatorPool) -> None:
    # The other way round: a hostile client must not stop the simulator's handler.
    sim = await sim_pool.start()
    client = await sim_pool.connect(sim.gateway_url)
    await client.hello()
    await client.send("[" * 2000 + "]" * 2000)  # 4000 bytes, deeper than json's recursion
    assert await client.expect_close() == 4002
    assert any(v.startswith("4002 undecodable text") for v in sim.ledger.violations)
    await sim_pool.ready(sim)  # the simulator goes on
