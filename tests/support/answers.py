"""A loopback HTTP listener whose answers the test writes: for clients of HTTP servers that are
not ours (Discord's REST API) or that answer what ours never would."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from typing import Any

#: (status, headers, body)
Answer = tuple[int, dict[str, str], bytes]


@contextlib.contextmanager
def answering(answers: Callable[[int], Answer]) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Answer the n-th GET with ``answers(n)``. Yields the listener's URL and the requests
    seen: each one's headers (lower-case names) and its path and query under ``":path"``."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({k.lower(): v for k, v in self.headers.items()} | {":path": self.path})
            status, headers, body = answers(len(seen))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return None

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
