"""Converters: what was given (a TOML value, or the text of an environment variable or a flag)
to the typed value of one key, or :class:`Bad` saying what is allowed.

Every converter has the signature ``convert(value, raw, warnings) -> typed value``: ``raw`` says
where the value came from (``raw.text`` is true for environment and flag text, which is parsed;
TOML values must already have the right type), ``warnings`` collects what is accepted but
worth saying. They are the only validation of values: the settings structs trust them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import SplitResult, urlsplit

from spectacles_gateway.durations import DurationError, parse_duration
from spectacles_gateway.intents import (
    ALL_INTENTS,
    UnknownIntentError,
    resolve_intents,
    undocumented_bits,
)
from spectacles_gateway.shardspec import MAX_SHARD_ID, ShardSpecError, parse_shard_spec

__all__ = [
    "DEFAULT_REDIS_PORT",
    "DEFAULT_SENTINEL_PORT",
    "Bad",
    "Convert",
    "Raw",
    "SentinelUrl",
    "format_size",
    "parse_sentinel_url",
    "parse_size",
    "unknown_key_warning",
]

DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


class Raw(NamedTuple):
    """One value as given: ``text`` is true for strings from the environment or a flag."""

    value: object
    text: bool
    where: str  # "gateway.toml", "DISCORD_PRESENCE", "--events"
    level: int  # 0 file, 1 environment, 2 flag


_GIVEN: Any = object()  # "the value as given" in Bad


class Bad(Exception):
    """A converter's refusal: ``allowed`` is what would have been accepted.

    ``subkey`` names a part of the value (``status`` for ``presence.status``), ``value`` the
    offending part when it is not the whole value.
    """

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
        self.subkey = subkey
        self.value = value

    @property
    def whole(self) -> bool:
        """True when the whole value is at fault (no ``value`` part was named)."""
        return self.value is _GIVEN


Convert = Callable[[object, Raw, list[str]], object]


def unknown_key_warning(key: str, where: str, suggestions: list[str]) -> str:
    if suggestions:
        return f"unknown config key {key!r} in {where}; did you mean {suggestions[0]!r}?"
    return f"unknown config key {key!r} in {where} (ignored)"


# --------------------------------------------------------------------------------------------
# Scalars


def int_range(minimum: int, maximum: int | None = None) -> Convert:
    if maximum is None:
        allowed = f"an integer >= {minimum}"
    else:
        allowed = f"an integer from {minimum} to {maximum}"

    def convert(value: object, raw: Raw, warnings: list[str]) -> int:
        if raw.text and isinstance(value, str):
            text = value.strip()
            if not re.fullmatch(r"[+-]?[0-9]+", text):
                raise Bad(allowed)
            number = int(text)
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise Bad(allowed)
        if number < minimum or (maximum is not None and number > maximum):
            raise Bad(allowed)
        return number

    return convert


NON_NEGATIVE = int_range(0)


def string(value: object, allowed: str) -> str:
    if not isinstance(value, str):
        raise Bad(allowed)
    return value.strip()


def choice(*options: str, aliases: Mapping[str, str] | None = None) -> Convert:
    allowed = "one of " + ", ".join(options)

    def convert(value: object, raw: Raw, warnings: list[str]) -> str:
        text = string(value, allowed).lower()
        text = (aliases or {}).get(text, text)
        if text not in options:
            raise Bad(allowed)
        return text

    return convert


def duration(*, minimum: float = 0.001, zero_is_default: bool = False) -> Convert:
    """Go-style durations; ``minimum`` in seconds (a millisecond unless said otherwise)."""
    allowed = "a duration such as 2m, 90s, 1h30m, 1.5s or 300ms"
    if minimum >= 1:
        allowed = f"a duration of at least {minimum:g}s such as " + allowed.split(" such as ")[1]
    elif not zero_is_default:
        allowed = "a positive " + allowed.removeprefix("a ")

    def convert(value: object, raw: Raw, warnings: list[str]) -> float | None:
        text = string(value, allowed)
        try:
            seconds = parse_duration(text)
        except DurationError as exc:
            raise Bad(allowed, reason=f"is not allowed ({exc})") from None
        if seconds == 0:
            if zero_is_default:
                return None  # the seed's rule: 0 means the default
            raise Bad(allowed)
        if seconds < minimum:
            below = "one millisecond" if minimum == 0.001 else f"{minimum:g}s"
            raise Bad(allowed, reason=f"is not allowed (below {below})")
        return seconds

    return convert


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")


def parse_size(text: str) -> int:
    """``"64MiB"`` -> 67108864, ``"512KiB"``, ``"1.5MB"``, ``"4096"`` (bytes; fractions of a
    byte are dropped). Units: B, KB/MB/GB (powers of 1000), KiB/MiB/GiB (powers of 1024), in
    any case. Raises ValueError."""
    match = _SIZE.fullmatch(text.strip())
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"not a size: {text!r}")
    number = match.group(1)
    if "." not in number:
        return int(number) * unit
    whole, frac = number.split(".")
    scale: int = 10 ** len(frac)
    return int(whole) * unit + int(frac) * unit // scale


def format_size(size: int) -> str:
    """The shortest exact form that :func:`parse_size` reads back: ``67108864`` -> ``"64MiB"``."""
    for suffix, unit in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def size(minimum: int, maximum: int) -> Convert:
    """A number of bytes: an integer, or text with a unit such as ``64MiB``."""
    allowed = (
        f"a size from {format_size(minimum)} to {format_size(maximum)}, such as 64MiB, "
        "512KiB or a number of bytes"
    )

    def convert(value: object, raw: Raw, warnings: list[str]) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = parse_size(value)
            except ValueError:
                raise Bad(allowed) from None
        else:
            raise Bad(allowed)
        if not minimum <= number <= maximum:
            raise Bad(allowed)
        return number

    return convert


def boolean(value: object, raw: Raw, warnings: list[str]) -> bool:
    allowed = "true or false"
    if isinstance(value, bool):
        return value
    if raw.text and isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
    raise Bad(allowed)


def any_string(value: object, raw: Raw, warnings: list[str]) -> str:
    return string(value, "a string (may be empty)")


def _name_pattern(max_length: int) -> re.Pattern[str]:
    return re.compile(rf"[A-Za-z0-9][A-Za-z0-9._\-]{{0,{max_length - 1}}}")


def identifier(what: str, max_length: int) -> Convert:
    """A name used inside Redis keys and logs: letters, digits, ``.``, ``_`` and ``-``."""
    allowed = f"{what}: letters, digits, '.', '_' and '-', at most {max_length} characters"
    pattern = _name_pattern(max_length)

    def convert(value: object, raw: Raw, warnings: list[str]) -> str:
        text = string(value, allowed)
        if not pattern.fullmatch(text):
            raise Bad(allowed)
        return text

    return convert


def token(value: object, raw: Raw, warnings: list[str]) -> str:
    text = string(value, "a string: the bot token")
    if any(c.isspace() for c in text):
        raise Bad("the bare bot token (no 'Bot ' prefix, no spaces)")
    return text


def group(value: object, raw: Raw, warnings: list[str]) -> str:
    allowed = "a name without spaces, at most 255 bytes"
    text = string(value, allowed)
    if len(text.encode()) > 255 or any(c.isspace() or not c.isprintable() for c in text):
        raise Bad(allowed)
    return text


# --------------------------------------------------------------------------------------------
# Lists of names


def _names(value: object, raw: Raw, what: str, example: str) -> list[str]:
    allowed = f"a list of {what} names such as {example}"
    if raw.text and isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, list):
        items = value
    else:
        raise Bad(allowed)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise Bad(allowed)
        name = item.strip().upper()
        if name and name not in names:
            names.append(name)
    return names


_EVENT_NAME = re.compile(r"[A-Z0-9_]+|\*")


def events(value: object, raw: Raw, warnings: list[str]) -> frozenset[str]:
    names = _names(value, raw, "dispatch event", '["MESSAGE_CREATE", "GUILD_CREATE"] or "*"')
    for name in names:
        if not _EVENT_NAME.fullmatch(name):
            raise Bad(
                "event names of letters, digits and _ (MESSAGE_CREATE), or * for every event",
                value=name,
            )
    return frozenset(names)


def intent_names(value: object, raw: Raw, warnings: list[str]) -> tuple[str, ...]:
    names = _names(value, raw, "intent", '["GUILDS", "GUILD_MESSAGES"]')
    for name in names:
        try:
            resolve_intents([name])
        except UnknownIntentError as exc:
            if exc.suggestion:
                allowed = f"a known intent name; did you mean {exc.suggestion!r}?"
            else:
                allowed = "a known intent name such as GUILDS, GUILD_MESSAGES or MESSAGE_CONTENT"
            raise Bad(allowed, value=name) from None
    return tuple(names)


def raw_intents(value: object, raw: Raw, warnings: list[str]) -> int:
    bits = NON_NEGATIVE(value, raw, warnings)
    assert isinstance(bits, int)
    extra = undocumented_bits(bits)
    if extra:
        raise Bad(
            f"a bitfield of documented intents (all of them = {ALL_INTENTS})",
            reason=f"is not allowed (undocumented bits {extra})",
        )
    return bits


def shard_ids(value: object, raw: Raw, warnings: list[str]) -> tuple[int, ...]:
    allowed = 'shard ids such as [0, 1, 2] or a spec such as "0-15" or "0,2,4-7"'
    if isinstance(value, str):
        try:
            return parse_shard_spec(value)
        except ShardSpecError as exc:
            raise Bad(allowed, reason=f"is not allowed ({exc})") from None
    if not isinstance(value, list):
        raise Bad(allowed)
    ids: set[int] = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_SHARD_ID:
            raise Bad(allowed)
        ids.add(item)
    return tuple(sorted(ids))


# --------------------------------------------------------------------------------------------
# Addresses and URLs


_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._\-]+)(?::(?P<port>[0-9]+))?")


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


def host_port(text: str, default_port: int, allowed: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; the port may be left out) as ``(host, port)``; IPv6
    hosts without brackets."""
    match = _HOST_PORT.fullmatch(text.strip())
    if match is None or not _valid_port(match.group("port"), allow_zero=False):
        raise Bad(allowed)
    host = match.group("host")
    if host.startswith("["):
        host = host[1:-1]
        if not _is_ipv6(host):
            raise Bad(allowed)
    port = match.group("port")
    return host, default_port if port is None else int(port)


def _split_url(value: object, allowed: str) -> SplitResult:
    text = string(value, allowed)
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        raise Bad(allowed) from None
    return parts


def url_of(schemes: tuple[str, ...], allowed: str) -> Convert:
    """A converter for a URL with one of ``schemes`` and a host."""

    def convert(value: object, raw: Raw, warnings: list[str]) -> str:
        parts = _split_url(value, allowed)
        if parts.scheme.lower() not in schemes or not parts.hostname:
            raise Bad(allowed)
        return str(value).strip()

    return convert


amqp_url = url_of(
    ("amqp", "amqps"), "an amqp:// or amqps:// URL such as amqp://user:password@host:5672/vhost"
)
gateway_url = url_of(
    ("ws", "wss"), "a ws:// or wss:// URL such as wss://gateway.discord.gg, or empty"
)
http_url = url_of(("http", "https"), "an http:// or https:// URL such as http://127.0.0.1:8080")


class SentinelUrl(NamedTuple):
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int


_SENTINEL_SCHEME = "redis+sentinel"
_MASTER_NAME = _name_pattern(128)
_REDIS_URL_ALLOWED = (
    "host:port, a redis://, rediss:// or unix:// URL, or "
    "redis+sentinel://[:password@]host:port[,host:port...]/master[/db]"
)


def parse_sentinel_url(text: str) -> SentinelUrl:
    """``redis+sentinel://[:password@]host:port[,host:port...]/master[/db]``, parsed.

    A sentinel's port may be left out (26379). Raises :class:`Bad`.
    """
    allowed = _REDIS_URL_ALLOWED
    scheme, _, rest = text.strip().partition("://")
    if scheme.lower() != _SENTINEL_SCHEME:
        raise Bad(allowed)
    rest = rest.partition("#")[0].partition("?")[0]
    after_userinfo = rest.rpartition("@")[2]
    hosts, _, path = after_userinfo.partition("/")
    master, _, db = path.rstrip("/").partition("/")
    if not hosts or not _MASTER_NAME.fullmatch(master) or (db and not db.isdigit()):
        raise Bad(allowed)
    sentinels = tuple(host_port(h, DEFAULT_SENTINEL_PORT, allowed) for h in hosts.split(","))
    return SentinelUrl(sentinels, master, int(db) if db else 0)


def redis_url(value: object, raw: Raw, warnings: list[str]) -> str:
    allowed = _REDIS_URL_ALLOWED
    text = string(value, allowed)
    if text.lower().startswith(f"{_SENTINEL_SCHEME}://"):
        parse_sentinel_url(text)
        return text
    if "://" in text:
        parts = _split_url(text, allowed)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise Bad(allowed)
        if scheme == "unix" and not parts.path:
            raise Bad(allowed)
        if scheme != "unix" and not parts.hostname:
            raise Bad(allowed)
        return text
    host_port(text, DEFAULT_REDIS_PORT, allowed)
    return text


def sentinels(value: object, raw: Raw, warnings: list[str]) -> tuple[tuple[str, int], ...]:
    allowed = 'Sentinel addresses host:port, as a list or a comma list ("s1:26379,s2:26379")'
    if isinstance(value, str):
        items: list[object] = [item for item in value.split(",") if item.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise Bad(allowed)
    found: list[tuple[str, int]] = []
    for item in items:
        if not isinstance(item, str):
            raise Bad(allowed)
        address = host_port(item, DEFAULT_SENTINEL_PORT, allowed)
        if address not in found:
            found.append(address)
    return tuple(found)


sentinel_master = identifier("a Sentinel master name", 128)


_LISTEN = re.compile(r"(?P<host>\[[^\]]*\]|[A-Za-z0-9.\-]*):(?P<port>[0-9]{1,5})")


def listen_address(value: object, raw: Raw, warnings: list[str]) -> str:
    allowed = 'host:port such as ":8080" (every interface) or "127.0.0.1:9000", or "" (off)'
    text = string(value, allowed)
    match = _LISTEN.fullmatch(text)
    if match is None or not _valid_port(match.group("port"), allow_zero=True):
        raise Bad(allowed)
    host = match.group("host")
    if host.startswith("[") and not _is_ipv6(host[1:-1]):
        raise Bad(allowed)
    return text


def endpoint(value: object, raw: Raw, warnings: list[str]) -> str:
    allowed = "a path starting with / such as /metrics"
    text = string(value, allowed)
    if not text.startswith("/") or any(c.isspace() or c in "?#" for c in text):
        raise Bad(allowed)
    return text


_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::[0-9]{1,5})?")


def api_host(value: object, raw: Raw, warnings: list[str]) -> str:
    allowed = "a host name, optionally with :port, such as discord.com"
    text = string(value, allowed)
    if not _HOST.fullmatch(text):
        raise Bad(allowed)
    try:
        _ = urlsplit(f"//{text}").port
    except ValueError:
        raise Bad(allowed) from None
    return text
