"""Go-style durations (``time.ParseDuration``), as the seed's ``message_timeout`` used them.

A duration is ``0`` or a sequence of decimal numbers, each with an optional fraction and a
unit: ``2m``, ``90s``, ``1h30m``, ``1.5s``, ``300ms``, ``.5s``. Units are ``ns``, ``us``
(also ``µs``/``μs``), ``ms``, ``s``, ``m`` and ``h``, case-sensitive as in Go. Unlike Go, a
sign is rejected: no configuration value here can be negative.

Pure functions; :class:`DurationError` is a :class:`ValueError` whose message says what is
wrong with the text.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_DURATION_NS",
    "DurationError",
    "format_duration",
    "parse_duration",
    "parse_duration_ns",
]

_NS_PER_UNIT: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek small letter mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}

#: Go durations are an int64 of nanoseconds (about 292 years).
MAX_DURATION_NS = 2**63 - 1

_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


class DurationError(ValueError):
    """The text is not a Go-style duration."""


def parse_duration_ns(text: str) -> int:
    """Parse a Go-style duration into whole nanoseconds (fractions below 1 ns are truncated)."""
    s = text.strip()
    if s == "0":
        return 0
    if not s:
        raise DurationError("empty duration")
    if s[0] in "+-":
        raise DurationError(f"signed duration {text!r}: durations here cannot be negative")
    total = 0
    pos = 0
    while pos < len(s):
        match = _PART.match(s, pos)
        # The pattern can match the empty string; that only happens on a character that
        # starts neither a number nor a unit, which the checks below reject.
        assert match is not None
        whole, frac, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not frac:
            raise DurationError(f"invalid duration {text!r}: expected a number at {s[pos:]!r}")
        if not unit:
            raise DurationError(f"invalid duration {text!r}: missing unit after {match.group(0)!r}")
        per_unit = _NS_PER_UNIT.get(unit)
        if per_unit is None:
            raise DurationError(
                f"invalid duration {text!r}: unknown unit {unit!r} (expected ns, us, ms, s, m, h)"
            )
        total += int(whole or "0") * per_unit
        if frac:
            total += int(frac) * per_unit // 10 ** len(frac)
        if total > MAX_DURATION_NS:
            raise DurationError(f"invalid duration {text!r}: too large")
        pos = match.end()
    return total


def parse_duration(text: str) -> float:
    """Parse a Go-style duration into seconds (``"1h30m"`` -> ``5400.0``)."""
    return parse_duration_ns(text) / 1_000_000_000


def _decimal(ns: int, unit: int) -> str:
    whole, rest = divmod(ns, unit)
    if not rest:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}.{rest:0{digits}d}".rstrip("0")


def format_duration(seconds: float) -> str:
    """Format seconds as a Go-style duration that :func:`parse_duration` reads back.

    ``120`` -> ``"2m"``, ``5400`` -> ``"1h30m"``, ``1.5`` -> ``"1.5s"``, ``0.3`` -> ``"300ms"``,
    ``0`` -> ``"0s"``. Precision is one nanosecond.
    """
    if seconds < 0:
        raise DurationError(f"negative duration {seconds!r}")
    ns = round(seconds * 1_000_000_000)
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{_decimal(ns, 1_000)}us"
    if ns < 1_000_000_000:
        return f"{_decimal(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, _NS_PER_UNIT["h"])
    minutes, rest = divmod(rest, _NS_PER_UNIT["m"])
    out = ""
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if rest:
        out += f"{_decimal(rest, 1_000_000_000)}s"
    return out
