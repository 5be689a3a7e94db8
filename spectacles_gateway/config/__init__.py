"""Configuration: the TOML file, then the environment, then command-line flags.

:func:`load` reads and validates everything once, into a frozen :class:`Settings`; it has no
side effects apart from reading the TOML file and the token's file (no logging, no
``os.environ``, no exit). :func:`run_or_exit` is the command-line convenience around it.

Every key has a dotted name (``broker.type``) and an environment name (``BROKER_TYPE``); the
table :data:`KEYS` is the single list of both, and ``config/gateway.toml`` documents each.
A bad value is a :class:`ConfigError` naming the dotted key, the environment name, the value
and what is allowed; secrets never appear in it (the token is ``***``, URL passwords and
password-like query parameters ``***``).

The package, by job: :mod:`.schema` (the frozen settings), :mod:`.converters` (one per kind of
value: the only validation), :mod:`.keys` (the key table), :mod:`.sources` (layering, unknown
keys, the token's files), :mod:`.cli` (flags, sub-commands, ``--print-config``). It imports
none of asyncio, pydantic, prometheus_client, websockets, pika, redis or zstandard: the
supervisor loads it before anything else and must stay small.
"""

from __future__ import annotations

from spectacles_gateway.exitcodes import EX_CONFIG
from spectacles_gateway.redact import SecretStr

from .cli import PROG, load, parse_args, redacted_dump, run_or_exit
from .errors import ConfigError, HelpRequested, VersionRequested
from .keys import KEYS, KeySpec
from .schema import (
    DEFAULT_CONFIG_PATH,
    AmqpSettings,
    ApiSettings,
    BrokerSettings,
    CliArgs,
    CommandsSettings,
    FleetSettings,
    GatewaySettings,
    Loaded,
    PrometheusSettings,
    RedisSettings,
    ReshardCommand,
    ReshardSettings,
    Settings,
    ShardsSettings,
    ShardStoreSettings,
    StatusCommand,
    StdioSettings,
    SupervisorSettings,
)
from .sources import DOCKER_SECRETS_DIR, SIMULATED_TOKEN, TOKEN_CREDENTIAL, read_token_file

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DOCKER_SECRETS_DIR",
    "EX_CONFIG",
    "KEYS",
    "PROG",
    "SIMULATED_TOKEN",
    "TOKEN_CREDENTIAL",
    "AmqpSettings",
    "ApiSettings",
    "BrokerSettings",
    "CliArgs",
    "CommandsSettings",
    "ConfigError",
    "FleetSettings",
    "GatewaySettings",
    "HelpRequested",
    "KeySpec",
    "Loaded",
    "PrometheusSettings",
    "RedisSettings",
    "ReshardCommand",
    "ReshardSettings",
    "SecretStr",
    "Settings",
    "ShardStoreSettings",
    "ShardsSettings",
    "StatusCommand",
    "StdioSettings",
    "SupervisorSettings",
    "VersionRequested",
    "load",
    "parse_args",
    "read_token_file",
    "redacted_dump",
    "run_or_exit",
]
