"""The settings: frozen, typed msgspec structs, one field per row of :data:`.keys.KEYS`.

They hold values the converters already checked, so construction validates nothing per field;
``__post_init__`` checks the rules that span keys (shard ids below the count, one way to size
the workers, a fleet needs the Redis store, documented intents), so that settings built
directly (in tests) obey them too. ``repr()`` masks every secret as the key table says.

Why msgspec structs rather than frozen dataclasses: msgspec is loaded by both processes anyway
(envelopes, the worker plan, the control channel), a struct class is built in about 30 us
where a dataclass takes about 700 us (``exec`` of generated code), and ``__eq__``,
``__post_init__``, ``msgspec.structs.replace`` and ``__slots__`` come with it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit

import msgspec

from spectacles_gateway.intents import undocumented_bits
from spectacles_gateway.redact import SecretStr, url_secrets

from .converters import DEFAULT_REDIS_PORT, host_port
from .keys import BY_PATH, LOG_LEVELS, key_error

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SECTIONS",
    "AmqpSettings",
    "ApiSettings",
    "BrokerSettings",
    "CliArgs",
    "CommandsSettings",
    "FleetSettings",
    "GatewaySettings",
    "Loaded",
    "PrometheusSettings",
    "RedisSettings",
    "ReshardCommand",
    "ReshardSettings",
    "Settings",
    "ShardStoreSettings",
    "ShardsSettings",
    "StatusCommand",
    "StdioSettings",
    "SupervisorSettings",
    "value_at",
]

DEFAULT_CONFIG_PATH = "gateway.toml"
LogLevel = Literal["suppress", "error", "warn", "info", "debug"]


class _Section(msgspec.Struct, frozen=True, kw_only=True):
    """A frozen group of keys; ``section`` is its table name (``""`` for the top level)."""

    section: ClassVar[str] = ""

    def __repr__(self) -> str:
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            spec = BY_PATH.get(f"{self.section}.{name}" if self.section else name)
            shown = value if spec is None else spec.display(value)
            parts.append(f"{name}={shown!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class ShardsSettings(_Section, frozen=True):
    section: ClassVar[str] = "shards"

    count: int = 0
    """Total shard count told to Discord; 0 = Discord's recommendation."""
    ids: tuple[int, ...] = ()
    """Shard ids to run, sorted; empty = all of ``0..count-1``."""

    def __post_init__(self) -> None:
        outside = [i for i in self.ids if self.count and i >= self.count]
        if outside:
            raise key_error(
                "shards.ids",
                self.ids,
                f"ids from 0 to {self.count - 1} (shards.count = {self.count})",
                reason=f"is not allowed (id {outside[0]} is out of range)",
            )


class BrokerSettings(_Section, frozen=True):
    section: ClassVar[str] = "broker"

    type: Literal["stdio", "amqp", "redis"] = "stdio"
    group: str = "gateway"
    message_timeout: float = 120.0
    """Seconds; the AMQP ``expiration`` in milliseconds."""
    format: Literal["msgpack", "json"] = "msgpack"
    """Message body format for AMQP and Redis."""
    buffer: int = 10000
    """Events handed to the broker and not yet confirmed, at most; then shards stop reading."""


class StdioSettings(_Section, frozen=True):
    section: ClassVar[str] = "stdio"

    format: Literal["json", "msgpack"] = "json"


class PrometheusSettings(_Section, frozen=True):
    section: ClassVar[str] = "prometheus"

    address: str = ""
    """``host:port`` to listen on; ``""`` = disabled, ``":8080"`` = every interface."""
    endpoint: str = "/metrics"
    max_clients: int = 64
    """HTTP clients served at once; more are refused (closed at once) until one is done."""
    shard_series: Literal["all", "minimal"] = "all"
    """``minimal``: per-shard series for state and the last latency only; counters and the
    ``gateway_ping`` histogram per worker."""

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


class ShardStoreSettings(_Section, frozen=True):
    section: ClassVar[str] = "shard_store"

    type: Literal["memory", "redis"] = "memory"
    prefix: str = "gateway"
    session_ttl: float = 300.0
    """Seconds a stored session outlives its last save (then it cannot be resumed anyway)."""


class AmqpSettings(_Section, frozen=True):
    section: ClassVar[str] = "amqp"

    url: str = "amqp://guest:guest@localhost:5672/%2F"
    persistent: bool = False
    """Publish with delivery mode 2 (persistent)."""
    prefetch: int = 100
    """Unacknowledged commands a worker holds at most."""


class RedisSettings(_Section, frozen=True):
    section: ClassVar[str] = "redis"

    url: str = "localhost:6379"
    """``host:port`` (the seed's form), a ``redis://``, ``rediss://`` or ``unix://`` URL, or a
    ``redis+sentinel://[:password@]host:port[,host:port...]/master[/db]`` URL."""
    pool_size: int = 5
    stream_prefix: str = ""
    """Prefix of the event streams of the Redis broker (the stream key is prefix + event)."""
    maxlen: int = 100_000
    """Approximate length each event stream is trimmed to (``XADD ... MAXLEN ~ N``)."""
    sentinels: tuple[tuple[str, int], ...] = ()
    """Redis Sentinel addresses ``(host, port)``, from ``sentinels`` or a sentinel URL; empty
    = no Sentinel: ``url`` is the server itself."""
    sentinel_master: str = "mymaster"
    """The master's name at the Sentinels."""

    @property
    def dsn(self) -> str:
        """The URL for ``redis.from_url``: ``localhost:6379`` -> ``redis://localhost:6379``.

        Meaningless with Sentinel (check :attr:`sentinels` first)."""
        if "://" in self.url:
            return self.url
        host, port = host_port(self.url, DEFAULT_REDIS_PORT, "")
        return f"redis://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def username(self) -> str | None:
        """The user name of the URL, percent-decoded (also for the Sentinel form)."""
        name = urlsplit(self.dsn).username if "@" in self.url else None
        return unquote(name) if name else None

    @property
    def password(self) -> str | None:
        """The password of the URL, percent-decoded (also for the Sentinel form)."""
        password = urlsplit(self.dsn).password if "@" in self.url else None
        return unquote(password) if password else None

    @property
    def db(self) -> int:
        """The database number: ``/db`` of a redis URL, ``/master/db`` of a Sentinel URL."""
        if "://" not in self.url or self.url.lower().startswith("unix:"):
            return 0
        path = urlsplit(self.url).path.strip("/").split("/")
        if self.url.lower().startswith("redis+sentinel:"):
            path = path[1:]
        return int(path[0]) if path and path[0].isdigit() else 0


class ApiSettings(_Section, frozen=True):
    section: ClassVar[str] = "api"

    scheme: Literal["https", "http"] = "https"
    host: str = "discord.com"
    version: int = 10

    @property
    def base_url(self) -> str:
        """``https://discord.com/api/v10``."""
        return f"{self.scheme}://{self.host}/api/v{self.version}"


class GatewaySettings(_Section, frozen=True):
    section: ClassVar[str] = "gateway"

    url: str = ""
    """Gateway URL override (``ws://``/``wss://``); ``""`` = the URL Discord hands out."""
    compression: Literal["zstd-stream", "zlib-stream", "none"] = "zstd-stream"
    large_threshold: int = 250
    hello_timeout: float = 20.0
    open_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    max_message_size: int = 64 * 1024 * 1024
    """Bytes; the largest gateway message, compressed, reassembled or decompressed."""


class CommandsSettings(_Section, frozen=True):
    section: ClassVar[str] = "commands"

    queue_limit: int = 1000
    """Commands queued per shard at most; more are dropped and counted."""
    max_age: float = 120.0
    """Seconds a queued command may wait to be sent; older ones are dropped and counted."""


class SupervisorSettings(_Section, frozen=True):
    section: ClassVar[str] = "supervisor"

    workers: int = 0
    """Number of worker processes; 0 = automatic."""
    shards_per_worker: int = 0
    """Shards per worker process; 0 = automatic. Exclusive with ``workers``."""
    stall_timeout: float = 15.0
    """A worker that sends no heartbeat for this long has a stuck event loop: it is killed."""
    input_buffer: int = 4 * 1024 * 1024
    """Bytes of stdin commands held for one worker at most (for example while it restarts)."""

    def __post_init__(self) -> None:
        if self.workers and self.shards_per_worker:
            raise key_error(
                "supervisor.shards_per_worker",
                self.shards_per_worker,
                "0 when supervisor.workers is set (choose one of the two)",
                reason=f"is not allowed together with supervisor.workers = {self.workers}",
            )


class FleetSettings(_Section, frozen=True):
    section: ClassVar[str] = "fleet"

    name: str = ""
    """The fleet this supervisor joins; ``""`` = no fleet (it runs its shards alone)."""
    member: str = ""
    """This member's id; :func:`~spectacles_gateway.config.load` resolves ``""`` to
    ``<hostname>-<pid>``."""
    capacity: int = 0
    """Shards this member runs at most; 0 = no limit."""
    lease: float = 10.0
    """Seconds a shard's lease lasts without renewal."""

    @property
    def enabled(self) -> bool:
        return bool(self.name)


class ReshardSettings(_Section, frozen=True):
    section: ClassVar[str] = "reshard"

    policy: Literal["off", "recommended", "manual"] = "recommended"
    check_interval: float = 3600.0
    """Seconds between two looks at Discord's recommended shard count."""
    budget_reserve: int = 50
    """Session starts a reshard leaves in Discord's daily budget."""
    timeout: float = 300.0
    """Seconds the new generation may take to be ready with its guilds, beyond the time its
    identifies take by Discord's pacing; then the reshard rolls back."""
    overlap: float = 1.0
    """Seconds both generations publish after the switch before the old one closes."""


class Settings(_Section, frozen=True):
    """The validated, effective configuration; build it with :func:`~.load` (or directly in
    tests: ``Settings(token=SecretStr("x"), broker=BrokerSettings(type="amqp"))``)."""

    token: SecretStr
    token_file: str = ""
    """The file the token was read from (``DISCORD_TOKEN_FILE``, a systemd credential or a
    Docker secret); ``""`` when it was given as ``token``."""
    events: frozenset[str] = frozenset()
    intents: int = 0
    """The resolved intents bitfield sent with identify."""
    raw_intents: int = 0
    """The configured bitfield (0 when the names in ``intents`` decided)."""
    gateway_version: int = 10
    log_level: LogLevel = "info"
    presence: dict[str, Any] | None = None
    """Update Presence object for identify: ``since``, ``activities``, ``status``, ``afk``."""
    shards: ShardsSettings = msgspec.field(default_factory=ShardsSettings)
    broker: BrokerSettings = msgspec.field(default_factory=BrokerSettings)
    stdio: StdioSettings = msgspec.field(default_factory=StdioSettings)
    prometheus: PrometheusSettings = msgspec.field(default_factory=PrometheusSettings)
    shard_store: ShardStoreSettings = msgspec.field(default_factory=ShardStoreSettings)
    amqp: AmqpSettings = msgspec.field(default_factory=AmqpSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    api: ApiSettings = msgspec.field(default_factory=ApiSettings)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    commands: CommandsSettings = msgspec.field(default_factory=CommandsSettings)
    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    fleet: FleetSettings = msgspec.field(default_factory=FleetSettings)
    reshard: ReshardSettings = msgspec.field(default_factory=ReshardSettings)

    def __post_init__(self) -> None:
        extra = undocumented_bits(self.intents)
        if extra:
            raise key_error(
                "raw_intents",
                self.intents,
                "a bitfield of documented intents",
                reason=f"is not allowed (undocumented bits {extra})",
            )
        if self.fleet.name and self.shard_store.type != "redis":
            raise key_error(
                "fleet.name",
                self.fleet.name,
                "shard_store.type = 'redis' (SHARD_STORE_TYPE=redis): a fleet shares its "
                "leases and sessions through Redis",
                reason=f"is not allowed with shard_store.type = {self.shard_store.type!r}",
            )

    @property
    def publish_all(self) -> bool:
        """True when ``events`` contains ``*``: every dispatch is published."""
        return "*" in self.events

    @property
    def logging_level(self) -> int:
        """The :mod:`logging` level; ``suppress`` is above CRITICAL."""
        return LOG_LEVELS[self.log_level]

    def secrets(self) -> tuple[str, ...]:
        """The token and every secret of the URLs (also percent-decoded), for a log redactor."""
        found = [self.token.get_secret_value()]
        for spec in BY_PATH.values():
            if spec.kind in ("url", "userinfo-url"):
                url = value_at(self, spec.path)
                assert isinstance(url, str)
                for secret in url_secrets(url, whole_userinfo=spec.kind == "userinfo-url"):
                    found += [secret, unquote(secret)]
        return tuple(dict.fromkeys(s for s in found if s))


#: The sections of :class:`Settings` by table name, in the key table's order.
SECTIONS: dict[str, type[_Section]] = {
    cls.section: cls
    for cls in (
        ShardsSettings,
        BrokerSettings,
        StdioSettings,
        PrometheusSettings,
        ShardStoreSettings,
        AmqpSettings,
        RedisSettings,
        ApiSettings,
        GatewaySettings,
        CommandsSettings,
        SupervisorSettings,
        FleetSettings,
        ReshardSettings,
    )
}


def value_at(settings: Settings, path: str) -> object:
    """The value of the dotted key ``path`` (``"broker.type"``)."""
    section, _, name = path.rpartition(".")
    owner: object = getattr(settings, section) if section else settings
    return getattr(owner, name)


# --------------------------------------------------------------------------------------------
# The command line and the result of loading


class StatusCommand(msgspec.Struct, frozen=True, kw_only=True):
    """``spectacles-supervise status [--url URL] [--json]``: ask a running supervisor."""

    url: str | None = None
    """Its HTTP endpoint (``http://127.0.0.1:8080``); None = from ``prometheus.address``."""
    json: bool = False


class ReshardCommand(msgspec.Struct, frozen=True, kw_only=True):
    """``spectacles-supervise reshard [--to N] [--url URL]``: ask for a reshard."""

    to: int | None = None
    """The new shard count; None = Discord's recommendation."""
    url: str | None = None


class CliArgs(msgspec.Struct, frozen=True, kw_only=True):
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
    fleet: str | None = None
    print_config: bool = False
    command: StatusCommand | ReshardCommand | None = None
    """A sub-command; None = run the gateway."""


class Loaded(msgspec.Struct, frozen=True, kw_only=True):
    settings: Settings
    cli: CliArgs
    warnings: tuple[str, ...]
