"""The REST side of the simulated Discord: ``GET /api/v10/gateway`` and ``/gateway/bot``.

Served on the gateway's own port through ``websockets``' ``process_request`` hook: a request
for an API path gets an HTTP response; ``/`` and :data:`RESUME_PATH` go on to the websocket
handshake; ``/control/<name>`` reaches the simulator's control endpoints (parameters in the
query string: ``POST /control/rate?rate=100``); anything else is a 404. Every request is
recorded in ``ledger.http``, with the listener it came to and whether it carried
``Authorization``.

The same class answers on the *other host* (``SimulatorConfig.other_host``), the target of the
:class:`~.faults.GatewayBotRedirect` fault: there ``/gateway/bot`` answers like Discord
whatever the request carries, so the ledger shows whether a client took its token along.
"""

from __future__ import annotations

import email.utils
import logging
import re
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from spectacles_gateway.simulator import events
from spectacles_gateway.simulator.faults import GatewayBotRedirect, InsecureGatewayUrl, RestFault
from spectacles_gateway.simulator.gateway import Gateway
from spectacles_gateway.simulator.ledger import HttpRecord
from spectacles_gateway.simulator.rules import IdentifyLimits

logger = logging.getLogger(__name__)

RESUME_PATH: Final = "/resume-gw"
"""Path of READY's ``resume_gateway_url`` (the gateway URL itself is ``/``)."""

_API_PATH = re.compile(r"/api(?:/v\d+)?/gateway(/bot)?")
CONTROL_PREFIX: Final = "/control/"

Control = Callable[[dict[str, str]], Any]
"""A control endpoint: called with the query parameters, returns what to answer as JSON;
ValueError (or KeyError for a missing parameter) answers 400 with its message."""
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})


def json_response(status: int, obj: Any, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    body = events.dumps(obj)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *extra,
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, body)


class Rest:
    """Answers HTTP requests on one listener (``main`` or ``other``)."""

    def __init__(self, gw: Gateway, limits: IdentifyLimits, listener: str = "main") -> None:
        self.gw = gw
        self.config = gw.config
        self.ledger = gw.ledger
        self.limits = limits
        self.listener = listener
        self.controls: dict[tuple[str, str], Control] = {}
        """``(method, name)`` -> handler of ``/control/<name>`` (main listener only)."""
        self._faults: list[list[Any]] = []  # [fault, answers left]

    def add_fault(self, fault: RestFault) -> None:
        if isinstance(fault, GatewayBotRedirect) and fault.status not in REDIRECT_STATUSES:
            raise ValueError(f"not a redirect status: {fault.status}")
        if fault.times < 1:
            raise ValueError("a REST fault needs times >= 1")
        self._faults.append([fault, fault.times])

    def _take(self, kind: type[RestFault]) -> RestFault | None:
        for entry in self._faults:
            if isinstance(entry[0], kind):
                entry[1] -= 1
                if entry[1] <= 0:
                    self._faults.remove(entry)
                fault: RestFault = entry[0]
                return fault
        return None

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """``websockets``' hook: a response for REST paths, None to go on with the handshake."""
        path = urlsplit(request.path).path
        path = path.rstrip("/") or "/"
        match = _API_PATH.fullmatch(path)
        if match is not None:
            response = self._gateway(match.group(1) is not None, request)
        elif path.startswith(CONTROL_PREFIX) and self.listener == "main":
            response = self._control(request, path.removeprefix(CONTROL_PREFIX))
        elif path in ("/", RESUME_PATH):
            return None
        else:
            response = json_response(404, {"message": "404: Not Found", "code": 0})
        self._record(request, response.status_code)
        return response

    def _record(self, request: Request, status: int) -> None:
        self.ledger.http.append(
            HttpRecord(
                time.monotonic(),
                request.method,
                request.path,
                status,
                listener=self.listener,
                authorization="Authorization" in request.headers,
            )
        )

    def _control(self, request: Request, name: str) -> Response:
        handler = self.controls.get((request.method, name))
        if handler is None:
            known = sorted(f"{m} {CONTROL_PREFIX}{n}" for m, n in self.controls)
            return json_response(404, {"message": f"no such control; known: {known}"})
        query = dict(parse_qsl(urlsplit(request.path).query, keep_blank_values=True))
        try:
            result = handler(query)
        except (ValueError, KeyError) as exc:
            return json_response(400, {"message": f"{name}: {exc}"})
        return json_response(200, result)

    def _gateway(self, bot: bool, request: Request) -> Response:
        main = self.listener == "main"
        if main and bot and (redirect := self._take(GatewayBotRedirect)) is not None:
            assert isinstance(redirect, GatewayBotRedirect)
            location = self.gw.other_http_base + request.path
            logger.info("/gateway/bot: %d redirect to %s", redirect.status, location)
            body = {"message": "moved", "code": 0}
            return json_response(redirect.status, body, (("Location", location),))
        url = self.gw.gateway_url
        if main and self._take(InsecureGatewayUrl) is not None:
            url = self.gw.other_gateway_url
        if not bot:
            return json_response(200, {"url": url})
        if main and request.headers.get("Authorization") != f"Bot {self.config.token}":
            return json_response(401, {"message": "401: Unauthorized", "code": 0})
        return json_response(
            200,
            {
                "url": url,
                "shards": self.gw.recommended_shards,
                "session_start_limit": self.limits.session_start_limit(time.monotonic()),
            },
        )
