"""A tiny HTTP/1.0 server driven by the supervisor's select loop (no threads, no event loop).

It answers GET requests for metrics, liveness, readiness and status; every connection is read
until the end of its headers, answered, and closed. Slow or oversized clients are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["HttpServer", "Response"]

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
CLIENT_TIMEOUT = 5.0


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclass
class _Client:
    sock: socket.socket
    started: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""


Handler = Callable[[str], Response]


class HttpServer:
    def __init__(
        self, selector: selectors.BaseSelector, host: str, port: int, handler: Handler
    ) -> None:
        self.selector = selector
        self.handler = handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self._clients: dict[int, _Client] = {}
        selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def _accept(self, mask: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        client = _Client(conn, time.monotonic())
        self._clients[conn.fileno()] = client
        self.selector.register(conn, selectors.EVENT_READ, lambda m, c=client: self._io(c, m))

    def _io(self, client: _Client, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not client.outbuf:
                chunk = client.sock.recv(4096)
                if not chunk:
                    self._close(client)
                    return
                client.inbuf += chunk
                if b"\r\n\r\n" in client.inbuf or b"\n\n" in client.inbuf:
                    self._respond(client)
                elif len(client.inbuf) > MAX_REQUEST:
                    self._close(client)
                    return
            if client.outbuf:
                sent = client.sock.send(client.outbuf)
                client.outbuf = client.outbuf[sent:]
                if not client.outbuf:
                    self._close(client)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)

    def _respond(self, client: _Client) -> None:
        line = bytes(client.inbuf).split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) < 2:
            response = Response(400, b"bad request\n")
        elif parts[0] not in ("GET", "HEAD"):
            response = Response(405, b"method not allowed\n")
        else:
            path = parts[1].split("?", 1)[0]
            try:
                response = self.handler(path)
            except Exception:
                log.exception("HTTP handler failed for %s", path)
                response = Response(503, b"internal error\n")
        head = (
            f"HTTP/1.0 {response.status} {_REASONS.get(response.status, 'Status')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        client.outbuf = head + (b"" if parts and parts[0] == "HEAD" else response.body)
        self.selector.modify(client.sock, selectors.EVENT_WRITE, lambda m, c=client: self._io(c, m))

    def _close(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.sock)
        client.sock.close()

    def expire(self, now: float) -> None:
        """Drop clients that took too long (called from the loop's housekeeping)."""
        for client in list(self._clients.values()):
            if now - client.started > CLIENT_TIMEOUT:
                self._close(client)

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._close(client)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.sock)
        self.sock.close()
