"""Configuration: the TOML file, then the environment, then command-line flags.

:func:`load` reads and validates everything once, into a frozen :class:`Settings`; it has no
side effects apart from reading the TOML file (no logging, no ``os.environ``, no exit).
:func:`run_or_exit` is the command-line convenience around it.

Every key has a dotted name (``broker.type``) and an environment name (``BROKER_TYPE``); the
table ``KEYS`` below is the single list of both, and ``config/gateway.toml`` documents each.
Rules that hold for every key:

- Precedence is file < environment < flag. An empty value (``""`` in the file, an empty
  environment variable or flag) counts as unset, except ``shard_store.prefix = ""`` in the file.
- A bad value is a :class:`ConfigError` naming the dotted key, the environment name, the value
  and what is allowed. Secrets never appear in it: the token is shown as ``***`` and URL
  passwords as ``user:***@``.
- Unknown keys are warnings (``Loaded.warnings``) with the closest known key. Key names are
  matched case-insensitively, as the seed's Go TOML decoder did; ``rawintents`` and
  ``[broker] url`` are the seed's spellings of ``raw_intents`` and ``[amqp] url``.
- Two keys that choose between modes (``raw_intents`` over ``intents``; ``supervisor.workers``
  against ``supervisor.shards_per_worker``) follow the same precedence as a whole: the one set
  at the higher level wins. Set at the same level, ``raw_intents`` wins when non-zero, and
  ``workers`` with ``shards_per_worker`` is an error.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import logging
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import SplitResult, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from spectacles_gateway.durations import DurationError, format_duration, parse_duration
from spectacles_gateway.exitcodes import EX_CONFIG
from spectacles_gateway.intents import (
    ALL_INTENTS,
    UnknownIntentError,
    intent_names,
    resolve_intents,
    undocumented_bits,
)
from spectacles_gateway.redact import MASK, Redactor, redact_url, url_password
from spectacles_gateway.shardspec import MAX_SHARD_ID, ShardSpecError, parse_shard_spec

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "EX_CONFIG",
    "KEYS",
    "SIMULATED_TOKEN",
    "AmqpSettings",
    "ApiSettings",
    "BrokerSettings",
    "CliArgs",
    "ConfigError",
    "GatewaySettings",
    "HelpRequested",
    "KeySpec",
    "Loaded",
    "PrometheusSettings",
    "RedisSettings",
    "Settings",
    "ShardStoreSettings",
    "ShardsSettings",
    "StdioSettings",
    "SupervisorSettings",
    "load",
    "parse_args",
    "run_or_exit",
]

#: Exit status for bad configuration (sysexits.h); systemd's RestartPreventExitStatus= uses it.
DEFAULT_CONFIG_PATH = "gateway.toml"
#: The token used with ``--simulate`` when none is configured.
SIMULATED_TOKEN = "simulated-token"  # noqa: S105 - not a secret
PROG = "spectacles-gateway"

LogLevel = Literal["suppress", "error", "warn", "info", "debug"]
BrokerType = Literal["stdio", "amqp", "redis"]
BodyFormat = Literal["msgpack", "json"]
ShardStoreType = Literal["memory", "redis"]
Compression = Literal["zstd-stream", "zlib-stream", "none"]
PresenceStatus = Literal["online", "dnd", "idle", "invisible", "offline"]

_LOG_LEVELS: dict[str, int] = {
    "suppress": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}
_PRESENCE_STATUSES = ("online", "dnd", "idle", "invisible", "offline")
#: Identify payloads are limited to 4096 bytes; the presence is only part of one.
_MAX_PRESENCE_BYTES = 3072
_DEFAULT_REDIS_PORT = 6379


# --------------------------------------------------------------------------------------------
# Errors


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class ConfigError(Exception):
    """Bad configuration; ``str(err)`` is one line that says what to change.

    ``key`` is the dotted key (``""`` for problems with the file or the command line as a
    whole), ``value`` the offending value (``"***"`` or a redacted URL when it is a secret),
    ``allowed`` what would have been accepted, ``env`` the key's environment name.
    """

    def __init__(
        self,
        key: str,
        value: object,
        allowed: str,
        *,
        env: str | None = None,
        reason: str = "is not allowed",
        message: str | None = None,
    ) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.env = env
        if message is None:
            head = f"config key {key!r}" + (f" (env {env})" if env else "")
            message = f"{head}: {_show(value)} {reason}; expected {allowed}"
        self.message = " ".join(message.split())
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class HelpRequested(Exception):
    """``-h``/``--help`` was given; ``text`` is the usage to print."""

    def __init__(self, text: str) -> None:
        super().__init__("help requested")
        self.text = text


# --------------------------------------------------------------------------------------------
# Settings


_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ShardsSettings(BaseModel):
    model_config = _FROZEN

    count: int = Field(default=0, ge=0)
    """Total shard count told to Discord; 0 = Discord's recommendation."""
    ids: tuple[int, ...] = ()
    """Shard ids to run, sorted; empty = all of ``0..count-1``."""


class BrokerSettings(BaseModel):
    model_config = _FROZEN

    type: BrokerType = "stdio"
    group: str = Field(default="gateway", min_length=1)
    message_timeout: float = Field(default=120.0, gt=0)
    """Seconds; the AMQP ``expiration`` in milliseconds."""
    format: BodyFormat = "msgpack"
    """Message body format for AMQP and Redis."""
    buffer: int = Field(default=10000, ge=1)
    """Events handed to the broker and not yet confirmed, at most; then shards stop reading."""


class StdioSettings(BaseModel):
    model_config = _FROZEN

    format: Literal["json", "msgpack"] = "json"


class PrometheusSettings(BaseModel):
    model_config = _FROZEN

    address: str = ""
    """``host:port`` to listen on; ``""`` = disabled, ``":8080"`` = every interface."""
    endpoint: str = "/metrics"
    multiproc_dir: str = ""
    """Directory for prometheus_client's multiprocess files; ``""`` = a private temp dir."""

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def host(self) -> str:
        """The host to bind (``"0.0.0.0"`` for ``":8080"``; IPv6 without brackets)."""
        host = self.address.rpartition(":")[0]
        return host.strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        """The port to bind (0 when disabled)."""
        return int(self.address.rpartition(":")[2]) if self.address else 0


class ShardStoreSettings(BaseModel):
    model_config = _FROZEN

    type: ShardStoreType = "memory"
    prefix: str = "gateway"
    session_ttl: float = Field(default=300.0, gt=0)
    """Seconds a stored session outlives its last save (then it cannot be resumed anyway)."""


class _RedactedUrlRepr(BaseModel):
    """``repr()`` masks the password of ``url``, so that logging the settings is safe."""

    url: str

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "url" else value


class AmqpSettings(_RedactedUrlRepr):
    model_config = _FROZEN

    url: str = "amqp://guest:guest@localhost:5672/%2F"
    persistent: bool = False
    """Publish with delivery mode 2 (persistent)."""
    prefetch: int = Field(default=100, ge=1)
    """Unacknowledged commands a worker holds at most."""


_REDIS_HOST_PORT = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._\-]+)(?::(?P<port>[0-9]+))?"
)


class RedisSettings(_RedactedUrlRepr):
    model_config = _FROZEN

    url: str = "localhost:6379"
    """``host:port`` (the seed's form) or a ``redis://``, ``rediss://`` or ``unix://`` URL."""
    pool_size: int = Field(default=5, ge=1)
    stream_prefix: str = ""
    """Prefix of the event streams of the Redis broker (the stream key is prefix + event)."""
    maxlen: int = Field(default=100_000, ge=1)
    """Approximate length each event stream is trimmed to (``XADD ... MAXLEN ~ N``)."""

    @property
    def dsn(self) -> str:
        """The URL for ``redis.from_url``: ``localhost:6379`` -> ``redis://localhost:6379``."""
        if "://" in self.url:
            return self.url
        match = _REDIS_HOST_PORT.fullmatch(self.url)
        if match is not None and match.group("port") is None:
            return f"redis://{self.url}:{_DEFAULT_REDIS_PORT}"
        return f"redis://{self.url}"


class ApiSettings(BaseModel):
    model_config = _FROZEN

    scheme: Literal["https", "http"] = "https"
    host: str = "discord.com"
    version: int = Field(default=10, ge=1)

    @property
    def base_url(self) -> str:
        """``https://discord.com/api/v10``."""
        return f"{self.scheme}://{self.host}/api/v{self.version}"


class GatewaySettings(BaseModel):
    model_config = _FROZEN

    url: str = ""
    """Gateway URL override (``ws://``/``wss://``); ``""`` = the URL Discord hands out."""
    compression: Compression = "zstd-stream"
    large_threshold: int = Field(default=250, ge=50, le=250)
    hello_timeout: float = Field(default=20.0, gt=0)
    open_timeout: float = Field(default=10.0, gt=0)
    shutdown_timeout: float = Field(default=10.0, gt=0)


class SupervisorSettings(BaseModel):
    model_config = _FROZEN

    workers: int = Field(default=0, ge=0)
    """Number of worker processes; 0 = automatic."""
    shards_per_worker: int = Field(default=0, ge=0)
    """Shards per worker process; 0 = automatic. Exclusive with ``workers``."""
    stall_timeout: float = Field(default=15.0, gt=0)
    """A worker that sends no heartbeat for this long has a stuck event loop: it is killed."""


class Settings(BaseSettings):
    """The validated, effective configuration. Frozen; build it with :func:`load`.

    A pydantic-settings model whose only source is what :func:`load` passes in: the TOML file,
    the environment and the flags are merged by :func:`load` itself, because every value must
    be converted with an error that names the key, its env name and the value (the stock env
    source can only report pydantic's field path), empty env values count as unset, and env
    lists are comma-separated in the seed's style.

    Direct construction, e.g. in tests (``Settings(token=SecretStr("x"),
    broker=BrokerSettings(type="amqp"))``), validates types, ranges and cross-field rules too,
    with pydantic's errors instead of :class:`ConfigError`. ``repr()`` shows no secret.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the merged values given by load(): no implicit reads of os.environ or .env files.
        return (init_settings,)

    token: SecretStr
    events: frozenset[str] = frozenset()
    intents: int = Field(default=0, ge=0)
    """The resolved intents bitfield sent with identify."""
    raw_intents: int = Field(default=0, ge=0)
    """The configured bitfield (0 when the names in ``intents`` decided)."""
    gateway_version: int = Field(default=10, ge=1)
    log_level: LogLevel = "info"
    presence: dict[str, Any] | None = None
    """Update Presence object for identify: ``since``, ``activities``, ``status``, ``afk``."""
    shards: ShardsSettings = Field(default_factory=ShardsSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    stdio: StdioSettings = Field(default_factory=StdioSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    shard_store: ShardStoreSettings = Field(default_factory=ShardStoreSettings)
    amqp: AmqpSettings = Field(default_factory=AmqpSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if not self.token.get_secret_value():
            raise ValueError("token must not be empty")
        if undocumented_bits(self.intents):
            raise ValueError(f"intents has undocumented bits {undocumented_bits(self.intents)}")
        count = self.shards.count
        if count and any(i >= count for i in self.shards.ids):
            raise ValueError(f"shards.ids must be below shards.count ({count})")
        if self.supervisor.workers and self.supervisor.shards_per_worker:
            raise ValueError("supervisor.workers and supervisor.shards_per_worker are exclusive")
        return self

    @property
    def publish_all(self) -> bool:
        """True when ``events`` contains ``*``: every dispatch is published."""
        return "*" in self.events

    @property
    def logging_level(self) -> int:
        """The :mod:`logging` level; ``suppress`` is above CRITICAL."""
        return _LOG_LEVELS[self.log_level]

    def secrets(self) -> tuple[str, ...]:
        """The token and the URL passwords (also percent-decoded), for a log redactor."""
        found = [self.token.get_secret_value()]
        for url in (self.amqp.url, self.redis.url):
            password = url_password(url)
            if password:
                found += [password, unquote(password)]
        return tuple(dict.fromkeys(s for s in found if s))

    def redacted_dump(self) -> str:
        """Every key as TOML, with the token and URL passwords replaced by ``***``.

        The text is valid TOML; loaded again (with the token supplied) it gives these settings.
        """
        lines = ["# effective configuration; secrets are shown as ***"]
        sections: dict[str, list[str]] = {}
        for spec in KEYS:
            section, _, name = spec.path.rpartition(".")
            if spec.path == "presence":
                continue
            value = _dump_value(spec, self)
            sections.setdefault(section, []).append(f"{name} = {_toml_value(value)}")
            if spec.path == "intents":
                sections[section].append(f"# resolved intents bitfield: {self.intents}")
        lines += sections.pop("")
        for section, entries in sections.items():
            lines += ["", f"[{section}]", *entries]
        lines += ["", "[presence]"]
        if self.presence is None:
            lines.append("# not set")
        else:
            lines += [
                f"{_toml_key(k)} = {_toml_value(v)}"
                for k, v in self.presence.items()
                if v is not None
            ]
        return "\n".join(lines) + "\n"


def _dump_value(spec: KeySpec, settings: Settings) -> object:
    section, _, name = spec.path.rpartition(".")
    owner: object = getattr(settings, section) if section else settings
    value = getattr(owner, name)
    if spec.kind == "token":
        return MASK
    if spec.kind == "url":
        return redact_url(value)
    if spec.kind == "duration":
        return format_duration(value)
    if spec.path == "intents":
        return list(intent_names(value))
    if isinstance(value, frozenset):
        return sorted(value)
    return value


_BARE_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_value(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# --------------------------------------------------------------------------------------------
# Keys: one row per setting, with its environment name and its converter


@dataclass(frozen=True)
class _Raw:
    """One value as given: ``text`` is true for strings from the environment or a flag."""

    value: object
    text: bool
    where: str  # "gateway.toml", "DISCORD_PRESENCE", "--events"
    level: int  # 0 file, 1 environment, 2 flag


_GIVEN: Any = object()  # "the value as given" in _Bad


class _Bad(Exception):
    def __init__(
        self,
        allowed: str,
        *,
        reason: str = "is not allowed",
        subkey: str | None = None,
        value: object = _GIVEN,
    ) -> None:
        super().__init__(allowed)
        self.allowed = allowed
        self.reason = reason
        self.subkey = subkey  # e.g. "status" for presence.status
        self.value = value  # the offending part, when not the whole value


_Convert = Callable[[object, _Raw, list[str]], object]


@dataclass(frozen=True)
class KeySpec:
    """A configuration key: dotted ``path``, ``env`` name, converter and secrecy ``kind``."""

    path: str
    env: str
    convert: _Convert
    kind: Literal["", "token", "url", "duration"] = ""
    empty_is_value: bool = False  # ``""`` in the file is a value, not "unset"

    def display(self, value: object) -> object:
        """``value`` as it may be shown in an error (secrets masked)."""
        if self.kind == "token":
            return MASK
        if self.kind == "url" and isinstance(value, str):
            return redact_url(value)
        return value


def _int(minimum: int, maximum: int | None = None) -> _Convert:
    if maximum is None:
        allowed = f"an integer >= {minimum}"
    else:
        allowed = f"an integer from {minimum} to {maximum}"

    def convert(value: object, raw: _Raw, warnings: list[str]) -> int:
        if raw.text and isinstance(value, str):
            text = value.strip()
            if not re.fullmatch(r"[+-]?[0-9]+", text):
                raise _Bad(allowed)
            number = int(text)
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise _Bad(allowed)
        if number < minimum or (maximum is not None and number > maximum):
            raise _Bad(allowed)
        return number

    return convert


_NON_NEGATIVE = _int(0)


def _string(value: object, allowed: str) -> str:
    if not isinstance(value, str):
        raise _Bad(allowed)
    return value.strip()


def _choice(*options: str, aliases: Mapping[str, str] | None = None) -> _Convert:
    allowed = "one of " + ", ".join(options)

    def convert(value: object, raw: _Raw, warnings: list[str]) -> str:
        text = _string(value, allowed).lower()
        text = (aliases or {}).get(text, text)
        if text not in options:
            raise _Bad(allowed)
        return text

    return convert


def _duration(*, zero_is_default: bool = False) -> _Convert:
    allowed = "a duration such as 2m, 90s, 1h30m, 1.5s or 300ms"
    if not zero_is_default:
        allowed = "a positive " + allowed.removeprefix("a ")

    def convert(value: object, raw: _Raw, warnings: list[str]) -> float | None:
        text = _string(value, allowed)
        try:
            seconds = parse_duration(text)
        except DurationError as exc:
            raise _Bad(allowed, reason=f"is not allowed ({exc})") from None
        if seconds == 0:
            if zero_is_default:
                return None  # the seed's rule: 0 means the default
            raise _Bad(allowed)
        if seconds < 0.001:
            raise _Bad(allowed, reason="is not allowed (below one millisecond)")
        return seconds

    return convert


def _names(value: object, raw: _Raw, what: str, example: str) -> list[str]:
    allowed = f"a list of {what} names such as {example}"
    if raw.text and isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, list):
        items = value
    else:
        raise _Bad(allowed)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise _Bad(allowed)
        name = item.strip().upper()
        if name and name not in names:
            names.append(name)
    return names


_EVENT_NAME = re.compile(r"[A-Z0-9_]+|\*")


def _convert_events(value: object, raw: _Raw, warnings: list[str]) -> frozenset[str]:
    names = _names(value, raw, "dispatch event", '["MESSAGE_CREATE", "GUILD_CREATE"] or "*"')
    for name in names:
        if not _EVENT_NAME.fullmatch(name):
            raise _Bad(
                "event names of letters, digits and _ (MESSAGE_CREATE), or * for every event",
                value=name,
            )
    return frozenset(names)


def _convert_intent_names(value: object, raw: _Raw, warnings: list[str]) -> tuple[str, ...]:
    names = _names(value, raw, "intent", '["GUILDS", "GUILD_MESSAGES"]')
    for name in names:
        try:
            resolve_intents([name])
        except UnknownIntentError as exc:
            if exc.suggestion:
                allowed = f"a known intent name; did you mean {exc.suggestion!r}?"
            else:
                allowed = "a known intent name such as GUILDS, GUILD_MESSAGES or MESSAGE_CONTENT"
            raise _Bad(allowed, value=name) from None
    return tuple(names)


def _convert_raw_intents(value: object, raw: _Raw, warnings: list[str]) -> int:
    bits = _NON_NEGATIVE(value, raw, warnings)
    assert isinstance(bits, int)
    extra = undocumented_bits(bits)
    if extra:
        raise _Bad(
            f"a bitfield of documented intents (all of them = {ALL_INTENTS})",
            reason=f"is not allowed (undocumented bits {extra})",
        )
    return bits


def _convert_shard_ids(value: object, raw: _Raw, warnings: list[str]) -> tuple[int, ...]:
    allowed = 'shard ids such as [0, 1, 2] or a spec such as "0-15" or "0,2,4-7"'
    if isinstance(value, str):
        try:
            return parse_shard_spec(value)
        except ShardSpecError as exc:
            raise _Bad(allowed, reason=f"is not allowed ({exc})") from None
    if not isinstance(value, list):
        raise _Bad(allowed)
    ids: set[int] = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_SHARD_ID:
            raise _Bad(allowed)
        ids.add(item)
    return tuple(sorted(ids))


def _convert_token(value: object, raw: _Raw, warnings: list[str]) -> str:
    token = _string(value, "a string: the bot token")
    if any(c.isspace() for c in token):
        raise _Bad("the bare bot token (no 'Bot ' prefix, no spaces)")
    return token


def _convert_group(value: object, raw: _Raw, warnings: list[str]) -> str:
    allowed = "a name without spaces, at most 255 bytes"
    group = _string(value, allowed)
    if len(group.encode()) > 255 or any(c.isspace() or not c.isprintable() for c in group):
        raise _Bad(allowed)
    return group


def _bool(value: object, raw: _Raw, warnings: list[str]) -> bool:
    allowed = "true or false"
    if isinstance(value, bool):
        return value
    if raw.text and isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
    raise _Bad(allowed)


def _convert_prefix(value: object, raw: _Raw, warnings: list[str]) -> str:
    return _string(value, "a string (may be empty)")


def _split_url(value: object, allowed: str) -> SplitResult:
    text = _string(value, allowed)
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        raise _Bad(allowed) from None
    return parts


def _url_of(schemes: tuple[str, ...], allowed: str) -> _Convert:
    """A converter for a URL with one of ``schemes`` and a host."""

    def convert(value: object, raw: _Raw, warnings: list[str]) -> str:
        parts = _split_url(value, allowed)
        if parts.scheme.lower() not in schemes or not parts.hostname:
            raise _Bad(allowed)
        return str(value).strip()

    return convert


_convert_amqp_url = _url_of(
    ("amqp", "amqps"), "an amqp:// or amqps:// URL such as amqp://user:password@host:5672/vhost"
)


def _convert_redis_url(value: object, raw: _Raw, warnings: list[str]) -> str:
    allowed = "host:port or a redis://, rediss:// or unix:// URL"
    text = _string(value, allowed)
    if "://" in text:
        parts = _split_url(text, allowed)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise _Bad(allowed)
        if scheme == "unix" and not parts.path:
            raise _Bad(allowed)
        if scheme != "unix" and not parts.hostname:
            raise _Bad(allowed)
        return text
    match = _REDIS_HOST_PORT.fullmatch(text)
    if match is None or not _valid_port(match.group("port"), allow_zero=False):
        raise _Bad(allowed)
    if match.group("host").startswith("[") and not _is_ipv6(match.group("host")[1:-1]):
        raise _Bad(allowed)
    return text


def _valid_port(port: str | None, *, allow_zero: bool) -> bool:
    if port is None:
        return True
    return port.isdigit() and len(port) <= 5 and (0 if allow_zero else 1) <= int(port) <= 65535


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


_LISTEN = re.compile(r"(?P<host>\[[^\]]*\]|[A-Za-z0-9.\-]*):(?P<port>[0-9]{1,5})")


def _convert_listen_address(value: object, raw: _Raw, warnings: list[str]) -> str:
    allowed = 'host:port such as ":8080" (every interface) or "127.0.0.1:9000", or "" (off)'
    text = _string(value, allowed)
    match = _LISTEN.fullmatch(text)
    if match is None or not _valid_port(match.group("port"), allow_zero=True):
        raise _Bad(allowed)
    host = match.group("host")
    if host.startswith("[") and not _is_ipv6(host[1:-1]):
        raise _Bad(allowed)
    return text


def _convert_endpoint(value: object, raw: _Raw, warnings: list[str]) -> str:
    allowed = "a path starting with / such as /metrics"
    text = _string(value, allowed)
    if not text.startswith("/") or any(c.isspace() or c in "?#" for c in text):
        raise _Bad(allowed)
    return text


_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::[0-9]{1,5})?")


def _convert_api_host(value: object, raw: _Raw, warnings: list[str]) -> str:
    allowed = "a host name, optionally with :port, such as discord.com"
    text = _string(value, allowed)
    if not _HOST.fullmatch(text):
        raise _Bad(allowed)
    try:
        _ = urlsplit(f"//{text}").port
    except ValueError:
        raise _Bad(allowed) from None
    return text


_convert_gateway_url = _url_of(
    ("ws", "wss"), "a ws:// or wss:// URL such as wss://gateway.discord.gg, or empty"
)


_PRESENCE_KEYS = ("since", "activities", "status", "afk", "game")


def _convert_activity(value: object, where: str) -> dict[str, Any]:
    allowed = 'an activity table such as { name = "x", type = 0 } (type 0 to 5)'
    if not isinstance(value, dict):
        raise _Bad(allowed, subkey=where, value=value)
    activity = dict(value)
    name = activity.get("name")
    if not isinstance(name, str) or not name:
        raise _Bad(allowed, subkey=f"{where}.name", value=name)
    kind = activity.setdefault("type", 0)
    if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind <= 5:
        raise _Bad(allowed, subkey=f"{where}.type", value=kind)
    return activity


def _convert_presence(value: object, raw: _Raw, warnings: list[str]) -> dict[str, Any] | None:
    allowed = 'a table, or a JSON object such as {"status": "online"}'
    data = value
    if isinstance(value, str):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _Bad(allowed, reason=f"is not valid JSON ({exc})") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise _Bad(allowed)
    if not data:
        return None
    presence: dict[str, Any] = {"since": None, "activities": [], "status": "online", "afk": False}
    game: object = None
    for key, item in data.items():
        name = str(key).lower()
        if name == "since":
            if item is not None and (
                isinstance(item, bool) or not isinstance(item, int) or item < 0
            ):
                raise _Bad(
                    "a Unix time in milliseconds, or null",
                    subkey="since",
                    value=item,
                )
            presence["since"] = item
        elif name == "status":
            if not isinstance(item, str) or item.lower() not in _PRESENCE_STATUSES:
                raise _Bad(
                    "one of " + ", ".join(_PRESENCE_STATUSES),
                    subkey="status",
                    value=item,
                )
            presence["status"] = item.lower()
        elif name == "afk":
            if not isinstance(item, bool):
                raise _Bad("true or false", subkey="afk", value=item)
            presence["afk"] = item
        elif name == "activities":
            if not isinstance(item, list):
                raise _Bad("a list of activity tables", subkey="activities", value=item)
            presence["activities"] = [
                _convert_activity(a, f"activities[{i}]") for i, a in enumerate(item)
            ]
        elif name == "game":
            game = None if item is None else _convert_activity(item, "game")
        else:
            close = difflib.get_close_matches(name, _PRESENCE_KEYS, n=1, cutoff=0.6)
            suggestion = [f"presence.{k}" for k in close]
            warnings.append(_unknown_key_warning(f"presence.{key}", raw.where, suggestion))
    if game is not None:
        if any(str(k).lower() == "activities" for k in data):
            warnings.append(
                f"config key 'presence.game' in {raw.where} is ignored: "
                "'presence.activities' is set too"
            )
        else:
            presence["activities"] = [game]  # the seed's (and old libraries') single game
    size = len(json.dumps(presence).encode())
    if size > _MAX_PRESENCE_BYTES:
        raise _Bad(
            f"a presence of at most {_MAX_PRESENCE_BYTES} bytes of JSON "
            "(identify payloads are limited to 4096 bytes)",
            reason=f"is too large ({size} bytes)",
        )
    return presence


KEYS: tuple[KeySpec, ...] = (
    KeySpec("token", "DISCORD_TOKEN", _convert_token, kind="token"),
    KeySpec("events", "DISCORD_EVENTS", _convert_events),
    KeySpec("intents", "DISCORD_INTENTS", _convert_intent_names),
    KeySpec("raw_intents", "DISCORD_RAW_INTENTS", _convert_raw_intents),
    KeySpec("gateway_version", "DISCORD_GATEWAY_VERSION", _int(1)),
    KeySpec("log_level", "LOG_LEVEL", _choice(*_LOG_LEVELS, aliases={"warning": "warn"})),
    KeySpec("presence", "DISCORD_PRESENCE", _convert_presence),
    KeySpec("shards.count", "DISCORD_SHARD_COUNT", _int(0)),
    KeySpec("shards.ids", "DISCORD_SHARD_IDS", _convert_shard_ids),
    KeySpec("broker.type", "BROKER_TYPE", _choice("stdio", "amqp", "redis")),
    KeySpec("broker.group", "BROKER_GROUP", _convert_group),
    KeySpec(
        "broker.message_timeout",
        "BROKER_MESSAGE_TIMEOUT",
        _duration(zero_is_default=True),
        kind="duration",
    ),
    KeySpec("broker.format", "BROKER_FORMAT", _choice("msgpack", "json")),
    KeySpec("broker.buffer", "BROKER_BUFFER", _int(1)),
    KeySpec("stdio.format", "STDIO_FORMAT", _choice("json", "msgpack")),
    KeySpec("prometheus.address", "PROMETHEUS_ADDRESS", _convert_listen_address),
    KeySpec("prometheus.endpoint", "PROMETHEUS_ENDPOINT", _convert_endpoint),
    KeySpec("prometheus.multiproc_dir", "PROMETHEUS_MULTIPROC_DIR", _convert_prefix),
    KeySpec("shard_store.type", "SHARD_STORE_TYPE", _choice("memory", "redis")),
    KeySpec("shard_store.prefix", "SHARD_STORE_PREFIX", _convert_prefix, empty_is_value=True),
    KeySpec("shard_store.session_ttl", "SHARD_STORE_SESSION_TTL", _duration(), kind="duration"),
    KeySpec("amqp.url", "AMQP_URL", _convert_amqp_url, kind="url"),
    KeySpec("amqp.persistent", "AMQP_PERSISTENT", _bool),
    KeySpec("amqp.prefetch", "AMQP_PREFETCH", _int(1)),
    KeySpec("redis.url", "REDIS_URL", _convert_redis_url, kind="url"),
    KeySpec("redis.pool_size", "REDIS_POOL_SIZE", _int(1)),
    KeySpec("redis.stream_prefix", "REDIS_STREAM_PREFIX", _convert_prefix, empty_is_value=True),
    KeySpec("redis.maxlen", "REDIS_STREAM_MAXLEN", _int(1)),
    KeySpec("api.scheme", "DISCORD_API_PROTOCOL", _choice("https", "http")),
    KeySpec("api.host", "DISCORD_API_HOST", _convert_api_host),
    KeySpec("api.version", "DISCORD_API_VERSION", _int(1)),
    KeySpec("gateway.url", "DISCORD_GATEWAY_URL", _convert_gateway_url),
    KeySpec(
        "gateway.compression",
        "DISCORD_COMPRESSION",
        _choice("zstd-stream", "zlib-stream", "none"),
    ),
    KeySpec("gateway.large_threshold", "DISCORD_LARGE_THRESHOLD", _int(50, 250)),
    KeySpec("gateway.hello_timeout", "DISCORD_HELLO_TIMEOUT", _duration(), kind="duration"),
    KeySpec("gateway.open_timeout", "DISCORD_OPEN_TIMEOUT", _duration(), kind="duration"),
    KeySpec("gateway.shutdown_timeout", "DISCORD_SHUTDOWN_TIMEOUT", _duration(), kind="duration"),
    KeySpec("supervisor.workers", "SUPERVISOR_WORKERS", _int(0)),
    KeySpec("supervisor.shards_per_worker", "SUPERVISOR_SHARDS_PER_WORKER", _int(0)),
    KeySpec("supervisor.stall_timeout", "SUPERVISOR_STALL_TIMEOUT", _duration(), kind="duration"),
)

_BY_PATH: dict[str, KeySpec] = {spec.path: spec for spec in KEYS}
_TABLES = frozenset(spec.path.rpartition(".")[0] for spec in KEYS if "." in spec.path)
#: The seed's other spellings (matched after lower-casing).
_KEY_ALIASES = {"rawintents": "raw_intents", "broker.url": "amqp.url"}


def _convert(
    spec: KeySpec, raw: _Raw, warnings: list[str], redactor: Redactor | None = None
) -> object:
    """Convert one given value; ``redactor`` scrubs secrets given elsewhere from the error."""
    try:
        return spec.convert(raw.value, raw, warnings)
    except _Bad as bad:
        path = spec.path
        if bad.subkey is not None:
            path = f"{path}.{bad.subkey}"
        value = spec.display(raw.value if bad.value is _GIVEN else bad.value)
        reason = bad.reason
        if redactor is not None:
            reason = redactor.redact(reason)
            if isinstance(value, str):
                value = redactor.redact(value)
        raise ConfigError(path, value, bad.allowed, env=spec.env, reason=reason) from None


# --------------------------------------------------------------------------------------------
# The command line


@dataclass(frozen=True)
class CliArgs:
    config_path: str = DEFAULT_CONFIG_PATH
    config_explicit: bool = False
    log_level: str | None = None
    shards: str | None = None
    shard_count: int | None = None
    workers: int | None = None
    shards_per_worker: int | None = None
    simulate: bool = False
    gateway_url: str | None = None
    events: str | None = None
    print_config: bool = False


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError("", None, "", message=f"command line: {message}")


def _parser() -> _ArgumentParser:
    parser = _ArgumentParser(
        prog="spectacles-supervise",
        description="Keeps Discord gateway shards connected and forwards their events to a "
        "broker. Settings come from the config file, then the environment, then these flags.",
        add_help=False,
        allow_abbrev=False,
    )
    add = parser.add_argument
    # Each flag also has the seed's single-dash (Go flag package) spelling.
    add("-h", "--help", "-help", action="store_true", dest="help", help="show this and exit")
    add("--config", "-config", metavar="FILE", help=f"TOML file (default {DEFAULT_CONFIG_PATH})")
    add(
        "--log-level",
        "-loglevel",
        "--loglevel",
        dest="log_level",
        metavar="LEVEL",
        help="suppress, error, warn, info or debug (LOG_LEVEL)",
    )
    add("--shards", "-shards", metavar="SPEC", help="shard ids to run, e.g. 0-15 or 0,2,4-7")
    add("--shard-count", "-shard-count", metavar="N", help="total shard count told to Discord")
    add("--workers", "-workers", metavar="N", help="worker processes (0 = automatic)")
    add(
        "--shards-per-worker",
        "-shards-per-worker",
        metavar="N",
        help="shards per worker process (exclusive with --workers)",
    )
    add("--simulate", "-simulate", action="store_true", help="run against the local simulator")
    add("--gateway-url", "-gateway-url", metavar="URL", help="gateway URL override (ws/wss)")
    add("--events", "-events", metavar="A,B", help="dispatch events to publish (DISCORD_EVENTS)")
    add(
        "--print-config",
        "-print-config",
        action="store_true",
        help="print the effective configuration (secrets redacted) and exit",
    )
    return parser


def _flag_int(path: str, flag: str, text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    value = _convert(_BY_PATH[path], _Raw(text, True, flag, 2), [])
    assert isinstance(value, int)
    return value


def parse_args(argv: Sequence[str]) -> CliArgs:
    """Parse the command line (without the program name).

    Raises :class:`ConfigError` for unknown flags or bad flag values (never ``SystemExit``),
    and :class:`HelpRequested` for ``-h``/``--help``.
    """
    parser = _parser()
    ns, rest = parser.parse_known_args(list(argv))
    if rest:
        # Never echo a stray value: it may be a token pasted in the wrong place.
        first = rest[0]
        if first.startswith("-"):
            shown = repr(first.partition("=")[0])
            raise ConfigError("", shown, "", message=f"command line: unknown flag {shown}")
        raise ConfigError(
            "", None, "", message="command line: unexpected argument (value not shown)"
        )
    if ns.help:
        raise HelpRequested(parser.format_help())
    log_level = None
    if ns.log_level is not None and ns.log_level.strip():
        raw = _Raw(ns.log_level, True, "--log-level", 2)
        log_level = str(_convert(_BY_PATH["log_level"], raw, []))
    return CliArgs(
        config_path=ns.config if ns.config is not None else DEFAULT_CONFIG_PATH,
        config_explicit=ns.config is not None,
        log_level=log_level,
        shards=ns.shards,
        shard_count=_flag_int("shards.count", "--shard-count", ns.shard_count),
        workers=_flag_int("supervisor.workers", "--workers", ns.workers),
        shards_per_worker=_flag_int(
            "supervisor.shards_per_worker", "--shards-per-worker", ns.shards_per_worker
        ),
        simulate=ns.simulate,
        gateway_url=ns.gateway_url,
        events=ns.events,
        print_config=ns.print_config,
    )


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    cli: CliArgs
    warnings: tuple[str, ...]


def _unknown_key_warning(key: str, where: str, suggestions: Sequence[str]) -> str:
    if suggestions:
        return f"unknown config key {key!r} in {where}; did you mean {suggestions[0]!r}?"
    return f"unknown config key {key!r} in {where} (ignored)"


def _canonical(path: str) -> str:
    if path in _BY_PATH or path in _TABLES:
        return path
    lower = path.lower()
    return _KEY_ALIASES.get(lower, lower)


def _read_file(cli: CliArgs) -> dict[str, Any]:
    path = Path(cli.config_path)
    shown = repr(cli.config_path)
    if not path.exists():
        if not cli.config_explicit:
            return {}  # the default file is optional, as in the seed
        raise ConfigError(
            "", cli.config_path, "", message=f"config file {shown} (--config) does not exist"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            "", cli.config_path, "", message=f"config file {shown} cannot be read: {exc.strerror}"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            "", cli.config_path, "", message=f"config file {shown} is not UTF-8 (at line {line})"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            "", cli.config_path, "", message=f"config file {shown} is not valid TOML: {exc}"
        ) from None


def _flatten_file(data: Mapping[str, Any], where: str, warnings: list[str]) -> dict[str, _Raw]:
    """The file's values by canonical key; unknown keys become warnings."""
    found: dict[str, _Raw] = {}
    known = [*_BY_PATH, *_KEY_ALIASES]

    def visit(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            written = f"{prefix}{key}"
            path = _canonical(written)
            spec = _BY_PATH.get(path)
            if spec is not None:
                previous = found.get(path)
                if previous is not None and previous.value != value:
                    raise ConfigError(
                        path,
                        spec.display(value),
                        f"one value, under one of its names ({path} or its old name)",
                        env=spec.env,
                        reason=f"is not allowed: {path} is also set to "
                        f"{_show(spec.display(previous.value))}",
                    )
                found[path] = _Raw(value, False, where, 0)
            elif path in _TABLES:
                if not isinstance(value, dict):
                    raise ConfigError(path, value, f"a table: [{path}]")
                visit(value, f"{path}.")
            elif isinstance(value, dict) and value:
                visit(value, f"{written}.")
            else:
                suggestions = difflib.get_close_matches(written.lower(), known, n=1, cutoff=0.6)
                suggestions = [_KEY_ALIASES.get(s, s) for s in suggestions]
                warnings.append(_unknown_key_warning(written, where, suggestions))

    visit(data, "")
    return found


def _is_unset(spec: KeySpec, raw: _Raw) -> bool:
    if not isinstance(raw.value, str) or raw.value.strip():
        return False
    return not (spec.empty_is_value and raw.level == 0)


def _flag_layer(cli: CliArgs) -> dict[str, _Raw]:
    flags: dict[str, tuple[str, object]] = {
        "log_level": ("--log-level", cli.log_level),
        "shards.ids": ("--shards", cli.shards),
        "shards.count": ("--shard-count", cli.shard_count),
        "supervisor.workers": ("--workers", cli.workers),
        "supervisor.shards_per_worker": ("--shards-per-worker", cli.shards_per_worker),
        "gateway.url": ("--gateway-url", cli.gateway_url),
        "events": ("--events", cli.events),
    }
    return {
        path: _Raw(value, isinstance(value, str), flag, 2)
        for path, (flag, value) in flags.items()
        if value is not None
    }


def _secret_candidates(layers: Sequence[Mapping[str, _Raw]]) -> Redactor:
    """Every secret given anywhere (even overridden), to scrub values shown in errors."""
    redactor = Redactor()
    for layer in layers:
        token = layer.get("token")
        if token is not None and isinstance(token.value, str):
            redactor.add(token.value, token.value.strip())
        for path in ("amqp.url", "redis.url"):
            raw = layer.get(path)
            if raw is not None and isinstance(raw.value, str):
                redactor.add(url_password(raw.value.strip()) or "")
    return redactor


def _nest(values: Mapping[str, object]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in values.items():
        section, _, name = path.rpartition(".")
        target = nested.setdefault(section, {}) if section else nested
        target[name] = value
    return nested


def load(argv: Sequence[str], environ: Mapping[str, str]) -> Loaded:
    """Parse ``argv``, read the config file, apply ``environ`` and the flags, and validate.

    Raises :class:`ConfigError` (one clear line) or :class:`HelpRequested`. Pure apart from
    reading the config file: no logging, no ``os.environ``, no exit.
    """
    cli = parse_args(argv)
    warnings: list[str] = []
    file_layer = _flatten_file(_read_file(cli), cli.config_path, warnings)
    env_layer = {
        spec.path: _Raw(environ[spec.env], True, spec.env, 1)
        for spec in KEYS
        if environ.get(spec.env, "").strip()
    }
    layers = (file_layer, env_layer, _flag_layer(cli))
    settings = _build(layers, cli, warnings)
    return Loaded(settings=settings, cli=cli, warnings=tuple(warnings))


def _build(layers: Sequence[Mapping[str, _Raw]], cli: CliArgs, warnings: list[str]) -> Settings:
    redactor = _secret_candidates(layers)
    chosen: dict[str, _Raw] = {}
    for layer in layers:
        for path, raw in layer.items():
            if not _is_unset(_BY_PATH[path], raw):
                chosen[path] = raw
    values: dict[str, object] = {}
    for spec in KEYS:
        given = chosen.get(spec.path)
        if given is not None:
            value = _convert(spec, given, warnings, redactor)
            if value is not None:
                values[spec.path] = value

    def level(path: str) -> int:
        raw = chosen.get(path)
        return -1 if raw is None else raw.level

    # Token: required, except when simulating.
    if not values.get("token"):
        if not cli.simulate:
            raise ConfigError(
                "token",
                None,
                "a Discord bot token in DISCORD_TOKEN or token in the config file",
                env="DISCORD_TOKEN",
                message="config key 'token' (env DISCORD_TOKEN): not set; expected a Discord "
                "bot token in DISCORD_TOKEN or 'token' in the config file",
            )
        values["token"] = SIMULATED_TOKEN

    # Intents: raw_intents wins when non-zero, unless names were given at a higher level.
    names = values.pop("intents", ())
    assert isinstance(names, tuple)
    raw_bits = values.get("raw_intents", 0)
    assert isinstance(raw_bits, int)
    if raw_bits and level("raw_intents") >= level("intents"):
        if names and level("raw_intents") == level("intents"):
            warnings.append(
                f"config key 'intents' in {chosen['intents'].where} is ignored: "
                "'raw_intents' is set too and wins"
            )
        values["intents"] = raw_bits
    else:
        values["intents"] = resolve_intents(names)
        values["raw_intents"] = 0

    # Worker sizing: workers and shards_per_worker exclude each other.
    workers = values.get("supervisor.workers", 0)
    per_worker = values.get("supervisor.shards_per_worker", 0)
    if workers and per_worker:
        if level("supervisor.workers") > level("supervisor.shards_per_worker"):
            values["supervisor.shards_per_worker"] = 0
        elif level("supervisor.shards_per_worker") > level("supervisor.workers"):
            values["supervisor.workers"] = 0
        else:
            raise ConfigError(
                "supervisor.shards_per_worker",
                per_worker,
                "0 when supervisor.workers is set (choose one of the two)",
                env="SUPERVISOR_SHARDS_PER_WORKER",
                reason=f"is not allowed together with supervisor.workers = {workers}",
            )

    # Shard ids must be below the count, when the count is configured.
    count = values.get("shards.count", 0)
    ids = values.get("shards.ids", ())
    assert isinstance(count, int)
    assert isinstance(ids, tuple)
    outside = [i for i in ids if count and i >= count]
    if outside:
        raise ConfigError(
            "shards.ids",
            chosen["shards.ids"].value,
            f"ids from 0 to {count - 1} (shards.count = {count})",
            env="DISCORD_SHARD_IDS",
            reason=f"is not allowed (id {outside[0]} is out of range)",
        )

    try:
        return Settings.model_validate(_nest(values))
    except ValidationError as exc:  # a rule above should have caught it first
        error = exc.errors()[0]
        path = ".".join(str(part) for part in error["loc"])
        known = _BY_PATH.get(path)
        raise ConfigError(
            path,
            known.display(error.get("input")) if known else MASK,
            error["msg"],
            env=known.env if known else None,
        ) from None


def run_or_exit(argv: Sequence[str], environ: Mapping[str, str]) -> Loaded:
    """:func:`load` for a command's ``main``.

    On a :class:`ConfigError`, prints ``spectacles-gateway: configuration error: <msg>`` to
    stderr and raises ``SystemExit(78)``. ``--help`` prints the usage and ``--print-config`` the
    redacted settings (after any warnings, on stderr), both to stdout, then ``SystemExit(0)``.
    """
    try:
        loaded = load(argv, environ)
    except HelpRequested as help_:
        sys.stdout.write(help_.text)
        raise SystemExit(0) from None
    except ConfigError as err:
        print(f"{PROG}: configuration error: {err}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    if loaded.cli.print_config:
        for warning in loaded.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        sys.stdout.write(loaded.settings.redacted_dump())
        raise SystemExit(0)
    return loaded
