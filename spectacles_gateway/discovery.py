"""``GET /gateway/bot``: the gateway URL, the recommended shard count and identify limits.

The token goes in the ``Authorization`` header, so the request never follows a redirect (a 3xx
is an error: the token must not travel to whatever host an answer names), never uses a proxy
from the environment, and the gateway URL in the answer must be ``wss://`` unless the API itself
is plain ``http://`` (a local simulator).


The supervisor asks through a short-lived child process (``python -m
spectacles_gateway.discovery``, the token on its stdin: :func:`fetch_in_child`), so it never
loads ``http.client`` and ``ssl`` (about 6 MiB) for one request at start-up and one an hour.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec

from .protocol.urls import tls_kept

if TYPE_CHECKING:
    import http.client

__all__ = ["BadToken", "GatewayBot", "fetch_gateway_bot", "fetch_in_child"]

log = logging.getLogger(__name__)

USER_AGENT = "DiscordBot (https://github.com/spec-tacles, 0.1) spectacles-gateway"
MAX_BODY = 1 << 20


class BadToken(Exception):
    """Discord answered 401: the token is wrong or was reset. Fatal: never retry."""


class GatewayBot(msgspec.Struct, frozen=True):
    url: str
    shards: int
    total: int
    remaining: int
    reset_after: float  # seconds
    max_concurrency: int


def _parse(body: bytes, url: str, base_url: str) -> GatewayBot:
    obj = json.loads(body)
    if not isinstance(obj, dict) or not isinstance(obj.get("url"), str):
        raise TypeError("the answer has no gateway url")
    limit = obj.get("session_start_limit") or {}
    if not isinstance(limit, dict):
        raise TypeError("session_start_limit is not an object")
    gateway = obj["url"]
    if not tls_kept(gateway, base_url):
        scheme = gateway.split("://")[0]
        raise RuntimeError(f"{url}: the gateway URL in the answer is not wss:// ({scheme}://)")
    bot = GatewayBot(
        url=gateway,
        shards=int(obj.get("shards", 1)),
        total=int(limit.get("total", 1000)),
        remaining=int(limit.get("remaining", 1000)),
        reset_after=float(limit.get("reset_after", 0)) / 1000.0,
        max_concurrency=int(limit.get("max_concurrency", 1)),
    )
    if bot.shards < 1 or bot.max_concurrency < 1 or bot.total < 0 or bot.remaining < 0:
        raise ValueError(f"implausible numbers in the answer: {bot}")
    return bot


def _get(url: str, token: str, timeout: float) -> tuple[int, dict[str, str], bytes]:
    import http.client

    parts = urlsplit(url)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(
            "GET", path, headers={"Authorization": f"Bot {token}", "User-Agent": USER_AGENT}
        )
        response = conn.getresponse()
        body = response.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise ValueError(f"an answer over {MAX_BODY} bytes")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def _answer(
    url: str, base_url: str, response: tuple[int, dict[str, str], bytes], delay: float
) -> GatewayBot | tuple[float, str]:
    """What an answer means: the result, or (how long to wait, why) before trying again.
    Raises BadToken (401) and RuntimeError for answers that must not be retried."""
    status, headers, body = response
    if status == 200:
        try:
            return _parse(body, url, base_url)
        except (ValueError, TypeError) as exc:
            return delay, f"a malformed answer: {exc}"
    if status == 401:
        raise BadToken(f"{url} answered 401 Unauthorized: the bot token is invalid")
    if 300 <= status < 400:
        where = urlsplit(headers.get("location", "")).hostname or "somewhere"
        raise RuntimeError(f"{url} answered {status}, a redirect to {where}; not following it")
    if status == 429:
        try:
            return float(json.loads(body).get("retry_after", delay)), "HTTP 429"
        except (ValueError, AttributeError, TypeError):
            return delay, "HTTP 429"
    if status < 500:
        raise RuntimeError(f"{url} answered HTTP {status}")
    return delay, f"HTTP {status}"


def fetch_gateway_bot(
    base_url: str,
    token: str,
    *,
    timeout: float = 10.0,
    attempts: int = 6,
    sleep: Callable[[float], None] = time.sleep,
) -> GatewayBot:
    """Ask Discord; retry network errors, 5xx and 429 with backoff; raise BadToken on 401 and
    RuntimeError when it cannot be had."""
    import http.client

    url = base_url.rstrip("/") + "/gateway/bot"
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            response = _get(url, token, timeout)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            outcome: GatewayBot | tuple[float, str] = (delay, f"{type(exc).__name__}: {exc}")
        else:
            outcome = _answer(url, base_url, response, delay)
        if isinstance(outcome, GatewayBot):
            return outcome
        wait, problem = outcome
        if attempt == attempts:
            raise RuntimeError(f"could not reach {url} after {attempts} attempts: {problem}")
        log.warning("GET %s failed (%s); retrying in %.1f s", url, problem, wait)
        sleep(min(wait, 60.0))
        delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


#: Seconds the child may take: six attempts with backoff, each up to its own timeout.
CHILD_TIMEOUT = 150.0


def fetch_in_child(base_url: str, token: str) -> GatewayBot:
    """:func:`fetch_gateway_bot` in a short-lived child process of our interpreter (the token
    goes through its stdin, never its argv); the same answers and exceptions. What the child
    logged (retries) is logged here."""
    import subprocess
    import sys

    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-P", "-m", __name__],  # -P: not the working directory's code
            input=json.dumps({"base_url": base_url, "token": token}).encode(),
            capture_output=True,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not ask for /gateway/bot: {type(exc).__name__}") from None
    for line in done.stderr.decode(errors="replace").splitlines():
        if line.strip():
            log.warning("%s", line)
    try:
        answer = json.loads(done.stdout)
        kind, value = answer["kind"], answer["value"]
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(
            f"the /gateway/bot child process gave no answer (exit {done.returncode})"
        ) from None
    if kind == "bot":
        return GatewayBot(**value)
    if kind == "bad_token":
        raise BadToken(str(value))
    raise RuntimeError(str(value))


def main() -> int:
    """``python -m spectacles_gateway.discovery``: ``{"base_url", "token"}`` on stdin, the
    answer on stdout as ``{"kind": "bot" | "bad_token" | "error", "value": ...}``; retries are
    logged to stderr, one line each."""
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    request = json.loads(sys.stdin.buffer.read())
    try:
        bot = fetch_gateway_bot(request["base_url"], request["token"])
        out = {"kind": "bot", "value": msgspec.structs.asdict(bot)}
    except BadToken as exc:
        out = {"kind": "bad_token", "value": str(exc)}
    except RuntimeError as exc:
        out = {"kind": "error", "value": str(exc)}
    sys.stdout.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
