"""``spectacles-simulator``: run the gateway simulator until SIGTERM/SIGINT.

Prints one JSON line on stdout once listening::

    {"http_base": "http://127.0.0.1:PORT/api/v10", "gateway_url": "ws://127.0.0.1:PORT/",
     "resume_url": "ws://127.0.0.1:PORT/resume-gw"}

(plus ``"tls_ca_file"`` with ``--tls``). Logs go to stderr. Binds only ``--host`` (default
loopback). The control endpoints of a running simulator are under
``http://HOST:PORT/control/``; ``--control URL`` with ``--set-recommended-shards N``,
``--set-rate R``, ``--set-guild-rate R``, ``--add-guilds N``, ``--set-session-starts N`` or
``--stats`` talks to them and exits (see :mod:`.controls`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any
from urllib.parse import urlencode, urlsplit

from spectacles_gateway.simulator.config import PROFILES
from spectacles_gateway.simulator.corpus import measure_profile
from spectacles_gateway.simulator.server import Simulator, SimulatorConfig

logger = logging.getLogger(__name__)

# flag, SimulatorConfig field, type, help ("%(default)s" works).
_FIELDS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--host", "host", str, "address to bind (default: %(default)s)"),
    ("--port", "port", int, "port (default: 0 = any free port)"),
    ("--shards", "shard_count", int, "recommended shard count (default: %(default)s)"),
    ("--max-concurrency", "max_concurrency", int, "identify buckets (default: %(default)s)"),
    ("--identify-window", "identify_window", float, "seconds per identify and bucket"),
    ("--session-start-limit", "session_start_total", int, "session starts a day"),
    ("--rate", "rate", float, "generated events per second per shard (default: 0 = none)"),
    ("--profile", "profile", str, "uniform MESSAGE_CREATEs of --size, or a busy bot's mix"),
    ("--seed", "seed", int, "seed of the realistic pool, phases and jitter"),
    ("--jitter", "jitter", float, "share of the interval an arrival may move by"),
    ("--guilds", "guilds", int, "guilds of the bot, placed by (id >> 22) %% shard count"),
    ("--guild-rate", "guild_rate", float, "events per second per guild, to every owner"),
    ("--max-guilds-per-shard", "max_guilds_per_shard", int, "4011 above (default: %(default)s)"),
    ("--heartbeat-interval", "heartbeat_interval_ms", int, "HELLO heartbeat_interval in ms"),
    ("--resume-window", "resume_window", float, "seconds a session stays resumable"),
    ("--zstd-level", "zstd_level", int, "1 needs ~110 KiB a connection, 3 ~700 KiB"),
    ("--token", "token", str, "the bot token clients must use"),
    ("--guilds-per-shard", "guilds_per_shard", int, "guilds per shard without --guilds"),
    ("--big-guild-create", "big_guild_create_bytes", int, "first GUILD_CREATE at least BYTES"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectacles-simulator",
        description="A local Discord gateway (v10) for tests, benchmarks and trying things out.",
    )
    defaults = SimulatorConfig()
    for flag, name, kind, text in _FIELDS:
        choices = PROFILES if name == "profile" else None
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            default=getattr(defaults, name),
            choices=choices,
            metavar=None if choices else flag[2:].upper().replace("-", "_"),
            help=text,
        )
    parser.add_argument(
        "--size", type=int, default=1024, help="approximate size of a MESSAGE_CREATE's d"
    )
    parser.add_argument(
        "--any-shard-count",
        action="store_true",
        help="accept IDENTIFY with any shard count (a fleet that reshards), not only --shards",
    )
    parser.add_argument("--tls", action="store_true", help="serve https:// and wss://")
    parser.add_argument(
        "--measure-corpus",
        type=int,
        default=0,
        metavar="N",
        help="print the wire figures of N generated events of --profile as JSON, and exit",
    )
    parser.add_argument("--control", metavar="URL", help="a running simulator's http_base")
    parser.add_argument("--set-recommended-shards", type=int, metavar="N")
    parser.add_argument("--set-rate", type=float, metavar="R")
    parser.add_argument("--set-guild-rate", type=float, metavar="R")
    parser.add_argument("--add-guilds", type=int, metavar="N")
    parser.add_argument(
        "--set-session-starts", type=int, metavar="N", help="session starts remaining"
    )
    parser.add_argument("--stats", action="store_true", help="with --control: print its stats")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the default event loop")
    return parser


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    known = {f.name for f in fields(SimulatorConfig)}
    values = {name: getattr(args, name) for _, name, _, _ in _FIELDS if name in known}
    return SimulatorConfig(
        **values,
        size_mix=((args.size, 1.0),),
        strict_shard_count=not args.any_shard_count,
        session_start_remaining=args.session_start_total,
        tls=args.tls,
        record_traffic=False,
    )


def control(base: str, method: str, name: str, **query: object) -> Any:
    """Call a control endpoint of the simulator at ``base`` (its http_base or any URL on its
    port) and return the decoded answer."""
    parts = urlsplit(base)
    url = f"{parts.scheme}://{parts.netloc}/control/{name}"
    if query:
        url += "?" + urlencode(query)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {base!r}")
    request = urllib.request.Request(url, method=method)  # noqa: S310 - http(s) only
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.load(response)


def _run_control(args: argparse.Namespace) -> int:
    url = args.control
    if args.set_recommended_shards is not None:
        answer = control(url, "POST", "recommended_shards", shards=args.set_recommended_shards)
    elif args.set_rate is not None:
        answer = control(url, "POST", "rate", rate=args.set_rate)
    elif args.set_guild_rate is not None:
        answer = control(url, "POST", "guild_rate", rate=args.set_guild_rate)
    elif args.add_guilds is not None:
        answer = control(url, "POST", "guilds", add=args.add_guilds)
    elif args.set_session_starts is not None:
        answer = control(url, "POST", "session_start_limit", remaining=args.set_session_starts)
    else:
        answer = control(url, "GET", "stats")
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


async def run(config: SimulatorConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Simulator(config) as sim:
            line = {
                "http_base": sim.http_base,
                "gateway_url": sim.gateway_url,
                "resume_url": sim.resume_url,
            }
            if sim.tls_ca_file:
                line["tls_ca_file"] = sim.tls_ca_file
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            await stop.wait()
            logger.info("signal received, shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _loop_factory(no_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if no_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level != "DEBUG":
        logging.getLogger("websockets").setLevel(logging.WARNING)
    if args.control:
        try:
            return _run_control(args)
        except (OSError, ValueError) as exc:
            logger.error("control request failed: %s", exc)
            return 1
    try:
        config = config_from_args(args)
    except ValueError as exc:
        logger.error("invalid configuration: %s", exc)
        return 2
    if args.measure_corpus > 0:
        figures = measure_profile(config, args.measure_corpus)
        sys.stdout.write(json.dumps(figures) + "\n")
        return 0
    with asyncio.Runner(loop_factory=_loop_factory(args.no_uvloop)) as runner:
        runner.run(run(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
