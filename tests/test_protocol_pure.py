"""Table tests of the pure protocol pieces: URLs, close codes, backoff, send limiter."""

from __future__ import annotations

import pytest

from spectacles_gateway.protocol.backoff import backoff_delay
from spectacles_gateway.protocol.closecodes import CloseAction, classify_close, describe_close
from spectacles_gateway.protocol.identify import SessionBudget, bucket_of
from spectacles_gateway.protocol.limiter import SendLimiter
from spectacles_gateway.protocol.urls import build_gateway_url

Q = "v=10&encoding=json&compress=zstd-stream"


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("wss://gateway.discord.gg/", f"wss://gateway.discord.gg/?{Q}"),
        ("wss://gateway.discord.gg", f"wss://gateway.discord.gg/?{Q}"),
        ("wss://gateway-us-east1-b.discord.gg", f"wss://gateway-us-east1-b.discord.gg/?{Q}"),
        ("ws://127.0.0.1:9000/resume-gw", f"ws://127.0.0.1:9000/resume-gw?{Q}"),
        ("wss://g.example/?v=9&encoding=etf", f"wss://g.example/?{Q}"),
        ("wss://g.example/?x=1", f"wss://g.example/?{Q}&x=1"),
    ],
)
def test_gateway_url_gets_our_query_in_every_form(base: str, expected: str) -> None:
    assert build_gateway_url(base, version=10, compress="zstd-stream") == expected


@pytest.mark.parametrize("compress", [None, "none"])
def test_gateway_url_without_compression(compress: str | None) -> None:
    url = build_gateway_url("wss://g.example", version=10, compress=compress)
    assert url == "wss://g.example/?v=10&encoding=json"


@pytest.mark.parametrize("bad", ["https://discord.com/", "gateway.discord.gg", "wss://"])
def test_gateway_url_rejects_non_websocket_urls(bad: str) -> None:
    with pytest.raises(ValueError, match=r"ws|host"):
        build_gateway_url(bad, version=10)


CLOSE_TABLE = [
    (None, CloseAction.RESUME),
    (1000, CloseAction.RESUME),  # server-sent 1000/1001: proxies do it; op 9 tells if it's gone
    (1001, CloseAction.RESUME),
    (1006, CloseAction.RESUME),
    (1011, CloseAction.RESUME),
    (4000, CloseAction.RESUME),
    (4001, CloseAction.RESUME),
    (4002, CloseAction.RESUME),
    (4003, CloseAction.IDENTIFY),
    (4004, CloseAction.FATAL),
    (4005, CloseAction.RESUME),
    (4006, CloseAction.RESUME),  # not a gateway code: unknown 4xxx resumes
    (4007, CloseAction.IDENTIFY),
    (4008, CloseAction.RESUME),
    (4009, CloseAction.IDENTIFY),
    (4010, CloseAction.FATAL),
    (4011, CloseAction.FATAL),
    (4012, CloseAction.FATAL),
    (4013, CloseAction.FATAL),
    (4014, CloseAction.FATAL),
    (4999, CloseAction.RESUME),
]


@pytest.mark.parametrize(("code", "action"), CLOSE_TABLE)
def test_close_code_classification(code: int | None, action: CloseAction) -> None:
    assert classify_close(code) is action


def test_close_descriptions_name_the_code() -> None:
    assert describe_close(4004) == "4004 authentication failed"
    assert describe_close(None) == "no close frame"
    assert describe_close(4321) == "4321 unknown close code"


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (0, 0.9, 0.0),
        (1, 0.0, 0.5),
        (1, 1.0, 1.0),
        (2, 0.5, 1.5),
        (3, 0.0, 2.0),
        (7, 1.0, 60.0),  # 64 capped at 60
        (20, 0.0, 30.0),
    ],
)
def test_backoff_is_exponential_with_jitter_and_capped(
    attempt: int, rand: float, expected: float
) -> None:
    assert backoff_delay(attempt, rand) == pytest.approx(expected)


def test_backoff_grows_monotonically_for_the_same_jitter() -> None:
    delays = [backoff_delay(n, 0.3) for n in range(1, 10)]
    assert delays == sorted(delays)
    assert delays[-1] <= 60.0


def test_limiter_never_allows_more_than_the_limit_in_any_window() -> None:
    limiter = SendLimiter(120, 60.0, reserved=3)
    sent: list[float] = []
    now = 0.0
    queued = 130
    while queued and now < 200:
        if limiter.try_acquire(now):
            sent.append(now)
            queued -= 1
        else:
            now = limiter.next_free(now)
    assert len(sent) == 130
    for t in sent:
        assert sum(1 for u in sent if t <= u < t + 60.0) <= 117  # normal sends keep 3 slots free
    assert sent[116] == 0.0 and sent[117] == pytest.approx(61.5)  # 60 s + 2.5 % safety


def test_limiter_reserved_slots_serve_priority_sends_only() -> None:
    limiter = SendLimiter(5, 10.0, reserved=2)
    assert [limiter.try_acquire(0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.try_acquire(0.0, priority=True)
    assert limiter.try_acquire(0.0, priority=True)
    assert not limiter.try_acquire(0.0, priority=True)
    assert limiter.next_free(1.0, priority=True) == pytest.approx(10.25)
    assert limiter.in_window(10.0) == 5
    assert limiter.in_window(10.25) == 0


def test_identify_buckets_and_budget() -> None:
    assert [bucket_of(i, 4) for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert bucket_of(7, 1) == 0
    budget = SessionBudget(total=2, remaining=1, reset_at=100.0)
    assert budget.wait_before_identify(0.0) == 0.0
    budget.spend(1.0)
    assert budget.remaining == 0
    assert budget.wait_before_identify(10.0) == 90.0
    assert budget.wait_before_identify(100.0) == 0.0
    budget.spend(100.0, reset_after=50.0)
    assert (budget.remaining, budget.reset_at) == (1, 150.0)
