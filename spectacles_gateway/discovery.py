"""``GET /gateway/bot``: the gateway URL, the recommended shard count and identify limits."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BadToken", "GatewayBot", "fetch_gateway_bot"]

log = logging.getLogger(__name__)

USER_AGENT = "DiscordBot (https://github.com/spec-tacles, 0.1) spectacles-gateway"


class BadToken(Exception):
    """Discord answered 401: the token is wrong or was reset. Fatal: never retry."""


@dataclass(frozen=True)
class GatewayBot:
    url: str
    shards: int
    total: int
    remaining: int
    reset_after: float  # seconds
    max_concurrency: int


# Ignore *_proxy environment variables: the gateway talks to Discord (or the configured base)
# directly; a proxy is configured explicitly, never picked up by accident.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _parse(body: bytes) -> GatewayBot:
    obj = json.loads(body)
    limit = obj.get("session_start_limit") or {}
    return GatewayBot(
        url=str(obj["url"]),
        shards=int(obj.get("shards", 1)),
        total=int(limit.get("total", 1000)),
        remaining=int(limit.get("remaining", 1000)),
        reset_after=float(limit.get("reset_after", 0)) / 1000.0,
        max_concurrency=int(limit.get("max_concurrency", 1)),
    )


def fetch_gateway_bot(
    base_url: str,
    token: str,
    *,
    timeout: float = 10.0,
    attempts: int = 6,
    sleep: Callable[[float], None] = time.sleep,
) -> GatewayBot:
    """Ask Discord; retry network errors, 5xx and 429 with backoff; raise BadToken on 401."""
    url = base_url.rstrip("/") + "/gateway/bot"
    request = urllib.request.Request(  # noqa: S310 - the scheme is validated by the config
        url, headers={"Authorization": f"Bot {token}", "User-Agent": USER_AGENT}
    )
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            with _opener.open(request, timeout=timeout) as response:
                return _parse(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise BadToken(
                    f"{url} answered 401 Unauthorized: the bot token is invalid"
                ) from None
            wait = delay
            if exc.code == 429:
                try:
                    wait = float(json.loads(exc.read()).get("retry_after", delay))
                except (ValueError, AttributeError):
                    wait = delay
            elif exc.code < 500:
                raise RuntimeError(f"{url} answered HTTP {exc.code}") from None
            problem = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            wait = delay
            problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if attempt == attempts:
            raise RuntimeError(f"could not reach {url} after {attempts} attempts: {problem}")
        log.warning("GET %s failed (%s); retrying in %.1f s", url, problem, wait)
        sleep(wait)
        delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")
