"""What a worker runs: its shards and how to talk to Discord. Built by the supervisor, sent to
the worker over the control channel (so no secret is ever on a command line), read back here.

Dependency-free (msgspec and the pure protocol core only): the supervisor imports it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .protocol.state import ShardConfig

__all__ = ["DEFAULT_MAX_MESSAGE", "WorkerPlan"]

#: The largest gateway message accepted by default (64 MiB: well above the largest real
#: GUILD_CREATE), compressed, reassembled and decompressed.
DEFAULT_MAX_MESSAGE = 64 << 20


class WorkerPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker needs to run its shards."""

    shard_ids: tuple[int, ...]
    shard_count: int
    token: str
    intents: int
    gateway_url: str
    events: frozenset[str] | None = None  # None: every dispatch
    version: int = 10
    compress: str | None = "zstd-stream"
    large_threshold: int = 250
    presence: dict[str, Any] | None = None
    hello_timeout: float = 20.0
    open_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    max_concurrency: int = 1
    worker_id: int = 0
    send_limit: int = 120  # per connection per send_period (Discord: 120 per 60 s)
    send_period: float = 60.0
    max_message_size: int = DEFAULT_MAX_MESSAGE
    command_queue_limit: int = 1000
    command_max_age: float = 120.0
    #: Which side of a reshard this is (published with every event); 0 before any reshard.
    generation: int = 0
    #: Discord's daily session start budget as last seen: (total, remaining, reset time in Unix
    #: ms). Seeds the budget the Redis identify gate keeps for every host (None: unknown).
    session_budget: tuple[int, int, int] | None = None
    #: A reshard's new generation, before the switch: run the shards, publish nothing ...
    standby: bool = False
    #: ... but the events of these shards of the running generation (of ``cover_count``
    #: shards), which Discord refused for good (4011): nobody else publishes them.
    cover: frozenset[int] = frozenset()
    cover_count: int = 0

    def __repr__(self) -> str:  # the token stays out of every repr
        return (
            f"WorkerPlan(worker_id={self.worker_id}, shard_ids={self.shard_ids}, "
            f"shard_count={self.shard_count}, gateway_url={self.gateway_url!r})"
        )

    def shard_config(self, shard_id: int) -> ShardConfig:
        return ShardConfig(
            shard_id=shard_id,
            shard_count=self.shard_count,
            token=self.token,
            intents=self.intents,
            gateway_url=self.gateway_url,
            version=self.version,
            compress=self.compress,
            large_threshold=self.large_threshold,
            presence=self.presence,
            events=self.events,
            hello_timeout=self.hello_timeout,
            send_limit=self.send_limit,
            send_period=self.send_period,
            command_queue_limit=self.command_queue_limit,
            command_max_age=self.command_max_age,
            standby=self.standby,
        )

    def for_worker(self, worker_id: int, shard_ids: tuple[int, ...]) -> WorkerPlan:
        return msgspec.structs.replace(self, worker_id=worker_id, shard_ids=shard_ids)
