"""The command line of ``spectacles-supervise``: flags, sub-commands, ``--help``, ``--version``,
``--print-config``; and :func:`load` / :func:`run_or_exit`, which put the pieces together.

Each flag also has the seed's single-dash (Go flag package) spelling. Sub-commands
(``status``, ``reshard``) are parsed here and run elsewhere; with none, the gateway runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from spectacles_gateway.durations import format_duration
from spectacles_gateway.exitcodes import EX_CONFIG
from spectacles_gateway.intents import intent_names
from spectacles_gateway.redact import MASK

from . import converters as c
from .errors import ConfigError, HelpRequested, VersionRequested, show
from .keys import BY_PATH, KEYS, KeySpec, convert
from .schema import DEFAULT_CONFIG_PATH, CliArgs, Loaded, ReshardCommand, Settings, StatusCommand
from .schema import value_at as _value_at
from .sources import DOCKER_SECRETS_DIR, resolve

__all__ = ["PROG", "load", "parse_args", "redacted_dump", "run_or_exit"]

PROG = "spectacles-gateway"
DISTRIBUTION = "spectacles-gateway"
#: Which flags each sub-command takes.
_COMMAND_FLAGS = {"--url": ("status", "reshard"), "--json": ("status",), "--to": ("reshard",)}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError("", None, "", message=f"command line: {message}")


def _parser() -> _ArgumentParser:
    parser = _ArgumentParser(
        prog="spectacles-supervise",
        description="Keeps Discord gateway shards connected and forwards their events to a "
        "broker. Settings come from the config file, then the environment, then these flags.",
        epilog="commands: 'status [--url URL] [--json]' shows a running supervisor's shards; "
        "'reshard [--to N] [--url URL]' asks a running supervisor or fleet to reshard. "
        "Without a command the gateway runs.",
        add_help=False,
        allow_abbrev=False,
    )

    def flag(name: str, help_: str, metavar: str | None = None, *also: str) -> None:
        """``--name`` and the seed's ``-name``; no ``metavar``: a switch."""
        names = (f"--{name}", f"-{name}", *also)
        if metavar is None:
            parser.add_argument(*names, action="store_true", help=help_)
        else:
            parser.add_argument(*names, metavar=metavar, help=help_)

    flag("help", "show this and exit", None, "-h")
    flag("version", "print the version and exit")
    flag("config", f"TOML file (default {DEFAULT_CONFIG_PATH})", "FILE")
    flag(
        "log-level",
        "suppress, error, warn, info or debug (LOG_LEVEL)",
        "LEVEL",
        "-loglevel",
        "--loglevel",
    )
    flag("shards", "shard ids to run, e.g. 0-15 or 0,2,4-7", "SPEC")
    flag("shard-count", "total shard count told to Discord", "N")
    flag("workers", "worker processes (0 = automatic)", "N")
    flag("shards-per-worker", "shards per worker process (exclusive with --workers)", "N")
    flag("simulate", "run against the local simulator")
    flag("gateway-url", "gateway URL override (ws/wss)", "URL")
    flag("events", "dispatch events to publish (DISCORD_EVENTS)", "A,B")
    flag("fleet", "join the fleet NAME (FLEET_NAME; needs Redis)", "NAME")
    flag("print-config", "print the effective configuration (secrets redacted) and exit")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="status or reshard")
    flag("url", "status, reshard: the supervisor's HTTP address", "URL")
    flag("json", "status: print JSON")
    flag("to", "reshard: the new shard count (default: Discord's)", "N")
    return parser


def _flag_int(path: str, flag: str, text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    value = convert(BY_PATH[path], c.Raw(text, True, flag, 2), [])
    assert isinstance(value, int)
    return value


def _command_flag(convert_flag: c.Convert, flag: str, text: str) -> object:
    """A sub-command's flag: not a config key, so its error names the flag."""
    try:
        return convert_flag(text, c.Raw(text, True, flag, 2), [])
    except c.Bad as bad:
        message = f"command line: {flag} {show(text)} {bad.reason}; expected {bad.allowed}"
        raise ConfigError("", text, bad.allowed, message=message) from None


def _command(ns: argparse.Namespace) -> StatusCommand | ReshardCommand | None:
    name = ns.command
    if name is not None and name not in ("status", "reshard"):
        # Never echo a stray value: it may be a token pasted in the wrong place.
        raise ConfigError(
            "", None, "", message="command line: unexpected argument (value not shown)"
        )
    given = {"--url": ns.url is not None, "--json": ns.json, "--to": ns.to is not None}
    for flag, commands in _COMMAND_FLAGS.items():
        if given[flag] and name not in commands:
            raise ConfigError(
                "", None, "", message=f"command line: {flag} is only for {' and '.join(commands)}"
            )
    url = None if ns.url is None else _command_flag(c.http_url, "--url", ns.url)
    assert url is None or isinstance(url, str)
    if name == "status":
        return StatusCommand(url=url, json=ns.json)
    if name == "reshard":
        to = None if ns.to is None else _command_flag(c.int_range(1), "--to", ns.to)
        assert to is None or isinstance(to, int)
        return ReshardCommand(to=to, url=url)
    return None


def _version() -> str:
    from importlib import metadata  # only for --version: it costs milliseconds

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def parse_args(argv: Sequence[str]) -> CliArgs:
    """Parse the command line (without the program name).

    Raises :class:`ConfigError` for unknown flags or bad flag values (never ``SystemExit``),
    :class:`HelpRequested` for ``-h``/``--help`` and :class:`VersionRequested` for
    ``--version``; neither reads any configuration.
    """
    parser = _parser()
    ns, rest = parser.parse_known_args(list(argv))
    if rest:
        first = rest[0]
        if first.startswith("-"):
            shown = repr(first.partition("=")[0])
            raise ConfigError("", shown, "", message=f"command line: unknown flag {shown}")
        raise ConfigError(
            "", None, "", message="command line: unexpected argument (value not shown)"
        )
    if ns.help:
        raise HelpRequested(parser.format_help())
    if ns.version:
        raise VersionRequested(f"{PROG} {_version()}\n")
    log_level = None
    if ns.log_level is not None and ns.log_level.strip():
        raw = c.Raw(ns.log_level, True, "--log-level", 2)
        log_level = str(convert(BY_PATH["log_level"], raw, []))
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
        fleet=ns.fleet,
        print_config=ns.print_config,
        command=_command(ns),
    )


def load(
    argv: Sequence[str], environ: Mapping[str, str], *, secrets_dir: str = DOCKER_SECRETS_DIR
) -> Loaded:
    """Parse ``argv``, read the config file, apply ``environ`` and the flags, and validate.

    Raises :class:`ConfigError` (one clear line), :class:`HelpRequested` or
    :class:`VersionRequested`. Pure apart from reading the config file and the token's file
    (``secrets_dir`` is where Docker secrets are looked for): no logging, no ``os.environ``,
    no exit.
    """
    cli = parse_args(argv)
    settings, warnings = resolve(cli, environ, secrets_dir=secrets_dir)
    return Loaded(settings=settings, cli=cli, warnings=warnings)


# --------------------------------------------------------------------------------------------
# --print-config


def _dump_value(spec: KeySpec, settings: Settings) -> object:
    value = _value_at(settings, spec.path)
    if spec.kind == "duration":
        assert isinstance(value, float)
        return format_duration(value)
    if spec.kind == "size":
        assert isinstance(value, int)
        return c.format_size(value)
    if spec.path == "intents":
        assert isinstance(value, int)
        return list(intent_names(value))
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in value]  # addresses
    return spec.display(value)


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


def redacted_dump(settings: Settings) -> str:
    """Every key as TOML, with the token and the URLs' secrets replaced by ``***``.

    The text is valid TOML; loaded again (with the token supplied, unless it came from a file,
    which is named instead) it gives these settings.
    """
    lines = ["# effective configuration; secrets are shown as ***"]
    sections: dict[str, list[str]] = {}
    for spec in KEYS:
        section, _, name = spec.path.rpartition(".")
        if spec.path == "presence":
            continue
        entry = f"{name} = {_toml_value(_dump_value(spec, settings))}"
        if spec.path == "token" and settings.token_file:
            entry = f'# token = "{MASK}" (read from token_file)'
        sections.setdefault(section, []).append(entry)
        if spec.path == "intents":
            sections[section].append(f"# resolved intents bitfield: {settings.intents}")
    lines += sections.pop("")
    for section, entries in sections.items():
        lines += ["", f"[{section}]", *entries]
    lines += ["", "[presence]"]
    if settings.presence is None:
        lines.append("# not set")
    else:
        lines += [
            f"{_toml_key(k)} = {_toml_value(v)}"
            for k, v in settings.presence.items()
            if v is not None
        ]
    return "\n".join(lines) + "\n"


def run_or_exit(
    argv: Sequence[str], environ: Mapping[str, str], *, secrets_dir: str = DOCKER_SECRETS_DIR
) -> Loaded:
    """:func:`load` for a command's ``main``.

    On a :class:`ConfigError`, prints ``spectacles-gateway: configuration error: <msg>`` to
    stderr and raises ``SystemExit(78)``. ``--help`` prints the usage, ``--version`` the
    version and ``--print-config`` the redacted settings (after any warnings, on stderr), all
    to stdout, then ``SystemExit(0)``.
    """
    try:
        loaded = load(argv, environ, secrets_dir=secrets_dir)
    except HelpRequested as help_:
        sys.stdout.write(help_.text)
        raise SystemExit(0) from None
    except ConfigError as err:
        print(f"{PROG}: configuration error: {err}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    if loaded.cli.print_config:
        for warning in loaded.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        sys.stdout.write(redacted_dump(loaded.settings))
        raise SystemExit(0)
    return loaded
