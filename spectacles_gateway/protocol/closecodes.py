"""What to do after a gateway connection closed, by close code (discord.md §9)."""

from __future__ import annotations

import enum

__all__ = [
    "FATAL_CODES",
    "RESUMABLE_CLOSE",
    "SESSION_END_CLOSE",
    "SHARDING_REQUIRED",
    "CloseAction",
    "classify_close",
    "describe_close",
]

#: The code we close with when the session must stay resumable (reconnect, zombie, op 7, op 9
#: true, decode errors). Anything but 1000/1001 keeps the session; 4000 is what discord.py uses.
RESUMABLE_CLOSE = 4000
#: The code we close with only when the session is meant to end.
SESSION_END_CLOSE = 1000


class CloseAction(enum.Enum):
    """The three outcomes of a closed connection."""

    RESUME = "resume"  # reconnect and RESUME the session (identify if there is none)
    IDENTIFY = "identify"  # the session is dead: drop it, reconnect and IDENTIFY
    FATAL = "fatal"  # never reconnect: configuration or credentials are wrong


_DESCRIPTIONS = {
    1000: "normal closure",
    1001: "going away",
    1006: "abnormal closure (no close frame)",
    1011: "internal error",
    4000: "unknown error",
    4001: "unknown opcode",
    4002: "decode error",
    4003: "not authenticated",
    4004: "authentication failed",
    4005: "already authenticated",
    4007: "invalid seq",
    4008: "rate limited",
    4009: "session timed out",
    4010: "invalid shard",
    4011: "sharding required",
    4012: "invalid API version",
    4013: "invalid intents",
    4014: "disallowed intents",
}

#: Codes after which reconnecting cannot help (discord.md §9, "reconnect: false").
#: Discord wants more shards: the shard holds too many guilds (a reshard is the way on).
SHARDING_REQUIRED = 4011
FATAL_CODES = frozenset({4004, 4010, 4011, 4012, 4013, 4014})
_NEW_SESSION_CODES = frozenset({4003, 4007, 4009})
#: Codes that mean we sent something wrong: still resumable, but worth a loud log line.
OUR_BUG_CODES = frozenset({4001, 4002, 4005, 4008})


def classify_close(code: int | None) -> CloseAction:
    """Classify a close code received from the server (``None``: no close frame, TCP drop).

    Server-sent 1000/1001 are treated as resumable (proxies send them); if the session is in fact
    gone, the server answers the RESUME with op 9 and we identify then. Unknown 4xxx codes resume
    with backoff, as discord.md §9 advises.
    """
    if code is None:
        return CloseAction.RESUME
    if code in FATAL_CODES:
        return CloseAction.FATAL
    if code in _NEW_SESSION_CODES:
        return CloseAction.IDENTIFY
    return CloseAction.RESUME


def describe_close(code: int | None) -> str:
    """``"4004 authentication failed"``: a code and its meaning, for log lines."""
    if code is None:
        return "no close frame"
    return f"{code} {_DESCRIPTIONS.get(code, 'unknown close code')}"
