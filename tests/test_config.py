"""Configuration: file < environment < flags, every key and env name, errors and warnings."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from spectacles_gateway.config import (
    EX_CONFIG,
    KEYS,
    SIMULATED_TOKEN,
    BrokerSettings,
    CliArgs,
    ConfigError,
    FleetSettings,
    HelpRequested,
    Loaded,
    ReshardCommand,
    SecretStr,
    Settings,
    ShardsSettings,
    StatusCommand,
    SupervisorSettings,
    VersionRequested,
    load,
    parse_args,
    redacted_dump,
    run_or_exit,
)
from spectacles_gateway.config.converters import format_size, parse_size
from spectacles_gateway.redact import Redactor, redact_url

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "gateway.toml"
TOKEN = "MTA0NTY3ODkw.GhIjKl.secret-token-value"
MIB = 1024 * 1024
BASE_ENV = {"DISCORD_TOKEN": TOKEN}

Get = Callable[[Settings], object]


@pytest.fixture(autouse=True)
def _in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ./gateway.toml, so the default config file is missing (which is fine)."""
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path: Path, text: str, name: str = "gw.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_with(
    tmp_path: Path,
    toml: str | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
    *,
    base_env: Mapping[str, str] = BASE_ENV,
    secrets_dir: Path | None = None,
) -> Loaded:
    """load() with a config file written from ``toml``; Docker secrets are looked for in
    ``secrets_dir`` (by default a directory that does not exist, not this machine's)."""
    args = list(argv)
    if toml is not None:
        args = ["--config", write_config(tmp_path, toml), *args]
    where = secrets_dir or tmp_path / "no-docker-secrets"
    return load(args, {**base_env, **(env or {})}, secrets_dir=str(where))


def error_of(
    tmp_path: Path,
    toml: str | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
    *,
    base_env: Mapping[str, str] = BASE_ENV,
    secrets_dir: Path | None = None,
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, toml, env, argv, base_env=base_env, secrets_dir=secrets_dir)
    message = str(info.value)
    assert "\n" not in message
    assert TOKEN not in message
    return info.value


def model_keys(model: type[msgspec.Struct], prefix: str = "") -> Iterator[str]:
    """Every dotted key of the settings struct (sub-structs are TOML tables)."""
    for field in msgspec.structs.fields(model):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            yield from model_keys(field.type, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}"


# --------------------------------------------------------------------------------------------
# Defaults and the key table


def test_defaults(tmp_path: Path) -> None:
    loaded = load_with(tmp_path)
    s = loaded.settings
    assert loaded.warnings == ()
    assert loaded.cli == CliArgs()
    assert s.token.get_secret_value() == TOKEN
    assert s.events == frozenset()
    assert not s.publish_all
    assert (s.intents, s.raw_intents, s.gateway_version) == (0, 0, 10)
    assert s.log_level == "info"
    assert s.logging_level == logging.INFO
    assert s.presence is None
    assert (s.shards.count, s.shards.ids) == (0, ())
    assert (s.broker.type, s.broker.group, s.broker.format) == ("stdio", "gateway", "msgpack")
    assert s.broker.message_timeout == 120.0
    assert s.stdio.format == "json"
    assert (s.prometheus.address, s.prometheus.endpoint) == ("", "/metrics")
    assert not s.prometheus.enabled
    assert (s.shard_store.type, s.shard_store.prefix) == ("memory", "gateway")
    assert s.amqp.url == "amqp://guest:guest@localhost:5672/%2F"
    assert (s.redis.url, s.redis.pool_size, s.redis.dsn) == (
        "localhost:6379",
        5,
        "redis://localhost:6379",
    )
    assert s.api.base_url == "https://discord.com/api/v10"
    assert (s.gateway.url, s.gateway.compression, s.gateway.large_threshold) == (
        "",
        "zstd-stream",
        250,
    )
    assert (s.gateway.hello_timeout, s.gateway.open_timeout, s.gateway.shutdown_timeout) == (
        20.0,
        10.0,
        10.0,
    )
    assert (s.supervisor.workers, s.supervisor.shards_per_worker) == (0, 0)


def defaults_with_member(settings: Settings) -> Settings:
    """The struct defaults, with the fleet member id that load() resolved (host and pid)."""
    fleet = msgspec.structs.replace(FleetSettings(), member=settings.fleet.member)
    return Settings(token=SecretStr(TOKEN), fleet=fleet)


def test_loaded_defaults_equal_model_defaults(tmp_path: Path) -> None:
    settings = load_with(tmp_path).settings
    assert settings == defaults_with_member(settings)


def test_key_table_matches_the_model() -> None:
    assert [spec.path for spec in KEYS] == list(model_keys(Settings))
    envs = [spec.env for spec in KEYS]
    assert len(set(envs)) == len(envs)


# --------------------------------------------------------------------------------------------
# Precedence: file < environment < flag

PRECEDENCE = [
    pytest.param(
        '[broker]\ntype = "amqp"',
        {"BROKER_TYPE": "redis"},
        None,
        lambda s: s.broker.type,
        ("amqp", "redis", None),
        id="broker.type",
    ),
    pytest.param(
        'log_level = "debug"',
        {"LOG_LEVEL": "error"},
        ["-loglevel", "warn"],
        lambda s: s.log_level,
        ("debug", "error", "warn"),
        id="log_level",
    ),
    pytest.param(
        "[shards]\ncount = 4",
        {"DISCORD_SHARD_COUNT": "8"},
        ["--shard-count", "16"],
        lambda s: s.shards.count,
        (4, 8, 16),
        id="shards.count",
    ),
    pytest.param(
        "[shards]\nids = [0, 1]",
        {"DISCORD_SHARD_IDS": "2-3"},
        ["--shards", "4,5"],
        lambda s: s.shards.ids,
        ((0, 1), (2, 3), (4, 5)),
        id="shards.ids",
    ),
    pytest.param(
        'events = ["READY"]',
        {"DISCORD_EVENTS": "MESSAGE_CREATE,GUILD_CREATE"},
        ["--events", "TYPING_START"],
        lambda s: s.events,
        (
            frozenset({"READY"}),
            frozenset({"MESSAGE_CREATE", "GUILD_CREATE"}),
            frozenset({"TYPING_START"}),
        ),
        id="events",
    ),
    pytest.param(
        '[gateway]\nurl = "ws://file:1"',
        {"DISCORD_GATEWAY_URL": "ws://env:2"},
        ["--gateway-url", "wss://flag:3/"],
        lambda s: s.gateway.url,
        ("ws://file:1", "ws://env:2", "wss://flag:3/"),
        id="gateway.url",
    ),
    pytest.param(
        "[supervisor]\nworkers = 2",
        {"SUPERVISOR_WORKERS": "3"},
        ["--workers", "4"],
        lambda s: s.supervisor.workers,
        (2, 3, 4),
        id="supervisor.workers",
    ),
    pytest.param(
        '[broker]\nmessage_timeout = "1m"',
        {"BROKER_MESSAGE_TIMEOUT": "1h30m"},
        None,
        lambda s: s.broker.message_timeout,
        (60.0, 5400.0, None),
        id="broker.message_timeout",
    ),
    pytest.param(
        'intents = ["GUILDS"]',
        {"DISCORD_INTENTS": "GUILD_MESSAGES"},
        None,
        lambda s: s.intents,
        (1, 512, None),
        id="intents",
    ),
]


@pytest.mark.parametrize(("toml", "env", "flags", "get", "expected"), PRECEDENCE)
def test_precedence(
    tmp_path: Path,
    toml: str,
    env: dict[str, str],
    flags: list[str] | None,
    get: Get,
    expected: tuple[object, object, object],
) -> None:
    from_file, from_env, from_flag = expected
    assert get(load_with(tmp_path, toml).settings) == from_file
    assert get(load_with(tmp_path, toml, env).settings) == from_env
    if flags is not None:
        assert get(load_with(tmp_path, toml, env, flags).settings) == from_flag
        assert get(load_with(tmp_path, toml, None, flags).settings) == from_flag


def test_token_precedence(tmp_path: Path) -> None:
    toml = 'token = "file-token"'
    assert load_with(tmp_path, toml, base_env={}).settings.token.get_secret_value() == (
        "file-token"
    )
    assert load_with(tmp_path, toml).settings.token.get_secret_value() == TOKEN


def test_empty_env_values_are_unset(tmp_path: Path) -> None:
    toml = '[broker]\ntype = "amqp"\n[shards]\ncount = 4'
    env = {"BROKER_TYPE": "", "DISCORD_SHARD_COUNT": "  "}
    s = load_with(tmp_path, toml, env).settings
    assert (s.broker.type, s.shards.count) == ("amqp", 4)


def test_empty_strings_in_the_file_mean_default(tmp_path: Path) -> None:
    toml = '[broker]\ntype = ""\ngroup = ""\n[api]\nhost = ""\n[shard_store]\nprefix = ""'
    s = load_with(tmp_path, toml).settings
    assert (s.broker.type, s.broker.group, s.api.host) == ("stdio", "gateway", "discord.com")
    assert s.shard_store.prefix == ""  # the one key where "" is a value
    assert load_with(tmp_path, toml, {"SHARD_STORE_PREFIX": ""}).settings.shard_store.prefix == ""


def test_load_does_not_read_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("BROKER_TYPE", "amqp")
    err = error_of(tmp_path, base_env={})
    assert err.key == "token"
    assert load_with(tmp_path).settings.broker.type == "stdio"


# --------------------------------------------------------------------------------------------
# Every environment name

PRODUCT_ENV_NAMES = {  # the seed's names, from product.md
    "DISCORD_TOKEN",
    "DISCORD_EVENTS",
    "DISCORD_INTENTS",
    "DISCORD_RAW_INTENTS",
    "DISCORD_GATEWAY_VERSION",
    "DISCORD_SHARD_COUNT",
    "DISCORD_SHARD_IDS",
    "BROKER_TYPE",
    "BROKER_GROUP",
    "BROKER_MESSAGE_TIMEOUT",
    "PROMETHEUS_ADDRESS",
    "PROMETHEUS_ENDPOINT",
    "SHARD_STORE_TYPE",
    "SHARD_STORE_PREFIX",
    "AMQP_URL",
    "REDIS_URL",
    "REDIS_POOL_SIZE",
    "DISCORD_PRESENCE",
    "DISCORD_API_PROTOCOL",
    "DISCORD_API_HOST",
    "DISCORD_API_VERSION",
}

ENV_CASES: list[tuple[str, str, Get, object]] = [
    ("DISCORD_TOKEN", "abc.def.ghi", lambda s: s.token.get_secret_value(), "abc.def.ghi"),
    (
        "DISCORD_EVENTS",
        " message_create, ,Guild_Create,MESSAGE_CREATE",
        lambda s: s.events,
        frozenset({"MESSAGE_CREATE", "GUILD_CREATE"}),
    ),
    ("DISCORD_INTENTS", "GUILDS, guild_messages,,GUILD_BANS", lambda s: s.intents, 517),
    ("DISCORD_RAW_INTENTS", "513", lambda s: (s.intents, s.raw_intents), (513, 513)),
    ("DISCORD_GATEWAY_VERSION", "9", lambda s: s.gateway_version, 9),
    ("DISCORD_SHARD_COUNT", "16", lambda s: s.shards.count, 16),
    ("DISCORD_SHARD_IDS", "8,0-3", lambda s: s.shards.ids, (0, 1, 2, 3, 8)),
    ("BROKER_TYPE", "AMQP", lambda s: s.broker.type, "amqp"),
    ("BROKER_GROUP", "mybot", lambda s: s.broker.group, "mybot"),
    ("BROKER_MESSAGE_TIMEOUT", "90s", lambda s: s.broker.message_timeout, 90.0),
    ("BROKER_FORMAT", "json", lambda s: s.broker.format, "json"),
    ("STDIO_FORMAT", "msgpack", lambda s: s.stdio.format, "msgpack"),
    (
        "PROMETHEUS_ADDRESS",
        ":8080",
        lambda s: (s.prometheus.address, s.prometheus.host, s.prometheus.port),
        (":8080", "0.0.0.0", 8080),
    ),
    ("PROMETHEUS_ENDPOINT", "/m", lambda s: s.prometheus.endpoint, "/m"),
    ("SHARD_STORE_TYPE", "redis", lambda s: s.shard_store.type, "redis"),
    ("SHARD_STORE_PREFIX", "bot:", lambda s: s.shard_store.prefix, "bot:"),
    (
        "DISCORD_PRESENCE",
        '{"status": "dnd", "activities": [{"name": "x", "type": 3}]}',
        lambda s: s.presence,
        {"since": None, "activities": [{"name": "x", "type": 3}], "status": "dnd", "afk": False},
    ),
    ("AMQP_URL", "amqps://u:p@rabbit:5671/vh", lambda s: s.amqp.url, "amqps://u:p@rabbit:5671/vh"),
    ("REDIS_URL", "redis-host:6380", lambda s: s.redis.dsn, "redis://redis-host:6380"),
    ("REDIS_POOL_SIZE", "9", lambda s: s.redis.pool_size, 9),
    ("DISCORD_API_PROTOCOL", "http", lambda s: s.api.scheme, "http"),
    ("DISCORD_API_HOST", "127.0.0.1:8000", lambda s: s.api.host, "127.0.0.1:8000"),
    ("DISCORD_API_VERSION", "9", lambda s: s.api.base_url, "https://discord.com/api/v9"),
    ("DISCORD_GATEWAY_URL", "ws://127.0.0.1:9000", lambda s: s.gateway.url, "ws://127.0.0.1:9000"),
    ("DISCORD_COMPRESSION", "none", lambda s: s.gateway.compression, "none"),
    ("DISCORD_LARGE_THRESHOLD", "50", lambda s: s.gateway.large_threshold, 50),
    ("DISCORD_HELLO_TIMEOUT", "5s", lambda s: s.gateway.hello_timeout, 5.0),
    ("DISCORD_OPEN_TIMEOUT", "1500ms", lambda s: s.gateway.open_timeout, 1.5),
    ("DISCORD_SHUTDOWN_TIMEOUT", "1m", lambda s: s.gateway.shutdown_timeout, 60.0),
    ("SUPERVISOR_WORKERS", "3", lambda s: s.supervisor.workers, 3),
    ("SUPERVISOR_SHARDS_PER_WORKER", "4", lambda s: s.supervisor.shards_per_worker, 4),
    ("BROKER_BUFFER", "500", lambda s: s.broker.buffer, 500),
    ("SUPERVISOR_STALL_TIMEOUT", "3s", lambda s: s.supervisor.stall_timeout, 3.0),
    ("AMQP_PERSISTENT", "true", lambda s: s.amqp.persistent, True),
    ("AMQP_PREFETCH", "7", lambda s: s.amqp.prefetch, 7),
    ("REDIS_STREAM_PREFIX", "discord:", lambda s: s.redis.stream_prefix, "discord:"),
    ("REDIS_STREAM_MAXLEN", "1000", lambda s: s.redis.maxlen, 1000),
    ("SHARD_STORE_SESSION_TTL", "90s", lambda s: s.shard_store.session_ttl, 90.0),
    ("LOG_LEVEL", "warning", lambda s: (s.log_level, s.logging_level), ("warn", logging.WARNING)),
    ("DISCORD_MAX_MESSAGE_SIZE", "2MiB", lambda s: s.gateway.max_message_size, 2 * MIB),
    ("COMMAND_QUEUE_LIMIT", "50", lambda s: s.commands.queue_limit, 50),
    ("COMMAND_MAX_AGE", "30s", lambda s: s.commands.max_age, 30.0),
    ("SUPERVISOR_INPUT_BUFFER", "512KiB", lambda s: s.supervisor.input_buffer, 512 * 1024),
    ("PROMETHEUS_MAX_CLIENTS", "8", lambda s: s.prometheus.max_clients, 8),
    ("PROMETHEUS_SHARD_SERIES", "Minimal", lambda s: s.prometheus.shard_series, "minimal"),
    ("FLEET_MEMBER", "host-a.1", lambda s: s.fleet.member, "host-a.1"),
    ("FLEET_CAPACITY", "3", lambda s: s.fleet.capacity, 3),
    ("FLEET_LEASE", "1500ms", lambda s: s.fleet.lease, 1.5),
    (
        "REDIS_SENTINELS",
        "s1:26380, s2 ,,[::1]:5000,s1:26380",
        lambda s: s.redis.sentinels,
        (("s1", 26380), ("s2", 26379), ("::1", 5000)),
    ),
    ("REDIS_SENTINEL_MASTER", "cache-1", lambda s: s.redis.sentinel_master, "cache-1"),
    ("RESHARD_POLICY", "Manual", lambda s: s.reshard.policy, "manual"),
    ("RESHARD_CHECK_INTERVAL", "30m", lambda s: s.reshard.check_interval, 1800.0),
    ("RESHARD_BUDGET_RESERVE", "0", lambda s: s.reshard.budget_reserve, 0),
    ("RESHARD_TIMEOUT", "10m", lambda s: s.reshard.timeout, 600.0),
    ("RESHARD_OVERLAP", "250ms", lambda s: s.reshard.overlap, 0.25),
]
#: Env names whose tests need more than one variable or a file: see the tests named here.
TESTED_ELSEWHERE = {
    "DISCORD_TOKEN_FILE",  # test_token_file_*
    "FLEET_NAME",  # test_fleet_*
}


@pytest.mark.parametrize(
    ("env", "value", "get", "expected"), ENV_CASES, ids=[c[0] for c in ENV_CASES]
)
def test_env_name_maps_to_key(
    tmp_path: Path, env: str, value: str, get: Get, expected: object
) -> None:
    assert get(load_with(tmp_path, env={env: value}).settings) == expected


def test_every_env_name_is_covered() -> None:
    tested = {case[0] for case in ENV_CASES} | TESTED_ELSEWHERE
    assert tested == {spec.env for spec in KEYS}
    assert tested >= PRODUCT_ENV_NAMES


# --------------------------------------------------------------------------------------------
# Bad values: one clear error naming the key, the env name, the value and what is allowed

BAD_ENV = [
    ("BROKER_TYPE", "kafka", "broker.type", "'kafka'"),
    ("SHARD_STORE_TYPE", "disk", "shard_store.type", "'disk'"),
    ("DISCORD_SHARD_COUNT", "abc", "shards.count", "'abc'"),
    ("DISCORD_SHARD_COUNT", "-1", "shards.count", "'-1'"),
    ("DISCORD_SHARD_COUNT", "1.5", "shards.count", "'1.5'"),
    ("DISCORD_SHARD_IDS", "5-2", "shards.ids", "'5-2'"),
    ("DISCORD_SHARD_IDS", "a", "shards.ids", "'a'"),
    ("DISCORD_RAW_INTENTS", "131072", "raw_intents", "'131072'"),
    ("DISCORD_RAW_INTENTS", "0x10", "raw_intents", "'0x10'"),
    ("DISCORD_INTENTS", "GUILDS,GUILD_MESAGES", "intents", "'GUILD_MESAGES'"),
    ("DISCORD_EVENTS", "MESSAGE CREATE", "events", "'MESSAGE CREATE'"),
    ("DISCORD_GATEWAY_VERSION", "0", "gateway_version", "'0'"),
    ("BROKER_MESSAGE_TIMEOUT", "2", "broker.message_timeout", "'2'"),
    ("BROKER_MESSAGE_TIMEOUT", "-1s", "broker.message_timeout", "'-1s'"),
    ("BROKER_MESSAGE_TIMEOUT", "2minutes", "broker.message_timeout", "'2minutes'"),
    ("BROKER_MESSAGE_TIMEOUT", "1ns", "broker.message_timeout", "'1ns'"),
    ("BROKER_FORMAT", "xml", "broker.format", "'xml'"),
    ("BROKER_GROUP", "my group", "broker.group", "'my group'"),
    ("STDIO_FORMAT", "text", "stdio.format", "'text'"),
    ("PROMETHEUS_ADDRESS", "8080", "prometheus.address", "'8080'"),
    ("PROMETHEUS_ADDRESS", "host:99999", "prometheus.address", "'host:99999'"),
    ("PROMETHEUS_ADDRESS", "[zz]:80", "prometheus.address", "'[zz]:80'"),
    ("PROMETHEUS_ADDRESS", "a b:80", "prometheus.address", "'a b:80'"),
    ("PROMETHEUS_ENDPOINT", "metrics", "prometheus.endpoint", "'metrics'"),
    ("REDIS_POOL_SIZE", "0", "redis.pool_size", "'0'"),
    ("REDIS_URL", "ftp://host", "redis.url", "'ftp://host'"),
    ("REDIS_URL", "host:port", "redis.url", "'host:port'"),
    ("REDIS_URL", "host:70000", "redis.url", "'host:70000'"),
    ("AMQP_URL", "http://rabbit/", "amqp.url", "'http://rabbit/'"),
    ("AMQP_URL", "amqp://rabbit:port/", "amqp.url", "'amqp://rabbit:port/'"),
    ("DISCORD_API_PROTOCOL", "ftp", "api.scheme", "'ftp'"),
    ("DISCORD_API_HOST", "discord.com/api", "api.host", "'discord.com/api'"),
    ("DISCORD_API_VERSION", "v10", "api.version", "'v10'"),
    ("DISCORD_GATEWAY_URL", "http://gateway", "gateway.url", "'http://gateway'"),
    ("DISCORD_GATEWAY_URL", "wss://", "gateway.url", "'wss://'"),
    ("DISCORD_COMPRESSION", "gzip", "gateway.compression", "'gzip'"),
    ("DISCORD_LARGE_THRESHOLD", "49", "gateway.large_threshold", "'49'"),
    ("DISCORD_LARGE_THRESHOLD", "251", "gateway.large_threshold", "'251'"),
    ("DISCORD_HELLO_TIMEOUT", "0", "gateway.hello_timeout", "'0'"),
    ("DISCORD_OPEN_TIMEOUT", "1 s", "gateway.open_timeout", "'1 s'"),
    ("DISCORD_SHUTDOWN_TIMEOUT", "ten", "gateway.shutdown_timeout", "'ten'"),
    ("SUPERVISOR_WORKERS", "-2", "supervisor.workers", "'-2'"),
    ("SUPERVISOR_SHARDS_PER_WORKER", "x", "supervisor.shards_per_worker", "'x'"),
    ("AMQP_PERSISTENT", "maybe", "amqp.persistent", "'maybe'"),
    ("BROKER_BUFFER", "0", "broker.buffer", "'0'"),
    ("SHARD_STORE_SESSION_TTL", "soon", "shard_store.session_ttl", "'soon'"),
    ("LOG_LEVEL", "verbose", "log_level", "'verbose'"),
    ("DISCORD_PRESENCE", "{bad", "presence", "'{bad'"),
    ("DISCORD_PRESENCE", "[1]", "presence", "'[1]'"),
    ("DISCORD_PRESENCE", '{"status": "away"}', "presence.status", "'away'"),
    ("DISCORD_PRESENCE", '{"afk": "yes"}', "presence.afk", "'yes'"),
    ("DISCORD_PRESENCE", '{"since": -5}', "presence.since", "-5"),
    ("DISCORD_PRESENCE", '{"activities": {"name": "x"}}', "presence.activities", "{'name': 'x'}"),
    (
        "DISCORD_PRESENCE",
        '{"activities": [{"name": "x", "type": 9}]}',
        "presence.activities[0].type",
        "9",
    ),
    ("DISCORD_PRESENCE", '{"game": {"type": 0}}', "presence.game.name", "None"),
    ("DISCORD_PRESENCE", "[" * 100_000, "presence", "'" + "[" * 116 + "..."),
    ("FLEET_MEMBER", "x" * 129, "fleet.member", "'" + "x" * 116 + "..."),
]
#: Bad values of the newer keys; the error names the env's key and shows the value as given.
BAD_ENV_VALUES = {
    "DISCORD_MAX_MESSAGE_SIZE": ["512KiB", "3GiB", "64XB", "-1", "1.5.2MiB"],
    "COMMAND_QUEUE_LIMIT": ["0"],
    "COMMAND_MAX_AGE": ["0", "forever"],
    "SUPERVISOR_INPUT_BUFFER": ["1KiB"],
    "PROMETHEUS_MAX_CLIENTS": ["0"],
    "PROMETHEUS_SHARD_SERIES": ["some"],
    "FLEET_NAME": ["my fleet", "a:b"],
    "FLEET_CAPACITY": ["-1"],
    "FLEET_LEASE": ["500ms", "0"],
    "REDIS_SENTINELS": ["host:port", "h:70000"],
    "REDIS_SENTINEL_MASTER": ["my master"],
    "REDIS_URL": [
        "redis+sentinel://h:1",
        "redis+sentinel:///m",
        "redis+sentinel://h:1/m/x",
        "redis+sentinel://h:1,:2/m",
    ],
    "RESHARD_POLICY": ["always"],
    "RESHARD_CHECK_INTERVAL": ["500ms"],
    "RESHARD_BUDGET_RESERVE": ["-5"],
    "RESHARD_TIMEOUT": ["0", "0.5s"],
    "RESHARD_OVERLAP": ["0", "soon"],
}
_KEY_OF_ENV = {spec.env: spec.path for spec in KEYS}
BAD_ENV += [
    (env, value, _KEY_OF_ENV[env], repr(value))
    for env, values in BAD_ENV_VALUES.items()
    for value in values
]


@pytest.mark.parametrize(("env", "value", "key", "shown"), BAD_ENV)
def test_bad_env_value(tmp_path: Path, env: str, value: str, key: str, shown: str) -> None:
    err = error_of(tmp_path, env={env: value})
    message = str(err)
    assert message.startswith(f"config key {key!r} (env {env}): {shown} ")
    assert "; expected " in message
    assert (err.key, err.env) == (key, env)
    assert err.allowed and err.allowed in message


MAX_MESSAGE_SIZE = ("gateway.max_message_size", "DISCORD_MAX_MESSAGE_SIZE")
BAD_FILE = [
    ('[shards]\ncount = "2"', "shards.count", "DISCORD_SHARD_COUNT", "'2'"),
    ("[shards]\ncount = true", "shards.count", "DISCORD_SHARD_COUNT", "True"),
    ("[shards]\ncount = 1.5", "shards.count", "DISCORD_SHARD_COUNT", "1.5"),
    ("[shards]\ncount = -1", "shards.count", "DISCORD_SHARD_COUNT", "-1"),
    ('[shards]\nids = [0, "a"]', "shards.ids", "DISCORD_SHARD_IDS", "[0, 'a']"),
    ("[shards]\nids = [-1]", "shards.ids", "DISCORD_SHARD_IDS", "[-1]"),
    ('[shards]\nids = "1--2"', "shards.ids", "DISCORD_SHARD_IDS", "'1--2'"),
    ('events = "MESSAGE_CREATE"', "events", "DISCORD_EVENTS", "'MESSAGE_CREATE'"),
    ("events = [1]", "events", "DISCORD_EVENTS", "[1]"),
    ("[broker]\ngroup = 5", "broker.group", "BROKER_GROUP", "5"),
    ('[broker]\ntype = "kafka"', "broker.type", "BROKER_TYPE", "'kafka'"),
    ("[broker]\nmessage_timeout = 120", "broker.message_timeout", "BROKER_MESSAGE_TIMEOUT", "120"),
    (
        "[gateway]\nlarge_threshold = 300",
        "gateway.large_threshold",
        "DISCORD_LARGE_THRESHOLD",
        "300",
    ),
    ("raw_intents = -1", "raw_intents", "DISCORD_RAW_INTENTS", "-1"),
    ("rawintents = 131072", "raw_intents", "DISCORD_RAW_INTENTS", "131072"),
    ('intents = ["NOPE"]', "intents", "DISCORD_INTENTS", "'NOPE'"),
    ("[presence.game]\nname = 5", "presence.game.name", "DISCORD_PRESENCE", "5"),
    ("[presence]\nafk = 1", "presence.afk", "DISCORD_PRESENCE", "1"),
    ("[redis]\npool_size = 0", "redis.pool_size", "REDIS_POOL_SIZE", "0"),
    ('log_level = "loud"', "log_level", "LOG_LEVEL", "'loud'"),
    ("[gateway]\nmax_message_size = 1.5", *MAX_MESSAGE_SIZE, "1.5"),
    ("[gateway]\nmax_message_size = 1000", *MAX_MESSAGE_SIZE, "1000"),
    ("[fleet]\nlease = 10", "fleet.lease", "FLEET_LEASE", "10"),
    ("[fleet]\ncapacity = true", "fleet.capacity", "FLEET_CAPACITY", "True"),
    ("[redis]\nsentinels = [1]", "redis.sentinels", "REDIS_SENTINELS", "[1]"),
    ("[commands]\nqueue_limit = 0", "commands.queue_limit", "COMMAND_QUEUE_LIMIT", "0"),
    ("token_file = 5", "token_file", "DISCORD_TOKEN_FILE", "5"),
]


@pytest.mark.parametrize(("toml", "key", "env", "shown"), BAD_FILE)
def test_bad_file_value(tmp_path: Path, toml: str, key: str, env: str, shown: str) -> None:
    err = error_of(tmp_path, toml)
    assert str(err).startswith(f"config key {key!r} (env {env}): {shown} ")
    assert "; expected " in str(err)
    assert (err.key, err.env) == (key, env)


def test_broker_type_message_is_exact(tmp_path: Path) -> None:
    err = error_of(tmp_path, env={"BROKER_TYPE": "kafka"})
    assert str(err) == (
        "config key 'broker.type' (env BROKER_TYPE): 'kafka' is not allowed; "
        "expected one of stdio, amqp, redis"
    )
    assert (err.key, err.value, err.allowed) == (
        "broker.type",
        "kafka",
        "one of stdio, amqp, redis",
    )


def test_unknown_intent_names_the_closest(tmp_path: Path) -> None:
    err = error_of(tmp_path, env={"DISCORD_INTENTS": "guild_precenses"})
    assert "did you mean 'GUILD_PRESENCES'?" in str(err)


def test_undocumented_raw_bits_are_named(tmp_path: Path) -> None:
    err = error_of(tmp_path, env={"DISCORD_RAW_INTENTS": str(513 | 1 << 17)})
    assert "undocumented bits 131072" in str(err)
    assert "53608447" in str(err)


def test_shard_ids_outside_the_count(tmp_path: Path) -> None:
    err = error_of(tmp_path, "[shards]\ncount = 4\nids = [0, 5]")
    assert str(err) == (
        "config key 'shards.ids' (env DISCORD_SHARD_IDS): [0, 5] is not allowed "
        "(id 5 is out of range); expected ids from 0 to 3 (shards.count = 4)"
    )
    err = error_of(tmp_path, argv=["--shards", "0-15", "--shard-count", "8"])
    assert err.key == "shards.ids"
    assert "'0-15'" in str(err)
    # count 0 means "ask Discord": any ids are accepted here
    assert load_with(tmp_path, argv=["--shards", "0-15"]).settings.shards.ids == tuple(range(16))


def test_a_table_given_as_a_value(tmp_path: Path) -> None:
    err = error_of(tmp_path, "shards = 4")
    assert str(err) == "config key 'shards': 4 is not allowed; expected a table: [shards]"


def test_presence_too_large(tmp_path: Path) -> None:
    presence = '{"activities": [{"name": "%s", "type": 0}]}' % ("x" * 4000)
    err = error_of(tmp_path, env={"DISCORD_PRESENCE": presence})
    assert err.key == "presence"
    assert "is too large" in str(err)


# --------------------------------------------------------------------------------------------
# Secrets never appear in errors

SECRET = "hunter2-very-secret"

SECRET_CASES = [
    pytest.param(
        None, {"DISCORD_TOKEN": f"Bot {TOKEN}"}, "token", "'***'", TOKEN, id="token-prefix"
    ),
    pytest.param(
        None, {"DISCORD_TOKEN": f"{SECRET} x"}, "token", "'***'", SECRET, id="token-space"
    ),
    pytest.param(
        f"token = [{SECRET!r}]", {"DISCORD_TOKEN": ""}, "token", "'***'", SECRET, id="token-type"
    ),
    pytest.param(
        None,
        {"AMQP_URL": f"http://user:{SECRET}@rabbit/"},
        "amqp.url",
        "'http://user:***@rabbit/'",
        SECRET,
        id="amqp-scheme",
    ),
    pytest.param(
        None,
        {"AMQP_URL": f"amqp://user:{SECRET}@rabbit:99999/"},
        "amqp.url",
        "'amqp://user:***@rabbit:99999/'",
        SECRET,
        id="amqp-port",
    ),
    pytest.param(
        None,
        {"REDIS_URL": f"ftp://:{SECRET}@redis/"},
        "redis.url",
        "'ftp://:***@redis/'",
        SECRET,
        id="redis-scheme",
    ),
    pytest.param(
        f'[broker]\nurl = "http://u:{SECRET}@h/"',
        None,
        "amqp.url",
        "'http://u:***@h/'",
        SECRET,
        id="broker.url-alias",
    ),
    pytest.param(
        None,
        {"DISCORD_SHARD_IDS": TOKEN},
        "shards.ids",
        "'***'",
        TOKEN,
        id="token-in-another-key",
    ),
    pytest.param(
        None,
        {"AMQP_URL": f"amqp://u:{SECRET}@h/", "BROKER_GROUP": f"a {SECRET}"},
        "broker.group",
        "'a ***'",
        SECRET,
        id="password-in-another-key",
    ),
    pytest.param(
        None,
        {"DISCORD_GATEWAY_URL": f"http://u:{SECRET}@h/"},
        "gateway.url",
        "'http://***@h/'",  # the gateway URL's whole user-info is masked
        SECRET,
        id="any-url-password",
    ),
]


@pytest.mark.parametrize(("toml", "env", "key", "shown", "secret"), SECRET_CASES)
def test_secrets_are_masked_in_errors(
    tmp_path: Path,
    toml: str | None,
    env: dict[str, str] | None,
    key: str,
    shown: str,
    secret: str,
) -> None:
    err = error_of(tmp_path, toml, env)
    assert err.key == key
    assert f": {shown} " in str(err)
    assert secret not in str(err)
    assert secret not in repr(err.value)


def test_missing_token(tmp_path: Path) -> None:
    for env in ({}, {"DISCORD_TOKEN": ""}, {"DISCORD_TOKEN": "   "}):
        err = error_of(tmp_path, base_env=env)
        assert err.key == "token"
        assert str(err).startswith("config key 'token' (env DISCORD_TOKEN): not set;")
    assert error_of(tmp_path, 'token = ""', base_env={}).key == "token"


def test_simulate_does_not_need_a_token(tmp_path: Path) -> None:
    loaded = load_with(tmp_path, argv=["--simulate"], base_env={})
    assert loaded.cli.simulate
    assert loaded.settings.token.get_secret_value() == SIMULATED_TOKEN
    loaded = load_with(tmp_path, 'token = ""', argv=["-simulate"], base_env={})
    assert loaded.settings.token.get_secret_value() == SIMULATED_TOKEN
    assert load_with(tmp_path, argv=["--simulate"]).settings.token.get_secret_value() == TOKEN


# --------------------------------------------------------------------------------------------
# The file: malformed, missing, unknown keys, aliases


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'token = "x"\n[broker]\ntype = \n')
    with pytest.raises(ConfigError) as info:
        load(["--config", path], BASE_ENV)
    message = str(info.value)
    assert message.startswith(f"config file {path!r} is not valid TOML: ")
    assert "line 3" in message
    assert "\n" not in message
    assert info.value.key == ""


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'token = "x"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=r"is not UTF-8 \(at line 2\)"):
        load(["--config", str(path)], BASE_ENV)


def test_missing_default_file_is_fine(tmp_path: Path) -> None:
    assert not (tmp_path / "gateway.toml").exists()
    loaded = load([], BASE_ENV)
    assert loaded.cli.config_path == "gateway.toml"
    assert not loaded.cli.config_explicit
    assert loaded.warnings == ()


def test_default_file_is_read_when_present(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text('[broker]\ntype = "redis"\n')
    assert load([], BASE_ENV).settings.broker.type == "redis"


@pytest.mark.parametrize("argv", [["--config", "nope.toml"], ["-config", "gateway.toml"]])
def test_missing_explicit_file_is_an_error(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(argv, BASE_ENV)
    assert str(info.value) == f"config file {argv[1]!r} (--config) does not exist"


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load(["--config", str(tmp_path)], BASE_ENV)  # a directory


def test_unknown_keys_are_warnings_with_suggestions(tmp_path: Path) -> None:
    toml = (
        'zzzz = 1\ntokne = "x"\n[shard]\ncount = 3\n[broker]\ntyp = "amqp"\n'
        '[presence]\nstatuss = "idle"\n[unknown]\n'
    )
    path = write_config(tmp_path, toml, "gateway.toml")
    loaded = load(["--config", "gateway.toml"], BASE_ENV)
    assert path.endswith("gateway.toml")
    assert loaded.warnings == (
        "unknown config key 'zzzz' in gateway.toml (ignored)",
        "unknown config key 'tokne' in gateway.toml; did you mean 'token'?",
        "unknown config key 'shard.count' in gateway.toml; did you mean 'shards.count'?",
        "unknown config key 'broker.typ' in gateway.toml; did you mean 'broker.type'?",
        "unknown config key 'unknown' in gateway.toml (ignored)",
        "unknown config key 'presence.statuss' in gateway.toml; did you mean 'presence.status'?",
    )
    assert loaded.settings.shards.count == 0
    assert loaded.settings.presence is not None


def test_unknown_presence_key_in_env_is_a_warning(tmp_path: Path) -> None:
    loaded = load_with(tmp_path, env={"DISCORD_PRESENCE": '{"statsu": "idle"}'})
    assert loaded.warnings == (
        "unknown config key 'presence.statsu' in DISCORD_PRESENCE; did you mean 'presence.status'?",
    )


def test_seed_spellings(tmp_path: Path) -> None:
    toml = 'Token = "from-file"\nrawIntents = 513\n[Broker]\nType = "AMQP"\nurl = "amqp://h/"\n'
    loaded = load_with(tmp_path, toml, base_env={})
    s = loaded.settings
    assert loaded.warnings == ()
    assert s.token.get_secret_value() == "from-file"
    assert (s.intents, s.raw_intents) == (513, 513)
    assert (s.broker.type, s.amqp.url) == ("amqp", "amqp://h/")


def test_an_old_and_a_new_name_that_disagree(tmp_path: Path) -> None:
    toml = '[broker]\nurl = "amqp://u:pw1secret@a/"\n[amqp]\nurl = "amqp://u:pw2secret@b/"\n'
    err = error_of(tmp_path, toml)
    assert err.key == "amqp.url"
    assert "pw1secret" not in str(err)
    assert "pw2secret" not in str(err)
    same = '[broker]\nurl = "amqp://a/"\n[amqp]\nurl = "amqp://a/"\n'
    assert load_with(tmp_path, same).settings.amqp.url == "amqp://a/"


# --------------------------------------------------------------------------------------------
# Keys that choose between modes


def test_raw_intents_win_over_names_at_the_same_level(tmp_path: Path) -> None:
    loaded = load_with(tmp_path, 'intents = ["GUILDS"]\nraw_intents = 512')
    assert (loaded.settings.intents, loaded.settings.raw_intents) == (512, 512)
    assert loaded.warnings == (
        f"config key 'intents' in {tmp_path / 'gw.toml'} is ignored: "
        "'raw_intents' is set too and wins",
    )
    env = {"DISCORD_INTENTS": "GUILDS", "DISCORD_RAW_INTENTS": "512"}
    assert load_with(tmp_path, env=env).settings.intents == 512


def test_names_at_a_higher_level_win_over_raw_intents(tmp_path: Path) -> None:
    s = load_with(tmp_path, "raw_intents = 512", {"DISCORD_INTENTS": "GUILDS"}).settings
    assert (s.intents, s.raw_intents) == (1, 0)
    s = load_with(tmp_path, 'intents = ["GUILDS"]', {"DISCORD_RAW_INTENTS": "512"}).settings
    assert (s.intents, s.raw_intents) == (512, 512)
    s = load_with(tmp_path, 'intents = ["GUILDS"]\nraw_intents = 0').settings
    assert s.intents == 1


def test_workers_and_shards_per_worker(tmp_path: Path) -> None:
    err = error_of(tmp_path, argv=["--workers", "2", "--shards-per-worker", "3"])
    assert str(err) == (
        "config key 'supervisor.shards_per_worker' (env SUPERVISOR_SHARDS_PER_WORKER): 3 is not "
        "allowed together with supervisor.workers = 2; expected 0 when supervisor.workers is set "
        "(choose one of the two)"
    )
    assert error_of(tmp_path, "[supervisor]\nworkers = 2\nshards_per_worker = 3").key == (
        "supervisor.shards_per_worker"
    )
    s = load_with(tmp_path, "[supervisor]\nshards_per_worker = 8", argv=["--workers", "4"]).settings
    assert (s.supervisor.workers, s.supervisor.shards_per_worker) == (4, 0)
    env = {"SUPERVISOR_SHARDS_PER_WORKER": "8"}
    s = load_with(tmp_path, "[supervisor]\nworkers = 4", env).settings
    assert (s.supervisor.workers, s.supervisor.shards_per_worker) == (0, 8)


# --------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[presence]\n", None),
        (
            '[presence]\nstatus = "IDLE"\n[presence.game]\nname = "test"\ntype = 0',
            {
                "since": None,
                "activities": [{"name": "test", "type": 0}],
                "status": "idle",
                "afk": False,
            },
        ),
        (
            "[presence]\nsince = 5\nafk = true\n"
            'activities = [{ name = "x", type = 4, state = "s" }]',
            {
                "since": 5,
                "activities": [{"name": "x", "type": 4, "state": "s"}],
                "status": "online",
                "afk": True,
            },
        ),
        (
            '[presence]\nactivities = [{ name = "x" }]',
            {
                "since": None,
                "activities": [{"name": "x", "type": 0}],
                "status": "online",
                "afk": False,
            },
        ),
    ],
)
def test_presence(tmp_path: Path, toml: str, expected: dict[str, Any] | None) -> None:
    assert load_with(tmp_path, toml).settings.presence == expected


def test_presence_game_and_activities(tmp_path: Path) -> None:
    toml = '[presence]\nactivities = [{ name = "a" }]\n[presence.game]\nname = "g"'
    loaded = load_with(tmp_path, toml)
    assert loaded.settings.presence is not None
    assert loaded.settings.presence["activities"] == [{"name": "a", "type": 0}]
    assert len(loaded.warnings) == 1
    assert "'presence.game'" in loaded.warnings[0]


def test_presence_null_json_is_none(tmp_path: Path) -> None:
    assert load_with(tmp_path, env={"DISCORD_PRESENCE": "null"}).settings.presence is None


def test_message_timeout_zero_means_default(tmp_path: Path) -> None:
    assert (
        load_with(tmp_path, env={"BROKER_MESSAGE_TIMEOUT": "0"}).settings.broker.message_timeout
        == 120
    )
    assert (
        load_with(tmp_path, '[broker]\nmessage_timeout = "0s"').settings.broker.message_timeout
        == 120
    )


def test_events_star(tmp_path: Path) -> None:
    s = load_with(tmp_path, env={"DISCORD_EVENTS": "*"}).settings
    assert s.publish_all
    assert s.events == frozenset({"*"})


@pytest.mark.parametrize(
    ("url", "dsn"),
    [
        ("localhost:6379", "redis://localhost:6379"),
        ("redis-host", "redis://redis-host:6379"),
        ("[::1]:7000", "redis://[::1]:7000"),
        ("redis://:pw@h:1/2", "redis://:pw@h:1/2"),
        ("rediss://h", "rediss://h"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_redis_dsn(tmp_path: Path, url: str, dsn: str) -> None:
    assert load_with(tmp_path, env={"REDIS_URL": url}).settings.redis.dsn == dsn


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [(":8080", "0.0.0.0", 8080), ("127.0.0.1:9000", "127.0.0.1", 9000), ("[::1]:0", "::1", 0)],
)
def test_prometheus_address(tmp_path: Path, address: str, host: str, port: int) -> None:
    p = load_with(tmp_path, env={"PROMETHEUS_ADDRESS": address}).settings.prometheus
    assert (p.enabled, p.host, p.port) == (True, host, port)


@pytest.mark.parametrize(
    ("level", "value"),
    [
        ("suppress", logging.CRITICAL + 10),
        ("error", logging.ERROR),
        ("warn", logging.WARNING),
        ("WARNING", logging.WARNING),
        ("info", logging.INFO),
        ("Debug", logging.DEBUG),
    ],
)
def test_logging_level(tmp_path: Path, level: str, value: int) -> None:
    assert load_with(tmp_path, env={"LOG_LEVEL": level}).settings.logging_level == value


# --------------------------------------------------------------------------------------------
# The command line


def test_seed_flags(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[broker]\ntype = "amqp"')
    for argv in (["-config", path, "-loglevel", "debug"], [f"-config={path}", "-loglevel=debug"]):
        loaded = load(argv, BASE_ENV)
        assert loaded.cli.config_path == path
        assert loaded.cli.config_explicit
        assert loaded.settings.broker.type == "amqp"
        assert loaded.settings.log_level == "debug"


def test_parse_args_all_flags() -> None:
    cli = parse_args(
        [
            "--config=c.toml",
            "--log-level",
            "warning",
            "--shards",
            "0-15",
            "--shard-count",
            "16",
            "--workers",
            "4",
            "--simulate",
            "--gateway-url",
            "ws://127.0.0.1:1",
            "--events",
            "A,B",
            "--print-config",
        ]
    )
    assert cli == CliArgs(
        config_path="c.toml",
        config_explicit=True,
        log_level="warn",
        shards="0-15",
        shard_count=16,
        workers=4,
        shards_per_worker=None,
        simulate=True,
        gateway_url="ws://127.0.0.1:1",
        events="A,B",
        print_config=True,
    )
    assert parse_args(["--shards-per-worker", "8"]).shards_per_worker == 8


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "command line: unknown flag '--bogus'"),
        (["--token=abc"], "command line: unknown flag '--token'"),
        ([TOKEN], "command line: unexpected argument (value not shown)"),
        (["--config"], "command line: argument --config/-config: expected one argument"),
        (
            ["--shard-count", "abc"],
            "config key 'shards.count' (env DISCORD_SHARD_COUNT): 'abc' is not allowed; "
            "expected an integer >= 0",
        ),
        (
            ["--workers", "-1"],
            "config key 'supervisor.workers' (env SUPERVISOR_WORKERS): '-1' is not allowed; "
            "expected an integer >= 0",
        ),
        (
            ["-loglevel", "loud"],
            "config key 'log_level' (env LOG_LEVEL): 'loud' is not allowed; "
            "expected one of suppress, error, warn, info, debug",
        ),
        # sub-commands
        (["stop"], "command line: unexpected argument (value not shown)"),
        (["status", "reshard"], "command line: unexpected argument (value not shown)"),
        (["--json"], "command line: --json is only for status"),
        (["reshard", "--json"], "command line: --json is only for status"),
        (["status", "--to", "3"], "command line: --to is only for reshard"),
        (["--url", "http://h:1"], "command line: --url is only for status and reshard"),
        (
            ["reshard", "--to", "0"],
            "command line: --to '0' is not allowed; expected an integer >= 1",
        ),
        (
            ["status", "--url", "ftp://h/"],
            "command line: --url 'ftp://h/' is not allowed; expected an http:// or https:// "
            "URL such as http://127.0.0.1:8080",
        ),
    ],
)
def test_bad_flags_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert str(info.value) == message


def test_help() -> None:
    for flag in ("-h", "--help", "-help"):
        with pytest.raises(HelpRequested) as info:
            parse_args([flag])
        assert "--shards SPEC" in info.value.text
        assert "-config" in info.value.text


# --------------------------------------------------------------------------------------------
# Printed config and secrets


RICH = f"""
token = "{TOKEN}"
events = ["MESSAGE_CREATE", "*"]
intents = ["GUILDS", "GUILD_BANS"]
log_level = "debug"
[shards]
count = 8
ids = "0-3"
[broker]
type = "amqp"
message_timeout = "1h30m0.5s"
[prometheus]
address = "[::1]:9000"
[shard_store]
prefix = ""
[amqp]
url = "amqp://user:{SECRET}@rabbit:5672/%2F"
[redis]
url = "redis://:p%40ss{SECRET}@redis:6379/0"
[gateway]
url = "wss://gw.example/?x=1"
hello_timeout = "300ms"
[supervisor]
shards_per_worker = 2
[presence]
status = "dnd"
since = 1700000000000
activities = [{{ name = "quoted \\"name\\" \\u007f", type = 1, url = "https://twitch.tv/x" }}]
"""


def test_redacted_dump(tmp_path: Path) -> None:
    settings = load_with(tmp_path, RICH, base_env={}).settings
    dump = redacted_dump(settings)
    assert TOKEN not in dump
    assert SECRET not in dump
    assert 'token = "***"' in dump
    assert 'url = "amqp://user:***@rabbit:5672/%2F"' in dump
    assert 'url = "redis://:***@redis:6379/0"' in dump
    assert 'intents = ["GUILDS", "GUILD_MODERATION"]' in dump
    assert 'message_timeout = "1h30m0.5s"' in dump
    for key in model_keys(Settings):
        assert f"{key.rpartition('.')[2]} = " in dump or key == "presence"
    # valid TOML that loads back to the same settings
    parsed = tomllib.loads(dump)
    assert parsed["token"] == "***"
    reloaded = load_with(tmp_path, dump.replace('token = "***"', f'token = "{TOKEN}"'), base_env={})
    assert reloaded.warnings == ()
    again = reloaded.settings
    assert again.amqp.url == redact_url(settings.amqp.url)
    assert again.redis.url == redact_url(settings.redis.url)
    assert msgspec.structs.replace(again, amqp=settings.amqp, redis=settings.redis) == settings


def test_repr_shows_no_secret(tmp_path: Path) -> None:
    settings = load_with(tmp_path, RICH, base_env={}).settings
    for text in (repr(settings), str(settings), repr(settings.amqp), str(settings.redis)):
        assert TOKEN not in text
        assert SECRET not in text
    assert "amqp://user:***@rabbit:5672/%2F" in repr(settings)


def test_redacted_dump_without_presence(tmp_path: Path) -> None:
    dump = redacted_dump(load_with(tmp_path).settings)
    assert dump.endswith("[presence]\n# not set\n")
    assert tomllib.loads(dump)["presence"] == {}


def test_secrets(tmp_path: Path) -> None:
    settings = load_with(tmp_path, RICH, base_env={}).settings
    assert settings.secrets() == (TOKEN, SECRET, f"p%40ss{SECRET}", f"p@ss{SECRET}")
    assert load_with(tmp_path, env={"AMQP_URL": "amqp://h/"}).settings.secrets() == (TOKEN,)


# --------------------------------------------------------------------------------------------
# Settings built directly (as other modules' tests do)


def test_settings_direct_construction() -> None:
    t = SecretStr("t")
    s = Settings(
        token=t,
        broker=BrokerSettings(type="amqp"),
        shards=ShardsSettings(count=2, ids=(1,)),
    )
    assert s.broker.type == "amqp"
    with pytest.raises(AttributeError):
        s.gateway_version = 9  # type: ignore[misc]
    # The rules between keys hold for settings built directly, with the same errors as load().
    with pytest.raises(ConfigError, match=r"^config key 'shards.ids' .*id 2 is out of range"):
        ShardsSettings(count=2, ids=(2,))
    with pytest.raises(ConfigError, match=r"^config key 'supervisor.shards_per_worker' "):
        SupervisorSettings(workers=1, shards_per_worker=1)
    with pytest.raises(ConfigError, match=r"undocumented bits 131072"):
        Settings(token=t, intents=1 << 17)
    with pytest.raises(ConfigError, match=r"^config key 'fleet.name' "):
        Settings(token=t, fleet=FleetSettings(name="f"))
    with pytest.raises(TypeError):
        Settings(token=t, typo=1)  # type: ignore[call-arg]


def test_config_error_is_one_line() -> None:
    err = ConfigError("k", "a\nb", "x\ny", env="E")
    assert str(err) == "config key 'k' (env E): 'a\\nb' is not allowed; expected x y"
    long = ConfigError("k", "v" * 500, "x")
    assert len(str(long)) < 200


# --------------------------------------------------------------------------------------------
# The example file


def test_example_config_loads_without_warnings() -> None:
    loaded = load(["--config", str(EXAMPLE)], BASE_ENV)
    assert loaded.warnings == ()
    assert loaded.settings.token.get_secret_value() == TOKEN


def test_example_config_has_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    for key in model_keys(Settings):
        node: Any = data
        for part in key.split("."):
            assert isinstance(node, dict)
            assert part in node, f"{key} is missing from {EXAMPLE.name}"
            node = node[part]
    for spec in KEYS:
        assert f"env: {spec.env}" in text, f"{spec.env} is not documented in {EXAMPLE.name}"


def test_example_config_values_are_the_defaults() -> None:
    settings = load(["--config", str(EXAMPLE)], BASE_ENV).settings
    defaults = defaults_with_member(settings)
    changed = {
        key
        for key, value in msgspec.structs.asdict(settings).items()
        if value != getattr(defaults, key)
    }
    assert changed == {"events", "intents"}


# --------------------------------------------------------------------------------------------
# run_or_exit


def test_run_or_exit_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_or_exit([], {"DISCORD_TOKEN": TOKEN, "BROKER_TYPE": "kafka"})
    assert info.value.code == EX_CONFIG == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "spectacles-gateway: configuration error: config key 'broker.type' (env BROKER_TYPE): "
        "'kafka' is not allowed; expected one of stdio, amqp, redis\n"
    )
    loaded = run_or_exit([], BASE_ENV)
    assert loaded.settings.broker.type == "stdio"


RUN = (
    "from spectacles_gateway.config import run_or_exit; import os, sys; "
    "run_or_exit(sys.argv[1:], os.environ, "
    "secrets_dir=os.environ.get('TEST_SECRETS_DIR', '/nonexistent'))"
)


def run_python(
    tmp_path: Path, code: str, argv: Sequence[str], env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """``python -c code argv...`` in ``tmp_path``, with this checkout on the path."""
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_cli(
    tmp_path: Path, argv: Sequence[str], env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    return run_python(tmp_path, RUN, argv, env)


@pytest.mark.parametrize(
    ("argv", "env", "line"),
    [
        (
            [],
            {"DISCORD_TOKEN": TOKEN, "BROKER_TYPE": "kafka"},
            "config key 'broker.type' (env BROKER_TYPE): 'kafka' is not allowed; "
            "expected one of stdio, amqp, redis",
        ),
        (
            [],
            {"DISCORD_TOKEN": f"Bot {TOKEN}"},
            "config key 'token' (env DISCORD_TOKEN): '***' is not allowed; "
            "expected the bare bot token (no 'Bot ' prefix, no spaces)",
        ),
        (["--bogus"], {"DISCORD_TOKEN": TOKEN}, "command line: unknown flag '--bogus'"),
        (["-config", "missing.toml"], {}, "config file 'missing.toml' (--config) does not exist"),
    ],
)
def test_run_or_exit_subprocess_exits_78(
    tmp_path: Path, argv: list[str], env: dict[str, str], line: str
) -> None:
    proc = run_cli(tmp_path, argv, env)
    assert proc.returncode == 78
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"spectacles-gateway: configuration error: {line}"]
    assert TOKEN not in proc.stderr


def test_run_or_exit_subprocess_malformed_toml(tmp_path: Path) -> None:
    write_config(tmp_path, "[broker\ntype = 1\n", "gateway.toml")
    proc = run_cli(tmp_path, [], {"DISCORD_TOKEN": TOKEN})
    assert proc.returncode == 78
    (line,) = proc.stderr.splitlines()
    assert line.startswith("spectacles-gateway: configuration error: config file 'gateway.toml'")
    assert "line 1" in line


def test_run_or_exit_subprocess_print_config(tmp_path: Path) -> None:
    write_config(tmp_path, "zzz = 1\n" + RICH.replace(f'token = "{TOKEN}"', ""), "gateway.toml")
    proc = run_cli(tmp_path, ["--print-config", "--workers", "3"], {"DISCORD_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    parsed = tomllib.loads(proc.stdout)
    assert parsed["supervisor"] == {
        "workers": 3,
        "shards_per_worker": 0,
        "stall_timeout": "15s",
        "input_buffer": "4MiB",
    }
    assert (
        proc.stderr
        == "spectacles-gateway: warning: unknown config key 'zzz' in gateway.toml (ignored)\n"
    )


def test_run_or_exit_subprocess_help(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, ["--help"], {})
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: spectacles-supervise")
    assert proc.stderr == ""


# --------------------------------------------------------------------------------------------
# Sizes in bytes


@pytest.mark.parametrize(
    ("text", "size", "formatted"),
    [
        ("64MiB", 64 * MIB, "64MiB"),
        ("512KiB", 512 * 1024, "512KiB"),
        ("1gib", 1024 * MIB, "1GiB"),
        ("1048576", MIB, "1MiB"),
        ("100MB", 100_000_000, "100000000"),
        ("1.5MiB", 3 * MIB // 2, "1536KiB"),
        (" 2 KB ", 2000, "2000"),
        ("1000B", 1000, "1000"),
    ],
)
def test_sizes(text: str, size: int, formatted: str) -> None:
    assert parse_size(text) == size
    assert format_size(size) == formatted
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("text", ["", "MiB", "1.MiB", "-1", "1e6", "64 XB", "1,5MiB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_sizes_in_the_file(tmp_path: Path) -> None:
    toml = '[gateway]\nmax_message_size = 2097152\n[supervisor]\ninput_buffer = "64KiB"'
    s = load_with(tmp_path, toml).settings
    assert (s.gateway.max_message_size, s.supervisor.input_buffer) == (2 * MIB, 64 * 1024)
    assert (
        load_with(
            tmp_path, "[gateway]\nmax_message_size = 1048576"
        ).settings.gateway.max_message_size
        == MIB
    )
    err = error_of(tmp_path, "[gateway]\nmax_message_size = 1048575")
    assert str(err) == (
        "config key 'gateway.max_message_size' (env DISCORD_MAX_MESSAGE_SIZE): 1048575 is not "
        "allowed; expected a size from 1MiB to 2GiB, such as 64MiB, 512KiB or a number of bytes"
    )


# --------------------------------------------------------------------------------------------
# Fleet


REDIS_STORE = {"SHARD_STORE_TYPE": "redis"}


def test_fleet_name_needs_the_redis_store(tmp_path: Path) -> None:
    expected = (
        "config key 'fleet.name' (env FLEET_NAME): 'prod' is not allowed with "
        "shard_store.type = 'memory'; expected shard_store.type = 'redis' "
        "(SHARD_STORE_TYPE=redis): a fleet shares its leases and sessions through Redis"
    )
    assert str(error_of(tmp_path, env={"FLEET_NAME": "prod"})) == expected
    assert str(error_of(tmp_path, argv=["--fleet", "prod"])) == expected
    assert str(error_of(tmp_path, '[fleet]\nname = "prod"')) == expected
    s = load_with(tmp_path, env={"FLEET_NAME": "prod", **REDIS_STORE}).settings
    assert (s.fleet.name, s.fleet.enabled, s.shard_store.type) == ("prod", True, "redis")
    s = load_with(tmp_path, '[fleet]\nname = "a"\n[shard_store]\ntype = "redis"').settings
    assert s.fleet.name == "a"
    assert not load_with(tmp_path).settings.fleet.enabled


def test_fleet_name_precedence(tmp_path: Path) -> None:
    toml = '[fleet]\nname = "from-file"'
    env = {"FLEET_NAME": "from-env", **REDIS_STORE}
    assert load_with(tmp_path, toml, REDIS_STORE).settings.fleet.name == "from-file"
    assert load_with(tmp_path, toml, env).settings.fleet.name == "from-env"
    loaded = load_with(tmp_path, toml, env, ["-fleet", "from-flag"])
    assert loaded.settings.fleet.name == "from-flag"
    assert loaded.cli.fleet == "from-flag"


def test_fleet_member_defaults_to_host_and_pid(tmp_path: Path) -> None:
    fleet = load_with(tmp_path).settings.fleet
    host = os.uname().nodename
    assert fleet.member == f"{host}-{os.getpid()}"
    assert (fleet.capacity, fleet.lease) == (0, 10.0)
    assert load_with(tmp_path, env={"FLEET_MEMBER": "m1"}).settings.fleet.member == "m1"
    # The default stays a valid member id whatever the host is called.
    monkey = pytest.MonkeyPatch()
    fake = os.uname_result(("Linux", "ünï host_1.example", "r", "v", "m"))
    with monkey.context() as m:
        m.setattr(os, "uname", lambda: fake)
        member = load_with(tmp_path).settings.fleet.member
    assert member == f"n--host_1.example-{os.getpid()}"


def test_fleet_without_redis_exits_78(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, ["--fleet", "prod"], {"DISCORD_TOKEN": TOKEN})
    assert proc.returncode == 78
    (line,) = proc.stderr.splitlines()
    assert line.startswith(
        "spectacles-gateway: configuration error: config key 'fleet.name' (env FLEET_NAME): "
    )


# --------------------------------------------------------------------------------------------
# Redis Sentinel


def test_sentinel_url(tmp_path: Path) -> None:
    url = "redis+sentinel://:p%40ss@s1:26380,s2,[::1]:26381/cache/2"
    r = load_with(tmp_path, env={"REDIS_URL": url}).settings.redis
    assert r.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (r.sentinel_master, r.db, r.password, r.username) == ("cache", 2, "p@ss", None)
    r = load_with(tmp_path, env={"REDIS_URL": "redis+sentinel://u:pw@s1/m"}).settings.redis
    assert (r.sentinels, r.sentinel_master, r.db, r.username, r.password) == (
        (("s1", 26379),),
        "m",
        0,
        "u",
        "pw",
    )


def test_sentinel_list(tmp_path: Path) -> None:
    env = {"REDIS_SENTINELS": "s1:1,s2:2", "REDIS_URL": "redis://:pw@ignored/3"}
    r = load_with(tmp_path, env=env).settings.redis
    assert (r.sentinels, r.sentinel_master, r.db, r.password) == (
        (("s1", 1), ("s2", 2)),
        "mymaster",
        3,
        "pw",
    )
    toml = '[redis]\nsentinels = ["a:26379", "[fe80::1]"]\nsentinel_master = "m2"'
    r = load_with(tmp_path, toml).settings.redis
    assert (r.sentinels, r.sentinel_master, r.db, r.password) == (
        (("a", 26379), ("fe80::1", 26379)),
        "m2",
        0,
        None,
    )
    plain = load_with(tmp_path).settings.redis
    assert (plain.sentinels, plain.db, plain.password) == ((), 0, None)


def test_sentinel_url_and_keys_must_agree(tmp_path: Path) -> None:
    url = "redis+sentinel://:pw@s1:1,s2:2/m"
    same = {"REDIS_URL": url, "REDIS_SENTINELS": "s2:2,s1:1", "REDIS_SENTINEL_MASTER": "m"}
    assert load_with(tmp_path, env=same).settings.redis.sentinel_master == "m"
    err = error_of(tmp_path, env={"REDIS_URL": url, "REDIS_SENTINELS": "s3:3"})
    assert str(err) == (
        "config key 'redis.sentinels' (env REDIS_SENTINELS): 's3:3' is not allowed: redis.url "
        "is a redis+sentinel:// URL with other Sentinels; expected the Sentinels named by "
        "redis.url, or no list (the URL names them)"
    )
    err = error_of(tmp_path, env={"REDIS_URL": url, "REDIS_SENTINEL_MASTER": "other"})
    assert err.key == "redis.sentinel_master"
    assert "expected 'm' (the master named by redis.url)" in str(err)
    assert "pw" not in str(error_of(tmp_path, f'[redis]\nurl = "{url}"\nsentinels = ["x"]'))


def test_sentinel_dump_loads_back(tmp_path: Path) -> None:
    url = f"redis+sentinel://:{SECRET}@s1:1,s2:2/m/1?password={SECRET}x"
    settings = load_with(tmp_path, env={"REDIS_URL": url}).settings
    dump = redacted_dump(settings)
    assert SECRET not in dump
    assert 'sentinels = ["s1:1", "s2:2"]' in dump
    restored = dump.replace('token = "***"', f'token = "{TOKEN}"').replace(
        "redis+sentinel://:***@", f"redis+sentinel://:{SECRET}@"
    )
    again = load_with(tmp_path, restored.replace("password=***", f"password={SECRET}x"))
    assert again.warnings == ()
    assert again.settings.redis == settings.redis


# --------------------------------------------------------------------------------------------
# Sub-commands, --version


def test_status_command(tmp_path: Path) -> None:
    assert parse_args(["status"]).command == StatusCommand()
    cli = parse_args(["-config", "x.toml", "status", "--json", "--url", "http://127.0.0.1:9000"])
    assert cli.command == StatusCommand(url="http://127.0.0.1:9000", json=True)
    assert cli.config_path == "x.toml"
    assert parse_args(["--url=https://gw.local/", "status"]).command == StatusCommand(
        url="https://gw.local/"
    )
    # No token is needed to ask a running supervisor.
    loaded = load_with(tmp_path, argv=["status"], base_env={})
    assert loaded.settings.token.get_secret_value() == ""
    assert loaded.cli.command == StatusCommand()


def test_reshard_command() -> None:
    assert parse_args(["reshard"]).command == ReshardCommand()
    assert parse_args(["reshard", "--to", "16"]).command == ReshardCommand(to=16)
    assert parse_args(["reshard", "-to", "8", "-url", "http://h:1"]).command == ReshardCommand(
        to=8, url="http://h:1"
    )
    assert parse_args([]).command is None


def test_help_lists_the_commands() -> None:
    with pytest.raises(HelpRequested) as info:
        parse_args(["--help"])
    assert "status [--url URL] [--json]" in info.value.text
    assert "reshard [--to N] [--url URL]" in info.value.text
    assert "--fleet NAME" in info.value.text


def test_version(tmp_path: Path) -> None:
    version = importlib.metadata.version("spectacles-gateway")
    with pytest.raises(VersionRequested) as info:
        parse_args(["--version"])
    assert info.value.text == f"spectacles-gateway {version}\n"
    # The installed command, in a directory whose gateway.toml is broken and with no token:
    # --version reads no configuration.
    write_config(tmp_path, "[broker\n", "gateway.toml")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "spectacles-supervise"), "--version"],
        env={"PATH": os.environ.get("PATH", "")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"spectacles-gateway {version}\n", "")


# --------------------------------------------------------------------------------------------
# What the config package loads


FORBIDDEN = ("asyncio", "pydantic", "prometheus_client", "websockets", "pika", "redis", "zstandard")
IMPORT_CHECK = """
import os, sys
from spectacles_gateway.config import load, redacted_dump
loaded = load(sys.argv[1:], {"DISCORD_TOKEN": "x"}, secrets_dir="/nonexistent")
redacted_dump(loaded.settings)
print(" ".join(sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN_NAMES)))
"""


def test_the_config_package_stays_small(tmp_path: Path) -> None:
    code = IMPORT_CHECK.replace("FORBIDDEN_NAMES", repr(set(FORBIDDEN)))
    toml = write_config(tmp_path, RICH.replace(f'token = "{TOKEN}"', ""))
    proc = run_python(tmp_path, code, ["--config", toml, "--print-config"], {})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "\n"
    # The check can fail: the same script sees a module that is loaded.
    proc = run_python(tmp_path, "import asyncio\n" + code, [], {})
    assert proc.stdout.split()[0] == "asyncio", proc.stderr


# --------------------------------------------------------------------------------------------
# The token from a file: DISCORD_TOKEN_FILE, systemd credentials, Docker secrets

FILE_TOKEN = "MTA0NTY3ODkw.FiLeTo.file-token-value"


def token_file(directory: Path, content: str | bytes, name: str = "discord_token") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("content", [FILE_TOKEN, f"{FILE_TOKEN}\n", f"{FILE_TOKEN}\r\n"])
def test_token_file_env(tmp_path: Path, content: str) -> None:
    path = token_file(tmp_path / "t", content)
    s = load_with(tmp_path, env={"DISCORD_TOKEN_FILE": str(path)}, base_env={}).settings
    assert s.token.get_secret_value() == FILE_TOKEN
    assert s.token_file == str(path)


def test_token_file_in_the_file(tmp_path: Path) -> None:
    path = token_file(tmp_path / "t", FILE_TOKEN + "\n")
    s = load_with(tmp_path, f'token_file = "{path}"', base_env={}).settings
    assert (s.token.get_secret_value(), s.token_file) == (FILE_TOKEN, str(path))


def test_token_file_precedence(tmp_path: Path) -> None:
    path = str(token_file(tmp_path / "t", FILE_TOKEN))
    # Different layers: the higher one wins, as a whole.
    s = load_with(tmp_path, f'token = "{TOKEN}"', {"DISCORD_TOKEN_FILE": path}, base_env={})
    assert (s.settings.token.get_secret_value(), s.settings.token_file) == (FILE_TOKEN, path)
    s = load_with(tmp_path, f'token_file = "{path}"', {"DISCORD_TOKEN": TOKEN}, base_env={})
    assert (s.settings.token.get_secret_value(), s.settings.token_file) == (TOKEN, "")
    # The same layer: an error that shows the path and never the token.
    for toml, env in (
        (None, {"DISCORD_TOKEN": TOKEN, "DISCORD_TOKEN_FILE": path}),
        (f'token = "{TOKEN}"\ntoken_file = "{path}"', {}),
    ):
        err = error_of(tmp_path, toml, env, base_env={})
        assert str(err) == (
            f"config key 'token_file' (env DISCORD_TOKEN_FILE): {path!r} is not allowed "
            "together with token; expected token or token_file, not both in the same place"
        )


def test_token_credential_and_docker_secret(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    secrets = tmp_path / "secrets"
    cred = token_file(creds, "from-credential\n")
    docker = token_file(secrets, "from-docker-secret\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}

    def token_of(environ: dict[str, str], **kw: Any) -> tuple[str, str]:
        s = load_with(tmp_path, env=environ, base_env={}, secrets_dir=secrets, **kw).settings
        return s.token.get_secret_value(), s.token_file

    assert token_of(env) == ("from-credential", str(cred))
    assert token_of({}) == ("from-docker-secret", str(docker))
    # A credentials directory without the credential: on to the Docker secret.
    assert token_of({"CREDENTIALS_DIRECTORY": str(tmp_path / "empty")}) == (
        "from-docker-secret",
        str(docker),
    )
    # Configured tokens win over both, wherever they are configured.
    assert token_of({**env, "DISCORD_TOKEN": TOKEN}) == (TOKEN, "")
    path = str(token_file(tmp_path / "t", FILE_TOKEN))
    assert token_of({**env, "DISCORD_TOKEN_FILE": path}) == (FILE_TOKEN, path)
    # --simulate only stands in when no token is found anywhere.
    assert token_of(env, argv=["--simulate"]) == ("from-credential", str(cred))
    docker.unlink()
    err = error_of(tmp_path, base_env={}, secrets_dir=secrets)
    assert err.key == "token"
    assert "DISCORD_TOKEN_FILE" in str(err)
    assert "'discord_token'" in str(err)


BARE = "the bare bot token (no 'Bot ' prefix, no spaces)"
BAD_TOKEN_FILES = [
    pytest.param(None, "cannot be read (No such file or directory)", id="missing"),
    pytest.param("dir", "is not a regular file", id="directory"),
    pytest.param("fifo", "is not a regular file", id="fifo"),
    pytest.param("", "is empty", id="empty"),
    pytest.param("\n", "is empty", id="newline"),
    pytest.param(f"Bot {FILE_TOKEN}\n", f"does not hold {BARE}", id="bot-prefix"),
    pytest.param(f"{FILE_TOKEN}\n{FILE_TOKEN}\n", f"does not hold {BARE}", id="two"),
    pytest.param(b"\xff" + FILE_TOKEN.encode(), "is not UTF-8 text", id="not-utf8"),
    pytest.param("x" * 5000, "is too large (over 4096 bytes)", id="too-large"),
]


def bad_token_file(directory: Path, content: str | bytes | None) -> Path:
    path = directory / "discord_token"
    directory.mkdir(parents=True, exist_ok=True)
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)  # opening it for reading would block until a writer came
    elif content is not None:
        token_file(directory, content)
    return path


@pytest.mark.parametrize(("content", "reason"), BAD_TOKEN_FILES)
def test_bad_token_files(tmp_path: Path, content: str | bytes | None, reason: str) -> None:
    path = bad_token_file(tmp_path / "t", content)
    err = error_of(tmp_path, env={"DISCORD_TOKEN_FILE": str(path)}, base_env={})
    assert str(err) == (
        f"config key 'token_file' (env DISCORD_TOKEN_FILE): {str(path)!r} {reason}; expected "
        "a readable file holding the bare bot token (a trailing newline is fine)"
    )
    assert FILE_TOKEN not in str(err)
    if content is None:
        return  # a missing credential or secret is no error: the next place is looked at
    # The same file as a systemd credential or a Docker secret: the key is the token.
    err = error_of(tmp_path, env={"CREDENTIALS_DIRECTORY": str(path.parent)}, base_env={})
    assert str(err).startswith(
        f"config key 'token' (systemd credential discord_token): {str(path)!r} {reason};"
    )
    err = error_of(tmp_path, base_env={}, secrets_dir=path.parent)
    assert str(err).startswith(
        f"config key 'token' (Docker secret discord_token): {str(path)!r} {reason};"
    )


def test_bad_token_file_exits_78(tmp_path: Path) -> None:
    path = token_file(tmp_path / "t", "\n")
    proc = run_cli(tmp_path, [], {"DISCORD_TOKEN_FILE": str(path)})
    assert proc.returncode == 78
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"spectacles-gateway: configuration error: config key 'token_file' (env "
        f"DISCORD_TOKEN_FILE): {str(path)!r} is empty; expected a readable file holding the "
        "bare bot token (a trailing newline is fine)"
    ]


def test_print_config_names_the_token_file(tmp_path: Path) -> None:
    path = str(token_file(tmp_path / "t", FILE_TOKEN + "\n"))
    settings = load_with(tmp_path, env={"DISCORD_TOKEN_FILE": path}, base_env={}).settings
    dump = redacted_dump(settings)
    assert FILE_TOKEN not in dump
    assert '# token = "***" (read from token_file)' in dump
    assert f"token_file = {json.dumps(path)}" in dump
    again = load_with(tmp_path, dump, base_env={}).settings
    assert msgspec.structs.replace(again, amqp=settings.amqp) == settings


# --------------------------------------------------------------------------------------------
# Every kind of secret, in every place it can be given, stays out of printed config and logs

# Distinctive values, one per secret and place (1 the file, 2 the environment, 3 a flag), so
# that a leak says which one leaked.
SECRETS = {
    name: f"zz{name}Q9"
    for name in (
        *(
            f"{kind}{n}"
            for kind in ("token", "amqppw", "amqpq", "redispw", "redisq")
            for n in (1, 2)
        ),
        *(f"{kind}{n}" for kind in ("gwuser", "gwpw", "gwq") for n in (1, 2, 3)),
        "aliaspw1",
    )
}


def secret_urls(n: int) -> dict[str, str]:
    """The URL keys with a secret in every spot (user-info and query), for place ``n``."""
    s = {k[:-1]: v for k, v in SECRETS.items() if k.endswith(str(n))}
    urls = {"gateway": f"wss://{s['gwuser']}:{s['gwpw']}@gw.example/?v=10&token={s['gwq']}"}
    if n < 3:
        urls["amqp"] = f"amqp://user:{s['amqppw']}@rabbit/%2F?heartbeat=5&password={s['amqpq']}"
        urls["redis"] = f"redis+sentinel://:{s['redispw']}@s1,s2:2/m/0?auth={s['redisq']}"
    return urls


def all_secret_sources(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """argv and env giving every secret in the file, the environment and a flag."""
    f = secret_urls(1)
    toml = (
        f'token = "{SECRETS["token1"]}"\n'
        f'[broker]\nurl = "amqp://u:{SECRETS["aliaspw1"]}@old/"\n'
        f'[redis]\nurl = "{f["redis"]}"\n[gateway]\nurl = "{f["gateway"]}"\n'
    )
    e = secret_urls(2)
    env = {
        "DISCORD_TOKEN": SECRETS["token2"],
        "AMQP_URL": e["amqp"],
        "REDIS_URL": e["redis"],
        "DISCORD_GATEWAY_URL": e["gateway"],
    }
    argv = ["--config", write_config(tmp_path, toml), "--gateway-url", secret_urls(3)["gateway"]]
    return argv, env


def assert_no_secret(text: str) -> None:
    leaked = [name for name, value in SECRETS.items() if value in text]
    assert not leaked, f"leaked: {leaked}"


def test_secret_sources_are_all_used(tmp_path: Path) -> None:
    """The distinctive values really are the effective ones (or overridden by a later layer)."""
    argv, env = all_secret_sources(tmp_path)
    s = load(argv, env).settings
    assert s.token.get_secret_value() == SECRETS["token2"]
    assert s.amqp.url == env["AMQP_URL"]
    assert s.redis.url == env["REDIS_URL"]
    assert s.gateway.url == secret_urls(3)["gateway"]
    assert load(argv[:2], {}).settings.amqp.url.startswith("amqp://u:")  # the old spelling


def test_print_config_shows_no_secret(tmp_path: Path) -> None:
    argv, env = all_secret_sources(tmp_path)
    for args, environ in ((argv, env), (argv[:2], {})):  # every layer, and the file alone
        proc = run_cli(tmp_path, [*args, "--print-config"], environ)
        assert proc.returncode == 0, proc.stderr
        assert_no_secret(proc.stdout + proc.stderr)
        parsed = tomllib.loads(proc.stdout)
        assert parsed["token"] == "***"
        assert ":***@" in parsed["amqp"]["url"]
    # The token from a file, a credential or a Docker secret.
    path = token_file(tmp_path / "t", SECRETS["token1"] + "\n")
    for environ in ({"DISCORD_TOKEN_FILE": str(path)}, {"CREDENTIALS_DIRECTORY": str(path.parent)}):
        proc = run_cli(tmp_path, ["--print-config"], environ)
        assert proc.returncode == 0, proc.stderr
        assert_no_secret(proc.stdout + proc.stderr)
    proc = run_cli(tmp_path, ["--print-config"], {"TEST_SECRETS_DIR": str(path.parent)})
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc.stdout + proc.stderr)
    assert f"token_file = {json.dumps(str(path))}" in proc.stdout


def test_errors_show_no_secret(tmp_path: Path) -> None:
    argv, env = all_secret_sources(tmp_path)
    for bad in (
        {"BROKER_GROUP": f"g {SECRETS['gwpw1']}"},
        {"DISCORD_SHARD_IDS": SECRETS["token1"]},
    ):
        proc = run_cli(tmp_path, argv, {**env, **bad})
        assert proc.returncode == 78
        assert_no_secret(proc.stderr)


def test_log_redactor_masks_every_secret(tmp_path: Path) -> None:
    argv, env = all_secret_sources(tmp_path)
    settings = load(argv, env).settings
    redactor = Redactor(settings.secrets())
    effective = ["token2", "amqppw2", "amqpq2", "redispw2", "redisq2", "gwuser3", "gwpw3", "gwq3"]
    urls = [settings.amqp.url, settings.redis.url, settings.gateway.url]
    text = " | ".join(urls + [f"bare {SECRETS[k]} here" for k in effective])
    assert_no_secret(redactor.redact(text))
    assert "@gw.example/?v=10&token=*** |" in redactor.redact(text)


# --------------------------------------------------------------------------------------------
# Hostile files: deep nesting, endless files


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x = " + "[" * 50_000 + "]" * 50_000, "is not valid TOML: nested too deeply"),
        (
            '[presence.game]\nname = "x"\n[presence.game.' + ".".join(["a"] * 3000) + "]\nx = 1",
            "config key 'presence' (env DISCORD_PRESENCE): ",
        ),
        (
            '[presence]\nactivities = [{ name = "x", created_at = 2020-01-01 }]',
            "is not allowed (a value JSON cannot hold); expected a presence",
        ),
        (
            '[presence]\nactivities = [{ name = "x", created_at = inf }]',
            "is not allowed (a value JSON cannot hold); expected a presence",
        ),
    ],
    ids=["deep-array", "deep-presence", "date-in-presence", "inf-in-presence"],
)
def test_deeply_nested_files_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    err = error_of(tmp_path, text)
    assert message in str(err)
    assert len(str(err)) < 400


def test_deeply_nested_unknown_tables_are_one_warning(tmp_path: Path) -> None:
    loaded = load_with(tmp_path, "[" + ".".join(["a"] * 5000) + "]\nx = 1")
    (warning,) = loaded.warnings
    assert warning.startswith("unknown config key 'a.a.a.")
    assert len(warning) < 200


def test_an_endless_config_file_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^config file '/dev/zero' is too large"):
        load(["--config", "/dev/zero"], BASE_ENV)
