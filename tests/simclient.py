"""A tiny raw gateway client for the simulator's own tests (not the product's client).

It does exactly what it is told: no heartbeating, no reconnecting. Received websocket messages
are kept raw in ``frames`` so tests can look at the bytes; ``recv()`` returns decoded payloads.

A ``timeout`` left out is a default scaled by :func:`~tests.gwtest.t`; one given is used as is
(scale it where it is written, once).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from ssl import SSLContext
from typing import Any
from urllib.parse import urlencode, urlsplit

import zstandard
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .gwtest import t

ZLIB_SUFFIX = b"\x00\x00\xff\xff"


def _within(timeout: float | None, default: float = 5.0) -> float:
    """The timeout given, or the default scaled once."""
    return t(default) if timeout is None else timeout


class ClosedError(Exception):
    """The server closed the connection; ``code`` is its close code (None: no close frame)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed with {code} {reason!r}")
        self.code = code
        self.reason = reason


class SimClient:
    def __init__(self, ws: ClientConnection, compress: str | None) -> None:
        self.ws = ws
        self.compress = compress
        self.frames: list[bytes | str] = []
        self.messages_per_payload: list[int] = []
        self._zstd = (
            zstandard.ZstdDecompressor().decompressobj() if compress == "zstd-stream" else None
        )
        self._zlib = zlib.decompressobj() if compress == "zlib-stream" else None
        self._zbuf = bytearray()
        self.last_seq: int | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        compress: str | None = "zstd-stream",
        v: str | None = "10",
        encoding: str | None = "json",
        ssl: SSLContext | None = None,
        **extra: str,
    ) -> SimClient:
        query: dict[str, str] = {}
        if v is not None:
            query["v"] = v
        if encoding is not None:
            query["encoding"] = encoding
        if compress is not None:
            query["compress"] = compress
        query.update(extra)
        parts = urlsplit(url)
        full = parts._replace(path=parts.path or "/", query=urlencode(query)).geturl()
        ws = await connect(
            full,
            compression=None,
            max_size=None,
            proxy=None,
            ping_interval=None,
            close_timeout=2,
            ssl=ssl,
        )
        return cls(ws, compress)

    async def recv_message(self, timeout: float | None = None) -> bytes | str:
        try:
            async with asyncio.timeout(_within(timeout)):
                message = await self.ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            raise ClosedError(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from None
        self.frames.append(message)
        return message

    def decode(self, data: bytes | str) -> bytes | None:
        """Feed one websocket message; return one JSON document's bytes, or None (need more)."""
        if isinstance(data, str):
            return data.encode()
        if self._zstd is not None:
            return self._zstd.decompress(data)
        if self._zlib is not None:
            self._zbuf += data
            if not self._zbuf.endswith(ZLIB_SUFFIX):
                return None
            out = self._zlib.decompress(bytes(self._zbuf))
            self._zbuf.clear()
            return out
        return data

    async def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next gateway payload, decoded."""
        timeout = _within(timeout)
        count = 0
        while True:
            count += 1
            text = self.decode(await self.recv_message(timeout))
            if text is not None:
                break
        self.messages_per_payload.append(count)
        payload = json.loads(text)
        if payload.get("op") == 0 and payload.get("s") is not None:
            self.last_seq = payload["s"]
        return payload

    async def recv_until(
        self, predicate: Any, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Payloads up to and including the first that satisfies ``predicate``."""
        timeout = _within(timeout)
        out = []
        async with asyncio.timeout(timeout):
            while True:
                payload = await self.recv(timeout)
                out.append(payload)
                if predicate(payload):
                    return out

    async def recv_dispatches(
        self, count: int, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        timeout = _within(timeout, 10.0)
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while len(out) < count:
                payload = await self.recv(timeout)
                if payload["op"] == 0:
                    out.append(payload)
        return out

    async def expect_close(self, timeout: float | None = None) -> int | None:
        """Read until the server closes; return its close code (None if no close frame)."""
        timeout = _within(timeout)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.recv_message(timeout)
        except ClosedError as exc:
            return exc.code

    async def send(self, payload: dict[str, Any] | str | bytes) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        await self.ws.send(payload)

    async def hello(self) -> dict[str, Any]:
        payload = await self.recv()
        assert payload["op"] == 10, payload
        return payload

    async def identify(
        self,
        token: str = "simulated-token",
        shard: tuple[int, int] | None = (0, 1),
        intents: Any = 513,
        **extra: Any,
    ) -> None:
        d: dict[str, Any] = {
            "token": token,
            "intents": intents,
            "properties": {"os": "linux", "browser": "simclient", "device": "simclient"},
            "compress": False,
            "large_threshold": 250,
        }
        if shard is not None:
            d["shard"] = list(shard)
        d.update(extra)
        await self.send({"op": 2, "d": d})

    async def resume(
        self, session_id: str, seq: int | None, token: str = "simulated-token"
    ) -> None:
        await self.send({"op": 6, "d": {"token": token, "session_id": session_id, "seq": seq}})

    async def heartbeat(self, seq: int | None = None) -> None:
        await self.send({"op": 1, "d": seq})

    async def close(self, code: int = 1000) -> None:
        await self.ws.close(code)

    def abort(self) -> None:
        self.ws.transport.abort()


async def ready_client(
    url: str, shard: tuple[int, int] = (0, 1), compress: str | None = "zstd-stream", **kw: Any
) -> tuple[SimClient, dict[str, Any]]:
    """Connect, HELLO, IDENTIFY; return the client and its READY payload."""
    client = await SimClient.connect(url, compress=compress)
    await client.hello()
    await client.identify(shard=shard, **kw)
    ready = await client.recv()
    assert ready["t"] == "READY", ready
    return client, ready


async def http_get(
    url: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    ssl: SSLContext | None = None,
) -> tuple[int, Any]:
    """A minimal HTTP/1.1 request over asyncio streams: (status, decoded JSON body or text)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=ssl)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")
