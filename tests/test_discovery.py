"""``GET /gateway/bot`` against real local HTTP servers: the token never travels (issue 10)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from spectacles_gateway.discovery import BadToken, fetch_gateway_bot, fetch_in_child

from .support.answers import Answer, answering

TOKEN = "discovery-test-token"
GOOD = {
    "url": "wss://gateway.discord.gg",
    "shards": 9,
    "session_start_limit": {
        "total": 1000,
        "remaining": 998,
        "reset_after": 5000,
        "max_concurrency": 16,
    },
}


@contextlib.contextmanager
def server(answers: Callable[[int], Answer]) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A REST API root answering ``answers(n)`` to the n-th request."""
    with answering(answers) as (url, seen):
        yield f"{url}/api/v10", seen


def ok(obj: Any = GOOD) -> Answer:
    return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def test_a_good_answer() -> None:
    with server(lambda n: ok()) as (base, seen):
        bot = fetch_gateway_bot(base, TOKEN)
    assert (bot.url, bot.shards, bot.remaining, bot.max_concurrency) == (
        "wss://gateway.discord.gg",
        9,
        998,
        16,
    )
    assert bot.reset_after == 5.0
    assert seen[0]["authorization"] == f"Bot {TOKEN}"


def test_a_redirect_is_never_followed_with_the_token() -> None:
    with server(lambda n: ok()) as (elsewhere, seen_elsewhere):
        answer = (302, {"Location": elsewhere + "/gateway/bot"}, b"")
        with (
            server(lambda n: answer) as (base, seen),
            pytest.raises(RuntimeError, match="redirect"),
        ):
            fetch_gateway_bot(base, TOKEN, sleep=lambda s: None)
    assert len(seen) == 1  # not retried either
    assert seen_elsewhere == []  # the other host never saw the token


def test_401_is_a_bad_token_at_once() -> None:
    with server(lambda n: (401, {}, b'{"message":"401: Unauthorized"}')) as (base, seen):
        with pytest.raises(BadToken):
            fetch_gateway_bot(base, TOKEN, sleep=lambda s: None)
    assert len(seen) == 1


def test_429_and_5xx_and_garbage_are_retried_with_the_waits_asked_for() -> None:
    script = [
        (429, {}, b'{"retry_after": 2.5}'),
        (502, {}, b"bad gateway"),
        (200, {}, b"not json"),
        (200, {}, json.dumps({"url": 5}).encode()),
        ok(),
    ]
    waits: list[float] = []
    with server(lambda n: script[n - 1]) as (base, seen):
        bot = fetch_gateway_bot(base, TOKEN, sleep=waits.append)
    assert bot.shards == 9 and len(seen) == 5
    assert waits[0] == 2.5 and len(waits) == 4


def test_a_plain_ws_gateway_url_is_refused_behind_https_and_accepted_behind_http() -> None:
    answer = ok({**GOOD, "url": "ws://gateway.example"})
    with server(lambda n: answer) as (base, _):
        assert fetch_gateway_bot(base, TOKEN).url == "ws://gateway.example"  # a local simulator
    from spectacles_gateway.discovery import _parse

    with pytest.raises(RuntimeError, match="not wss"):
        _parse(answer[2], "https://discord.com/api/v10/gateway/bot", "https://discord.com/api/v10")


def test_an_oversized_answer_is_not_read_whole() -> None:
    with server(lambda n: (200, {}, b" " * (2 << 20))) as (base, _):
        with pytest.raises(RuntimeError, match="over"):
            fetch_gateway_bot(base, TOKEN, attempts=2, sleep=lambda s: None)


def test_proxies_in_the_environment_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # a dead port
    with server(lambda n: ok()) as (base, _):
        assert fetch_gateway_bot(base, TOKEN, attempts=1).shards == 9


def test_the_supervisor_asks_through_a_child_process() -> None:
    """The supervisor's way (it does not load http.client and ssl itself): the same answer,
    the token in the header as before, never on the child's command line."""
    with server(lambda n: ok()) as (base, seen):
        bot = fetch_in_child(base, TOKEN)
    assert (bot.url, bot.shards, bot.max_concurrency, bot.remaining) == (
        "wss://gateway.discord.gg",
        9,
        16,
        998,
    )
    assert seen[0]["authorization"] == f"Bot {TOKEN}"


def test_the_child_process_reports_a_bad_token_and_a_refusal() -> None:
    with server(lambda n: (401, {}, b"{}")) as (base, _):
        with pytest.raises(BadToken):
            fetch_in_child(base, TOKEN)
    with server(lambda n: (404, {}, b"{}")) as (base, _):
        with pytest.raises(RuntimeError, match="404"):
            fetch_in_child(base, TOKEN)
