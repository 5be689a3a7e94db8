"""``spectacles-simulator``: run the gateway simulator until SIGTERM/SIGINT.

Prints one JSON line on stdout once listening::

    {"http_base": "http://127.0.0.1:PORT/api/v10", "gateway_url": "ws://127.0.0.1:PORT/",
     "resume_url": "ws://127.0.0.1:PORT/resume-gw"}

Logs go to stderr. Binds only ``--host`` (default loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from spectacles_gateway.simulator.config import PROFILES
from spectacles_gateway.simulator.corpus import measure_profile
from spectacles_gateway.simulator.server import Simulator, SimulatorConfig

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectacles-simulator",
        description="A local Discord gateway (v10) for tests, benchmarks and trying things out.",
    )
    defaults = SimulatorConfig()
    parser.add_argument(
        "--host", default=defaults.host, help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=0, help="port (default: 0 = any free port)")
    parser.add_argument("--shards", type=int, default=defaults.shard_count, help="shard count")
    parser.add_argument(
        "--max-concurrency", type=int, default=defaults.max_concurrency, help="identify buckets"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=defaults.rate,
        help="MESSAGE_CREATE per second per connected shard (default: 0 = none)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        default=defaults.heartbeat_interval_ms,
        help="HELLO heartbeat_interval in ms (default: %(default)s)",
    )
    parser.add_argument("--token", default=defaults.token, help="the bot token clients must use")
    parser.add_argument(
        "--size", type=int, default=1024, help="approximate size of a MESSAGE_CREATE's d"
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=defaults.profile,
        help="generated traffic: uniform MESSAGE_CREATEs of --size, or a busy bot's realistic "
        "mix (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the realistic pool and phases"
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=defaults.jitter,
        help="share of the interval by which each arrival may move (default: %(default)s)",
    )
    parser.add_argument(
        "--measure-corpus",
        type=int,
        default=0,
        metavar="N",
        help="print the wire figures of N generated events of --profile as JSON, and exit",
    )
    parser.add_argument(
        "--big-guild-create",
        type=int,
        default=0,
        metavar="BYTES",
        help="make each session's first GUILD_CREATE at least this big",
    )
    parser.add_argument(
        "--guilds-per-shard", type=int, default=defaults.guilds_per_shard, help="guilds per shard"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the default event loop")
    return parser


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(
        token=args.token,
        shard_count=args.shards,
        max_concurrency=args.max_concurrency,
        heartbeat_interval_ms=args.heartbeat_interval,
        rate=args.rate,
        size_mix=((args.size, 1.0),),
        profile=args.profile,
        seed=args.seed,
        jitter=args.jitter,
        guilds_per_shard=args.guilds_per_shard,
        big_guild_create_bytes=args.big_guild_create,
        host=args.host,
        port=args.port,
    )


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
