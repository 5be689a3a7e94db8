"""Build a worker's broker, shard store and identify gate from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .brokers.base import Broker
from .brokers.stdio import StdioBroker
from .store import MemoryStore, ShardStore

if TYPE_CHECKING:
    from .config import Settings
    from .plan import WorkerPlan
    from .transport import IdentifyGateLike

__all__ = ["make_broker", "make_gate", "make_store"]


def make_broker(
    settings: Settings,
    plan: WorkerPlan,
    *,
    confirm_on_relay: bool = False,
    stdout_lock: int | None = None,
) -> Broker:
    kind = settings.broker.type
    if kind == "amqp":
        from .brokers.amqp import AmqpBroker

        return AmqpBroker.from_settings(settings, plan)
    if kind == "redis":
        from .brokers.redis_streams import RedisStreamsBroker

        return RedisStreamsBroker.from_settings(settings, plan)
    return StdioBroker(
        settings.stdio.format,
        confirm_on_relay=confirm_on_relay,
        direct_lock=stdout_lock,
        generation=plan.generation,
    )


def make_store(settings: Settings, generation: int = 0) -> ShardStore:
    if settings.shard_store.type == "redis":
        from .redis_store import RedisStore

        return RedisStore.from_settings(settings, generation)
    return MemoryStore()


def make_gate(settings: Settings, plan: WorkerPlan, local: IdentifyGateLike) -> IdentifyGateLike:
    """With the Redis shard store, identifies are paced through Redis, across every process
    and host that shares it (after ``local``, which keeps the session start budget);
    otherwise ``local`` (this process, or its supervisor) paces them."""
    if settings.shard_store.type == "redis":
        from .redis_gate import RedisIdentifyGate

        return RedisIdentifyGate.from_settings(settings, plan, local=local)
    return local
