"""Where the settings come from: the TOML file, then the environment, then the flags.

:func:`resolve` merges the three layers (a higher layer wins key by key), converts each value
once with its key's converter, applies the rules that choose between keys, finds the token
(given, or read from a file) and builds the frozen :class:`~.schema.Settings`. It reads the
config file and the token's file, and nothing else: no ``os.environ``, no logging, no exit.

Rules that hold for every key:

- An empty value (``""`` in the file, an empty environment variable or flag) counts as unset,
  except for the keys whose ``""`` is a value (``shard_store.prefix = ""`` in the file).
- Unknown keys in the file are warnings with the closest known key. Key names are matched
  case-insensitively, as the seed's Go TOML decoder did; ``rawintents`` and ``[broker] url``
  are the seed's spellings of ``raw_intents`` and ``[amqp] url``.
- Two keys that choose between modes (``raw_intents`` over ``intents``; ``token`` against
  ``token_file``; ``supervisor.workers`` against ``supervisor.shards_per_worker``) follow the
  precedence as a whole: the one set at the higher layer wins. Set in the same layer,
  ``raw_intents`` wins when non-zero; the two other pairs are an error.

The token, first found wins: ``token`` (``DISCORD_TOKEN``) or ``token_file``
(``DISCORD_TOKEN_FILE``) as above; then the systemd credential
``$CREDENTIALS_DIRECTORY/discord_token`` (``LoadCredential=discord_token:...``); then the
Docker secret ``/run/secrets/discord_token``; then, with ``--simulate``, the simulator's own
token. A file's trailing newline is dropped; an unreadable, empty or oversized file is a
:class:`~.errors.ConfigError` naming the key and the file, never the content.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spectacles_gateway.intents import resolve_intents
from spectacles_gateway.redact import Redactor, SecretStr, url_secrets

from . import converters as c
from .errors import ConfigError, show
from .keys import BY_PATH, KEY_ALIASES, KEYS, TABLES, KeySpec, convert, key_error
from .schema import SECTIONS, CliArgs, Settings

__all__ = ["DOCKER_SECRETS_DIR", "SIMULATED_TOKEN", "TOKEN_CREDENTIAL", "resolve"]

#: The token used with ``--simulate`` when none is configured.
SIMULATED_TOKEN = "simulated-token"  # noqa: S105 - not a secret
#: The name of the token's systemd credential and Docker secret.
TOKEN_CREDENTIAL = "discord_token"  # noqa: S105 - a file name
#: Where Docker (and compose) mount secrets.
DOCKER_SECRETS_DIR = "/run/secrets"
#: A token file longer than this is not a token file (a wrong path).
MAX_TOKEN_FILE = 4096
#: A config file longer than this is not a config file (every key fits in a few KiB).
MAX_CONFIG_FILE = 1024 * 1024
#: Tables nested deeper than this are not ours: every key is at most two levels down.
MAX_TABLE_DEPTH = 16

_FILE, _ENV, _FLAG = 0, 1, 2


# --------------------------------------------------------------------------------------------
# The layers


def _read_file(cli: CliArgs) -> dict[str, Any]:
    path = Path(cli.config_path)
    shown = repr(cli.config_path)

    def fail(what: str) -> ConfigError:
        return ConfigError("", cli.config_path, "", message=f"config file {shown} {what}")

    if not path.exists():
        if not cli.config_explicit:
            return {}  # the default file is optional, as in the seed
        raise fail("(--config) does not exist")
    try:
        with path.open("rb") as file:  # bounded: --config /dev/zero must not fill memory
            data = file.read(MAX_CONFIG_FILE + 1)
    except OSError as exc:
        raise fail(f"cannot be read: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_FILE:
        raise fail(f"is too large (over {MAX_CONFIG_FILE} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise fail(f"is not UTF-8 (at line {line})") from None
    import tomllib  # only when a file is read: 1.4 MiB the supervisor need not hold otherwise

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"is not valid TOML: {exc}") from None
    except RecursionError:
        raise fail("is not valid TOML: nested too deeply") from None


def _canonical(path: str) -> str:
    if path in BY_PATH or path in TABLES:
        return path
    lower = path.lower()
    return KEY_ALIASES.get(lower, lower)


def _flatten_file(data: Mapping[str, Any], where: str, warnings: list[str]) -> dict[str, c.Raw]:
    """The file's values by canonical key; unknown keys become warnings."""
    found: dict[str, c.Raw] = {}
    known = [*BY_PATH, *KEY_ALIASES]

    def visit(table: Mapping[str, Any], prefix: str) -> None:
        if prefix.count(".") > MAX_TABLE_DEPTH:
            warnings.append(c.unknown_key_warning(prefix.rstrip("."), where, []))
            return
        for key, value in table.items():
            written = f"{prefix}{key}"
            path = _canonical(written)
            spec = BY_PATH.get(path)
            if spec is not None:
                previous = found.get(path)
                if previous is not None and previous.value != value:
                    raise key_error(
                        path,
                        value,
                        f"one value, under one of its names ({path} or its old name)",
                        reason=f"is not allowed: {path} is also set to "
                        f"{show(spec.display(previous.value))}",
                    )
                found[path] = c.Raw(value, False, where, _FILE)
            elif path in TABLES:
                if not isinstance(value, dict):
                    raise ConfigError(path, value, f"a table: [{path}]")
                visit(value, f"{path}.")
            elif isinstance(value, dict) and value:
                visit(value, f"{written}.")
            else:
                import difflib  # only for a key we do not know

                suggestions = difflib.get_close_matches(written.lower(), known, n=1, cutoff=0.6)
                suggestions = [KEY_ALIASES.get(s, s) for s in suggestions]
                warnings.append(c.unknown_key_warning(written, where, suggestions))

    visit(data, "")
    return found


def _flag_layer(cli: CliArgs) -> dict[str, c.Raw]:
    flags: dict[str, tuple[str, object]] = {
        "log_level": ("--log-level", cli.log_level),
        "shards.ids": ("--shards", cli.shards),
        "shards.count": ("--shard-count", cli.shard_count),
        "supervisor.workers": ("--workers", cli.workers),
        "supervisor.shards_per_worker": ("--shards-per-worker", cli.shards_per_worker),
        "gateway.url": ("--gateway-url", cli.gateway_url),
        "events": ("--events", cli.events),
        "fleet.name": ("--fleet", cli.fleet),
    }
    return {
        path: c.Raw(value, isinstance(value, str), flag, _FLAG)
        for path, (flag, value) in flags.items()
        if value is not None
    }


def _is_unset(spec: KeySpec, raw: c.Raw) -> bool:
    if not isinstance(raw.value, str) or raw.value.strip():
        return False
    return not (spec.empty_is_value and raw.level == _FILE)


def _secret_candidates(layers: Sequence[Mapping[str, c.Raw]]) -> Redactor:
    """Every secret given anywhere (even overridden), to scrub values shown in errors."""
    redactor = Redactor()
    for layer in layers:
        for path, raw in layer.items():
            spec = BY_PATH[path]
            if not isinstance(raw.value, str):
                continue
            if spec.kind == "token":
                redactor.add(raw.value, raw.value.strip())
            elif spec.kind in ("url", "userinfo-url"):
                whole = spec.kind == "userinfo-url"
                redactor.add(*url_secrets(raw.value.strip(), whole_userinfo=whole))
    return redactor


# --------------------------------------------------------------------------------------------
# The token


def read_token_file(path: str, key: str, where: str) -> str:
    """The bot token held by the file at ``path`` (a trailing newline dropped).

    Raises :class:`ConfigError` for ``key`` (from ``where``: an env name, or what the file is)
    when it cannot be read, is not a regular file, is empty or too large, or does not hold a
    bare token; the message shows the path, never the content. Opened without blocking, so
    that a FIFO given by mistake is refused instead of waited on.
    """

    def fail(reason: str) -> ConfigError:
        allowed = "a readable file holding the bare bot token (a trailing newline is fine)"
        return ConfigError(key, path, allowed, env=where, reason=reason)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise fail("is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE:
        raise fail(f"is too large (over {MAX_TOKEN_FILE} bytes)")
    try:
        text = data.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise fail("is not UTF-8 text") from None
    if not text.strip():
        raise fail("is empty")
    try:
        token = c.token(text, c.Raw(text, True, path, _FILE), [])
    except c.Bad as bad:
        raise fail(f"does not hold {bad.allowed}") from None
    assert isinstance(token, str)
    return token


def _find_token(
    values: dict[str, object],
    level: Callable[[str], int],
    cli: CliArgs,
    environ: Mapping[str, str],
    secrets_dir: str,
) -> None:
    """Set ``values["token"]`` (and ``token_file`` when it was read from a file)."""
    if values.get("token") and values.get("token_file"):
        if level("token") == level("token_file"):
            raise key_error(
                "token_file",
                values["token_file"],
                "token or token_file, not both in the same place",
                reason="is not allowed together with token",
            )
        _drop_lower(values, level, "token", "token_file")
    if values.get("token"):
        return
    path = values.get("token_file")
    if isinstance(path, str):
        values["token"] = read_token_file(path, "token_file", BY_PATH["token_file"].env)
        return
    places = [(secrets_dir, f"Docker secret {TOKEN_CREDENTIAL}")]
    if environ.get("CREDENTIALS_DIRECTORY"):
        places.insert(
            0, (environ["CREDENTIALS_DIRECTORY"], f"systemd credential {TOKEN_CREDENTIAL}")
        )
    for directory, where in places:
        path = os.path.join(directory, TOKEN_CREDENTIAL)
        if os.path.lexists(path):  # absent: look further; present but unreadable: an error
            values["token"] = read_token_file(path, "token", where)
            values["token_file"] = path
            return
    if cli.simulate:
        values["token"] = SIMULATED_TOKEN
    elif cli.command is not None:
        values["token"] = ""  # the sub-commands talk to a running supervisor, not to Discord
    else:
        raise ConfigError(
            "token",
            None,
            "",
            message="config key 'token' (env DISCORD_TOKEN): not set; expected a Discord bot "
            "token in DISCORD_TOKEN, 'token' in the config file, a file named by "
            f"DISCORD_TOKEN_FILE, or the credential or secret {TOKEN_CREDENTIAL!r}",
        )


# --------------------------------------------------------------------------------------------
# Rules between keys


def _drop_lower(values: dict[str, object], level: Callable[[str], int], a: str, b: str) -> None:
    """Of two keys that choose between modes, both set: drop the one set in a lower layer
    (it falls back to its default). Set in the same layer, both stay: the caller decides."""
    if values.get(a) and values.get(b):
        if level(a) > level(b):
            del values[b]
        elif level(b) > level(a):
            del values[a]


def _resolve_intents(
    values: dict[str, object],
    level: Callable[[str], int],
    chosen: Mapping[str, c.Raw],
    warnings: list[str],
) -> None:
    """raw_intents wins when non-zero, unless names were given in a higher layer."""
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


def _resolve_sentinels(values: dict[str, object]) -> None:
    """A ``redis+sentinel://`` URL names the Sentinels and the master; the keys ``sentinels``
    and ``sentinel_master``, when given too, must agree with it."""
    url = values.get("redis.url")
    if not isinstance(url, str) or not url.lower().startswith("redis+sentinel:"):
        return
    parsed = c.parse_sentinel_url(url)
    given = values.get("redis.sentinels")
    if isinstance(given, tuple) and set(given) != set(parsed.sentinels):
        raise key_error(
            "redis.sentinels",
            given,
            "the Sentinels named by redis.url, or no list (the URL names them)",
            reason="is not allowed: redis.url is a redis+sentinel:// URL with other Sentinels",
        )
    master = values.get("redis.sentinel_master")
    if master is not None and master != parsed.master:
        raise key_error(
            "redis.sentinel_master",
            master,
            f"{parsed.master!r} (the master named by redis.url), or no sentinel_master",
            reason="is not allowed: redis.url is a redis+sentinel:// URL naming another master",
        )
    values["redis.sentinels"] = parsed.sentinels
    values["redis.sentinel_master"] = parsed.master


def default_member() -> str:
    """``<hostname>-<pid>``, with anything a member id cannot hold replaced by ``-``."""
    text = f"{os.uname().nodename}-{os.getpid()}"
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "-" for ch in text)
    return cleaned.lstrip("._-")[-128:] or str(os.getpid())


# --------------------------------------------------------------------------------------------
# Putting it together


def resolve(
    cli: CliArgs, environ: Mapping[str, str], *, secrets_dir: str = DOCKER_SECRETS_DIR
) -> tuple[Settings, tuple[str, ...]]:
    """The settings and the warnings for ``cli`` and ``environ`` (see the module's rules)."""
    warnings: list[str] = []
    file_layer = _flatten_file(_read_file(cli), cli.config_path, warnings)
    env_layer = {
        spec.path: c.Raw(environ[spec.env], True, spec.env, _ENV)
        for spec in KEYS
        if environ.get(spec.env, "").strip()
    }
    layers = (file_layer, env_layer, _flag_layer(cli))
    redactor = _secret_candidates(layers)
    chosen: dict[str, c.Raw] = {}
    for layer in layers:
        for path, raw in layer.items():
            if not _is_unset(BY_PATH[path], raw):
                chosen[path] = raw

    def level(path: str) -> int:
        raw = chosen.get(path)
        return -1 if raw is None else raw.level

    values: dict[str, object] = {}

    def convert_keys(specs: Sequence[KeySpec]) -> None:
        for spec in specs:
            given = chosen.get(spec.path)
            if given is not None:
                value = convert(spec, given, warnings, redactor)
                if value is not None:
                    values[spec.path] = value

    token_keys = [BY_PATH["token"], BY_PATH["token_file"]]
    convert_keys(token_keys)
    _find_token(values, level, cli, environ, secrets_dir)
    redactor.add(str(values["token"]))
    convert_keys([spec for spec in KEYS if spec not in token_keys])
    _resolve_intents(values, level, chosen, warnings)
    _drop_lower(values, level, "supervisor.workers", "supervisor.shards_per_worker")
    values.setdefault("fleet.member", default_member())
    try:
        _resolve_sentinels(values)
        return _build(values), tuple(warnings)
    except ConfigError as err:  # a rule between keys: show the value as it was given
        given = chosen.get(err.key)
        if given is None:
            raise
        shown = BY_PATH[err.key].display(given.value)
        raise err.with_value(redactor.redact(shown) if isinstance(shown, str) else shown) from None


def _build(values: Mapping[str, object]) -> Settings:
    nested: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    top: dict[str, Any] = {}
    for path, value in values.items():
        section, _, name = path.rpartition(".")
        (nested[section] if section else top)[name] = value
    top["token"] = SecretStr(str(top.get("token", "")))
    sections: dict[str, Any] = {name: cls(**nested[name]) for name, cls in SECTIONS.items()}
    return Settings(**top, **sections)
