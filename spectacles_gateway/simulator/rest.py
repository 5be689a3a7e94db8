"""The REST side of the simulated Discord: ``GET /api/v10/gateway`` and ``/gateway/bot``.

Served on the gateway's own port through ``websockets``' ``process_request`` hook: a request
for an API path gets an HTTP response; ``/`` and :data:`RESUME_PATH` go on to the websocket
handshake; anything else is a 404. Every request is recorded in ``ledger.http``.
"""

from __future__ import annotations

import email.utils
import re
import time
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.gateway import Gateway
from spectacles_gateway.simulator.ledger import HttpRecord
from spectacles_gateway.simulator.rules import IdentifyLimits

RESUME_PATH: Final = "/resume-gw"
"""Path of READY's ``resume_gateway_url`` (the gateway URL itself is ``/``)."""

_API_PATH = re.compile(r"/api(?:/v\d+)?/gateway(/bot)?")


def json_response(status: int, obj: Any) -> Response:
    body = events.dumps(obj)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, body)


class Rest:
    """Answers HTTP requests on the gateway's port."""

    def __init__(self, gw: Gateway, limits: IdentifyLimits) -> None:
        self.gw = gw
        self.config = gw.config
        self.ledger = gw.ledger
        self.limits = limits

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """``websockets``' hook: a response for REST paths, None to go on with the handshake."""
        path = urlsplit(request.path).path
        path = path.rstrip("/") or "/"
        match = _API_PATH.fullmatch(path)
        if match is not None:
            response = self._gateway(match.group(1) is not None, request)
            self.ledger.http.append(
                HttpRecord(time.monotonic(), "GET", request.path, response.status_code)
            )
            return response
        if path in ("/", RESUME_PATH):
            return None
        self.ledger.http.append(HttpRecord(time.monotonic(), "GET", request.path, 404))
        return json_response(404, {"message": "404: Not Found", "code": 0})

    def _gateway(self, bot: bool, request: Request) -> Response:
        if not bot:
            return json_response(200, {"url": self.gw.gateway_url})
        if request.headers.get("Authorization") != f"Bot {self.config.token}":
            return json_response(401, {"message": "401: Unauthorized", "code": 0})
        return json_response(
            200,
            {
                "url": self.gw.gateway_url,
                "shards": self.config.shard_count,
                "session_start_limit": self.limits.session_start_limit(time.monotonic()),
            },
        )
