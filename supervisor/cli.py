"""``spectacles-supervise``: read the configuration, plan the shards, run them.

Exit codes: 0 clean stop; 78 (EX_CONFIG) bad configuration or a fatal refusal from Discord (bad
token, invalid shard, sharding required, invalid version, invalid or disallowed intents).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import start_http_server

from spectacles_gateway import metrics
from spectacles_gateway.factory import make_broker, make_gate, make_store
from spectacles_gateway.config import EX_CONFIG, SIMULATED_TOKEN, Loaded, Settings, run_or_exit
from spectacles_gateway.discovery import BadToken, GatewayBot, fetch_gateway_bot
from spectacles_gateway.gate import LocalIdentifyGate
from spectacles_gateway.logsetup import setup_logging
from spectacles_gateway.protocol.identify import SessionBudget
from spectacles_gateway.shardspec import parse_shard_spec
from spectacles_gateway.worker import Worker, WorkerPlan

__all__ = ["main"]

log = logging.getLogger("spectacles_gateway.supervisor")


class Fatal(Exception):
    """Stop with EX_CONFIG and this one-line message."""


@dataclass
class Simulated:
    process: subprocess.Popen[bytes]
    http_base: str
    gateway_url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_simulator(shard_count: int, rate: float) -> Simulated:
    """Start the bundled gateway simulator on loopback and return where it listens.

    It accepts only its own fake token (``simulated-token``): a real token never leaves us."""
    argv = [
        sys.executable,
        "-m",
        "spectacles_gateway.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--shards",
        str(shard_count),
        "--rate",
        str(rate),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE)  # noqa: S603
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise RuntimeError(f"the simulator exited with status {process.returncode}")
    info = json.loads(line)
    return Simulated(process, info["http_base"], info["gateway_url"])


def _shard_ids(loaded: Loaded, count: int) -> tuple[int, ...]:
    spec = loaded.cli.shards
    ids = parse_shard_spec(spec) if spec else loaded.settings.shards.ids
    if not ids:
        return tuple(range(count))
    bad = [i for i in ids if i >= count]
    if bad:
        raise Fatal(
            f"config key 'shards.ids' (env DISCORD_SHARD_IDS, flag --shards): shard id {bad[0]} "
            f"is outside 0..{count - 1} for a shard count of {count}"
        )
    return tuple(ids)


def plan_worker(settings: Settings, loaded: Loaded, bot: GatewayBot, token: str) -> WorkerPlan:
    count = settings.shards.count or bot.shards
    ids = _shard_ids(loaded, count)
    events = None if settings.publish_all else settings.events
    return WorkerPlan(
        shard_ids=ids,
        shard_count=count,
        token=token,
        intents=settings.intents,
        gateway_url=settings.gateway.url or bot.url,
        events=events,
        version=settings.gateway_version,
        compress=None if settings.gateway.compression == "none" else settings.gateway.compression,
        large_threshold=settings.gateway.large_threshold,
        presence=settings.presence,
        hello_timeout=settings.gateway.hello_timeout,
        open_timeout=settings.gateway.open_timeout,
        shutdown_timeout=settings.gateway.shutdown_timeout,
        max_concurrency=bot.max_concurrency,
    )


async def _run(plan: WorkerPlan, settings: Settings, bot: GatewayBot) -> int:
    loop = asyncio.get_running_loop()
    if settings.prometheus.enabled:
        start_http_server(settings.prometheus.port, settings.prometheus.host)
        log.info(
            "metrics on http://%s:%d%s",
            settings.prometheus.host,
            settings.prometheus.port,
            settings.prometheus.endpoint,
        )
    metrics.session_starts_remaining.set(bot.remaining)
    budget = SessionBudget(bot.total, bot.remaining, loop.time() + bot.reset_after)
    local = LocalIdentifyGate(
        plan.max_concurrency, budget=budget, on_spend=metrics.session_starts_remaining.set
    )
    worker = Worker(
        plan,
        make_broker(settings, plan),
        store=make_store(settings),
        gate=make_gate(settings, plan, local),
    )
    return await worker.run()


def _run_loop(coro_factory: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro_factory())  # type: ignore[operator,no-any-return]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_factory())  # type: ignore[operator,no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    loaded = run_or_exit(sys.argv[1:] if argv is None else argv, os.environ)
    settings = loaded.settings
    setup_logging(settings.logging_level, settings.secrets())
    for warning in loaded.warnings:
        log.warning("%s", warning)
    if loaded.cli.print_config:
        print(settings.redacted_dump())
        return 0
    simulated: Simulated | None = None
    token = settings.token.get_secret_value()
    try:
        api_base = settings.api.base_url
        if loaded.cli.simulate:
            token = SIMULATED_TOKEN
            count = settings.shards.count or (
                max(parse_shard_spec(loaded.cli.shards)) + 1 if loaded.cli.shards else 1
            )
            simulated = start_simulator(count, rate=5.0)
            api_base = simulated.http_base
            log.info("simulating Discord at %s (no token needed)", simulated.gateway_url)
        try:
            bot = fetch_gateway_bot(api_base, token)
        except BadToken as exc:
            raise Fatal(str(exc)) from None
        plan = plan_worker(settings, loaded, bot, token)
        log.info(
            "running shards %s of %d (max_concurrency %d, %d session starts left)",
            _describe_ids(plan.shard_ids),
            plan.shard_count,
            bot.max_concurrency,
            bot.remaining,
        )
        return _run_loop(lambda: _run(plan, settings, bot))
    except Fatal as exc:
        log.error("%s", exc)
        return EX_CONFIG
    except ValueError as exc:  # shard specs and protocol limits checked at start-up
        print(f"spectacles-gateway: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if simulated is not None:
            simulated.stop()


def _describe_ids(ids: Sequence[int]) -> str:
    if ids and list(ids) == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])
    return ",".join(map(str, ids))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
