"""The shard core's plain types: its phase, its configuration, a session, a connect plan.

msgspec structs, not dataclasses, as in :mod:`spectacles_gateway.config.schema`: the supervisor
loads this module too, and ``dataclasses`` would bring ``inspect`` (and ``ast``, ``dis``,
``tokenize``) into a process that uses none of them (about 0.9 MiB).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from .identify import identify_payload

__all__ = ["ConnectPlan", "Delay", "Phase", "Session", "ShardConfig"]


class Phase(enum.Enum):
    DISCONNECTED = "disconnected"
    WAITING_HELLO = "waiting_hello"
    IDENTIFYING = "identifying"
    RESUMING = "resuming"
    READY = "ready"
    CLOSING = "closing"
    STOPPED = "stopped"


class ConnectPlan(NamedTuple):
    url: str  # full URL with the query
    at: float  # connect no earlier than this time
    identify: bool  # True: the connection will IDENTIFY (take the identify gate first)
    reason: str


class Session(msgspec.Struct):
    """What a RESUME needs. ``seq`` is the last *confirmed* sequence number."""

    session_id: str
    seq: int | None
    resume_url: str | None


class ShardConfig(msgspec.Struct, frozen=True):
    shard_id: int
    shard_count: int
    token: str  # never in repr(): see __repr__
    intents: int
    gateway_url: str  # bare base URL: from /gateway/bot or an override
    version: int = 10
    encoding: str = "json"
    compress: str | None = "zstd-stream"
    large_threshold: int = 250
    presence: Mapping[str, Any] | None = None
    properties: Mapping[str, str] = msgspec.field(
        default_factory=lambda: {
            "os": "linux",
            "browser": "spectacles-gateway",
            "device": "spectacles-gateway",
        }
    )
    events: frozenset[str] | None = None  # None: publish every dispatch
    hello_timeout: float = 20.0
    send_limit: int = 120
    send_period: float = 60.0
    heartbeat_reserve: int = 3
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    #: HELLO's interval is clamped into this range (seconds): Discord sends 41.25 s.
    heartbeat_range: tuple[float, float] = (0.25, 900.0)
    #: Commands waiting for the send limit, per shard: at most this many, this old (seconds).
    command_queue_limit: int = 1000
    command_max_age: float = 120.0
    #: Start in standby: connect, identify and read, publish nothing until
    #: :meth:`~.shard.ShardProtocol.start_publishing` (the new generation of a reshard).
    standby: bool = False

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__struct_fields__ if name != "token"
        )
        return f"ShardConfig({shown})"

    def __rich_repr__(self) -> Any:
        return [(n, getattr(self, n)) for n in self.__struct_fields__ if n != "token"]

    def identify_payload(self) -> bytes:
        """The IDENTIFY this shard sends (raises ValueError when it is over 4096 bytes)."""
        return identify_payload(
            token=self.token,
            intents=self.intents,
            properties=self.properties,
            large_threshold=self.large_threshold,
            shard=(self.shard_id, self.shard_count),
            presence=self.presence,
        )


class Delay(enum.Enum):
    """How long to wait before the next connection, decided when a connection ends."""

    NOW = "now"
    BACKOFF = "backoff"  # exponential backoff with jitter (repeated failures)
    INVALID_SESSION = "invalid_session"  # 1-5 s (discord.md §7, op 9)
