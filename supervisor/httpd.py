"""A tiny HTTP/1.0 server driven by the supervisor's select loop (no threads, no event loop).

It answers GET requests for metrics, liveness, readiness and status, and POST requests (their
parameters in the query string, a body is not read) from loopback clients only: those change
things (``POST /reshard``). Every connection is read until the end of its headers, answered,
and closed. Requests over 8 KiB, clients slower than 5 s
and clients beyond ``max_clients`` at once are dropped; a failing ``accept()`` (out of file
descriptors, say) pauses accepting for a moment instead of ending the supervisor.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import selectors
import socket
import time
from collections.abc import Callable

import msgspec

__all__ = ["HttpServer", "Response"]

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
CLIENT_TIMEOUT = 5.0
#: How long accepting pauses after accept() failed for want of a resource (EMFILE, ENOBUFS).
ACCEPT_PAUSE = 0.5


class Response(msgspec.Struct):
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


_REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    503: "Service Unavailable",
}


class _Client(msgspec.Struct):
    sock: socket.socket
    started: float
    local: bool = False  # a loopback peer: may POST
    inbuf: bytearray = msgspec.field(default_factory=bytearray)
    outbuf: bytes = b""


#: ``handler(path, query)``.
Handler = Callable[[str, str], Response]
#: ``post(path, query)``, for loopback clients only.
PostHandler = Callable[[str, str], Response]


def _loopback(address: object) -> bool:
    if isinstance(address, tuple) and address:
        try:
            return ipaddress.ip_address(str(address[0]).partition("%")[0]).is_loopback
        except ValueError:
            return False
    return False


class HttpServer:
    def __init__(
        self,
        selector: selectors.BaseSelector,
        host: str,
        port: int,
        handler: Handler,
        *,
        max_clients: int = 64,
        post: PostHandler | None = None,
    ) -> None:
        self.selector = selector
        self.handler = handler
        self.post = post
        self.max_clients = max_clients
        self.accept_errors = 0
        self.refused = 0
        self._paused_until: float | None = None
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
            conn, peer = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED...
            self.accept_errors += 1
            log.warning("HTTP listener: accept() failed (%s); pausing %.1f s", exc, ACCEPT_PAUSE)
            self._pause_accepting(time.monotonic() + ACCEPT_PAUSE)
            return
        if len(self._clients) >= self.max_clients:
            self.refused += 1
            conn.close()  # too many at once: the client retries, we stay responsive
            return
        conn.setblocking(False)
        client = _Client(conn, time.monotonic(), _loopback(peer))
        self._clients[conn.fileno()] = client
        self.selector.register(conn, selectors.EVENT_READ, lambda m, c=client: self._io(c, m))

    def _pause_accepting(self, until: float) -> None:
        if self._paused_until is None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
        self._paused_until = until

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
        elif parts[0] == "POST" and self.post is not None:
            if client.local:
                response = self._call(self.post, parts[1])
            else:
                response = Response(403, b"POST is answered on loopback only\n")
        elif parts[0] not in ("GET", "HEAD"):
            response = Response(405, b"method not allowed\n")
        else:
            response = self._call(self.handler, parts[1])
        head = (
            f"HTTP/1.0 {response.status} {_REASONS.get(response.status, 'Status')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        client.outbuf = head + (b"" if parts and parts[0] == "HEAD" else response.body)
        self.selector.modify(client.sock, selectors.EVENT_WRITE, lambda m, c=client: self._io(c, m))

    @staticmethod
    def _call(handler: Handler, target: str) -> Response:
        path, _, query = target.partition("?")
        try:
            return handler(path, query)
        except Exception:
            log.exception("HTTP handler failed for %s", path)
            return Response(503, b"internal error\n")

    def _close(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.sock)
        client.sock.close()

    def expire(self, now: float) -> None:
        """Drop clients that took too long; accept again after a pause (called from the
        loop's housekeeping)."""
        for client in list(self._clients.values()):
            if now - client.started > CLIENT_TIMEOUT:
                self._close(client)
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            self.selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has something to do next."""
        times = [c.started + CLIENT_TIMEOUT for c in self._clients.values()]
        if self._paused_until is not None:
            times.append(self._paused_until)
        return min(times, default=None)

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._close(client)
        if self._paused_until is None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
        self.sock.close()
