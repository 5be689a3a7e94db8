"""Go-style duration parsing and formatting."""

from __future__ import annotations

import pytest

from spectacles_gateway.durations import (
    MAX_DURATION_NS,
    DurationError,
    format_duration,
    parse_duration,
    parse_duration_ns,
)

S = 1_000_000_000


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("2m", 120 * S),
        ("90s", 90 * S),
        ("1h30m", 5400 * S),
        ("1.5s", 1_500_000_000),
        ("300ms", 300_000_000),
        ("1us", 1_000),
        ("1\u00b5s", 1_000),  # micro sign
        ("1\u03bcs", 1_000),  # Greek mu
        ("100ns", 100),
        (".5s", 500_000_000),
        ("1.s", S),
        ("1h1m1s", 3661 * S),
        ("2h45m0.5s", (2 * 3600 + 45 * 60) * S + 500_000_000),
        ("1.000000001s", S + 1),
        ("1.0000000019s", S + 1),  # below a nanosecond is truncated, as in Go
        ("0s", 0),
        ("0.0s", 0),
        ("1m1m", 120 * S),  # Go accepts repeated units
        (" 2m ", 120 * S),  # surrounding spaces (env values) are ignored
        ("2562047h", 2562047 * 3600 * S),
    ],
)
def test_parse_valid(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns
    assert parse_duration(text) == ns / S


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("2", "missing unit"),
        ("1.5", "missing unit"),
        ("0.0", "missing unit"),  # only a bare 0 may omit the unit, as in Go
        ("1m30", "missing unit"),
        ("-1s", "negative"),
        ("+1s", "negative"),
        ("2M", "unknown unit 'M'"),
        ("2 m", "unknown unit ' m'"),
        ("1d", "unknown unit 'd'"),
        ("2 minutes", "unknown unit"),
        ("1e3s", "unknown unit 'e'"),
        ("s", "expected a number"),
        (".s", "expected a number"),
        (".", "expected a number"),
        ("1.5.5s", "missing unit"),
        ("abc", "expected a number"),
        ("1h-1m", "unknown unit 'h-'"),
        ("2562048h", "too large"),
        ("99999999999999999999ns", "too large"),
    ],
)
def test_parse_invalid(text: str, fragment: str) -> None:
    with pytest.raises(DurationError, match=None) as info:
        parse_duration(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (120, "2m"),
        (90, "1m30s"),
        (5400, "1h30m"),
        (3661, "1h1m1s"),
        (7200, "2h"),
        (1.5, "1.5s"),
        (0.3, "300ms"),
        (0.0015, "1.5ms"),
        (0.0000015, "1.5us"),
        (5e-9, "5ns"),
        (3600.25, "1h0.25s"),
    ],
)
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize("seconds", [0.001, 1, 20.0, 59.999, 61.5, 86400 * 3 + 0.5, 1e-9])
def test_format_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


def test_format_negative_is_an_error() -> None:
    with pytest.raises(DurationError):
        format_duration(-1)


def test_max_is_int64() -> None:
    assert MAX_DURATION_NS == 2**63 - 1
    assert parse_duration_ns("9223372036854775807ns") == MAX_DURATION_NS
    with pytest.raises(DurationError, match="too large"):
        parse_duration_ns("9223372036854775808ns")
