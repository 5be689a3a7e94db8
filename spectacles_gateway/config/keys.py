"""The key table: one row per setting, with its dotted path, environment name and converter.

``KEYS`` is the single list of keys; ``config/gateway.toml`` documents each row, the settings
structs in :mod:`.schema` have one field per row (a test keeps the two in step), and the TOML
dump, the unknown-key suggestions and the error messages all read it.
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

from spectacles_gateway.redact import MASK, Redactor, redact_url

from . import converters as c
from .errors import ConfigError
from .presence import presence

__all__ = ["BY_PATH", "KEYS", "KEY_ALIASES", "LOG_LEVELS", "TABLES", "KeySpec", "convert"]

LOG_LEVELS: dict[str, int] = {
    "suppress": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}

Kind = Literal["", "token", "url", "userinfo-url", "duration", "size"]

_MIB = 1024 * 1024


class KeySpec(NamedTuple):
    """A configuration key: dotted ``path``, ``env`` name, converter and ``kind``.

    ``kind`` says how the value is shown: ``token`` as ``***``; ``url`` with its password and
    password-like query parameters masked; ``userinfo-url`` with the whole user-info masked
    too; ``duration`` and ``size`` in their text forms (``2m``, ``64MiB``).
    """

    path: str
    env: str
    convert: c.Convert
    kind: Kind = ""
    empty_is_value: bool = False  # ``""`` in the file is a value, not "unset"

    def display(self, value: object) -> object:
        """``value`` as it may be shown in an error or the printed configuration."""
        if self.kind == "token":
            return MASK
        if self.kind in ("url", "userinfo-url") and isinstance(value, str):
            return redact_url(value, whole_userinfo=self.kind == "userinfo-url")
        return value


KEYS: tuple[KeySpec, ...] = (
    KeySpec("token", "DISCORD_TOKEN", c.token, kind="token"),
    KeySpec("token_file", "DISCORD_TOKEN_FILE", c.any_string),
    KeySpec("events", "DISCORD_EVENTS", c.events),
    KeySpec("intents", "DISCORD_INTENTS", c.intent_names),
    KeySpec("raw_intents", "DISCORD_RAW_INTENTS", c.raw_intents),
    KeySpec("gateway_version", "DISCORD_GATEWAY_VERSION", c.int_range(1)),
    KeySpec("log_level", "LOG_LEVEL", c.choice(*LOG_LEVELS, aliases={"warning": "warn"})),
    KeySpec("presence", "DISCORD_PRESENCE", presence),
    KeySpec("shards.count", "DISCORD_SHARD_COUNT", c.NON_NEGATIVE),
    KeySpec("shards.ids", "DISCORD_SHARD_IDS", c.shard_ids),
    KeySpec("broker.type", "BROKER_TYPE", c.choice("stdio", "amqp", "redis")),
    KeySpec("broker.group", "BROKER_GROUP", c.group),
    KeySpec(
        "broker.message_timeout",
        "BROKER_MESSAGE_TIMEOUT",
        c.duration(zero_is_default=True),
        kind="duration",
    ),
    KeySpec("broker.format", "BROKER_FORMAT", c.choice("msgpack", "json")),
    KeySpec("broker.buffer", "BROKER_BUFFER", c.int_range(1)),
    KeySpec("stdio.format", "STDIO_FORMAT", c.choice("json", "msgpack")),
    KeySpec("prometheus.address", "PROMETHEUS_ADDRESS", c.listen_address),
    KeySpec("prometheus.endpoint", "PROMETHEUS_ENDPOINT", c.endpoint),
    KeySpec("prometheus.max_clients", "PROMETHEUS_MAX_CLIENTS", c.int_range(1, 65535)),
    KeySpec("prometheus.shard_series", "PROMETHEUS_SHARD_SERIES", c.choice("all", "minimal")),
    KeySpec("shard_store.type", "SHARD_STORE_TYPE", c.choice("memory", "redis")),
    KeySpec("shard_store.prefix", "SHARD_STORE_PREFIX", c.any_string, empty_is_value=True),
    KeySpec("shard_store.session_ttl", "SHARD_STORE_SESSION_TTL", c.duration(), kind="duration"),
    KeySpec("amqp.url", "AMQP_URL", c.amqp_url, kind="url"),
    KeySpec("amqp.persistent", "AMQP_PERSISTENT", c.boolean),
    KeySpec("amqp.prefetch", "AMQP_PREFETCH", c.int_range(1)),
    KeySpec("redis.url", "REDIS_URL", c.redis_url, kind="url"),
    KeySpec("redis.pool_size", "REDIS_POOL_SIZE", c.int_range(1)),
    KeySpec("redis.stream_prefix", "REDIS_STREAM_PREFIX", c.any_string, empty_is_value=True),
    KeySpec("redis.maxlen", "REDIS_STREAM_MAXLEN", c.int_range(1)),
    KeySpec("redis.sentinels", "REDIS_SENTINELS", c.sentinels),
    KeySpec("redis.sentinel_master", "REDIS_SENTINEL_MASTER", c.sentinel_master),
    KeySpec("api.scheme", "DISCORD_API_PROTOCOL", c.choice("https", "http")),
    KeySpec("api.host", "DISCORD_API_HOST", c.api_host),
    KeySpec("api.version", "DISCORD_API_VERSION", c.int_range(1)),
    KeySpec("gateway.url", "DISCORD_GATEWAY_URL", c.gateway_url, kind="userinfo-url"),
    KeySpec(
        "gateway.compression",
        "DISCORD_COMPRESSION",
        c.choice("zstd-stream", "zlib-stream", "none"),
    ),
    KeySpec("gateway.large_threshold", "DISCORD_LARGE_THRESHOLD", c.int_range(50, 250)),
    KeySpec("gateway.hello_timeout", "DISCORD_HELLO_TIMEOUT", c.duration(), kind="duration"),
    KeySpec("gateway.open_timeout", "DISCORD_OPEN_TIMEOUT", c.duration(), kind="duration"),
    KeySpec("gateway.shutdown_timeout", "DISCORD_SHUTDOWN_TIMEOUT", c.duration(), kind="duration"),
    KeySpec(
        "gateway.max_message_size",
        "DISCORD_MAX_MESSAGE_SIZE",
        c.size(_MIB, 2048 * _MIB),
        kind="size",
    ),
    KeySpec("commands.queue_limit", "COMMAND_QUEUE_LIMIT", c.int_range(1, 1_000_000)),
    KeySpec("commands.max_age", "COMMAND_MAX_AGE", c.duration(), kind="duration"),
    KeySpec("supervisor.workers", "SUPERVISOR_WORKERS", c.NON_NEGATIVE),
    KeySpec("supervisor.shards_per_worker", "SUPERVISOR_SHARDS_PER_WORKER", c.NON_NEGATIVE),
    KeySpec("supervisor.stall_timeout", "SUPERVISOR_STALL_TIMEOUT", c.duration(), kind="duration"),
    KeySpec(
        "supervisor.input_buffer",
        "SUPERVISOR_INPUT_BUFFER",
        c.size(64 * 1024, 1024 * _MIB),
        kind="size",
    ),
    KeySpec("fleet.name", "FLEET_NAME", c.identifier("a fleet name", 64)),
    KeySpec("fleet.member", "FLEET_MEMBER", c.identifier("a member id", 128)),
    KeySpec("fleet.capacity", "FLEET_CAPACITY", c.NON_NEGATIVE),
    KeySpec("fleet.lease", "FLEET_LEASE", c.duration(minimum=1.0), kind="duration"),
    KeySpec("reshard.policy", "RESHARD_POLICY", c.choice("off", "recommended", "manual")),
    KeySpec(
        "reshard.check_interval",
        "RESHARD_CHECK_INTERVAL",
        c.duration(minimum=1.0),
        kind="duration",
    ),
    KeySpec("reshard.budget_reserve", "RESHARD_BUDGET_RESERVE", c.NON_NEGATIVE),
    KeySpec("reshard.timeout", "RESHARD_TIMEOUT", c.duration(minimum=1.0), kind="duration"),
    KeySpec("reshard.overlap", "RESHARD_OVERLAP", c.duration(), kind="duration"),
)

BY_PATH: dict[str, KeySpec] = {spec.path: spec for spec in KEYS}
TABLES = frozenset(spec.path.rpartition(".")[0] for spec in KEYS if "." in spec.path)
#: The seed's other spellings (matched after lower-casing).
KEY_ALIASES = {"rawintents": "raw_intents", "broker.url": "amqp.url"}


def convert(
    spec: KeySpec, raw: c.Raw, warnings: list[str], redactor: Redactor | None = None
) -> object:
    """Convert one given value; ``redactor`` scrubs secrets given elsewhere from the error."""
    try:
        return spec.convert(raw.value, raw, warnings)
    except c.Bad as bad:
        path = spec.path
        if bad.subkey is not None:
            path = f"{path}.{bad.subkey}"
        value = spec.display(raw.value if bad.whole else bad.value)
        reason = bad.reason
        if redactor is not None:
            reason = redactor.redact(reason)
            if isinstance(value, str):
                value = redactor.redact(value)
        raise ConfigError(path, value, bad.allowed, env=spec.env, reason=reason) from None


def key_error(path: str, value: object, allowed: str, *, reason: str) -> ConfigError:
    """The :class:`ConfigError` for a rule that spans keys, named after the key at ``path``."""
    spec = BY_PATH[path]
    return ConfigError(path, spec.display(value), allowed, env=spec.env, reason=reason)
