"""``spectacles-supervise``: read the configuration, plan the shards, run and heal the workers.

Exit codes: 0 clean stop; 78 (EX_CONFIG) bad configuration or a fatal refusal from Discord (bad
token, invalid shard, sharding required, invalid version, invalid or disallowed intents); 74 the
stdio output was closed; 1 Discord's API could not be reached at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from spectacles_gateway.config import EX_CONFIG, SIMULATED_TOKEN, Loaded, Settings, run_or_exit
from spectacles_gateway.discovery import BadToken, fetch_gateway_bot
from spectacles_gateway.logsetup import setup_logging
from spectacles_gateway.protocol.identify import SessionBudget
from spectacles_gateway.shardspec import parse_shard_spec

from .plan import describe_ids, group_shards, worker_count

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
        if self.process.stdout is not None:
            self.process.stdout.close()


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
        "--max-concurrency",
        str(shard_count),
        "--rate",
        str(rate),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)  # noqa: S603
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


def _metrics_dir(settings: Settings) -> str | None:
    """Prepare prometheus_client's multiprocess directory (wiped before the first fork).

    Must run before prometheus_client is imported anywhere in this process."""
    if not settings.prometheus.enabled:
        return None
    path = settings.prometheus.multiproc_dir or tempfile.mkdtemp(prefix="spectacles-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _notifier() -> object | None:
    try:
        from .sdnotify import Notifier
    except ImportError:  # pragma: no cover - shipped with the package
        return None
    return Notifier.from_env(os.environ)


def run(loaded: Loaded, argv: list[str]) -> int:
    settings = loaded.settings
    metrics_dir = _metrics_dir(settings)
    from spectacles_gateway.worker import WorkerPlan  # imports prometheus_client: after the env

    from .arbiter import Supervisor, SupervisorOptions, plan_fields

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
        count = settings.shards.count or bot.shards
        ids = _shard_ids(loaded, count)
        n_workers = worker_count(
            len(ids),
            workers=settings.supervisor.workers,
            shards_per_worker=settings.supervisor.shards_per_worker,
            cpus=os.cpu_count() or 1,
        )
        groups = group_shards(ids, n_workers, bot.max_concurrency)
        plan = WorkerPlan(
            shard_ids=ids,
            shard_count=count,
            token=token,
            intents=settings.intents,
            gateway_url=settings.gateway.url or bot.url,
            events=None if settings.publish_all else settings.events,
            version=settings.gateway_version,
            compress=None
            if settings.gateway.compression == "none"
            else settings.gateway.compression,
            large_threshold=settings.gateway.large_threshold,
            presence=settings.presence,
            hello_timeout=settings.gateway.hello_timeout,
            open_timeout=settings.gateway.open_timeout,
            shutdown_timeout=settings.gateway.shutdown_timeout,
            max_concurrency=bot.max_concurrency,
        )
        from spectacles_gateway.protocol.shard import ShardProtocol

        ShardProtocol(plan.shard_config(ids[0]), rand=lambda: 0.0)  # identify size etc.: now
        log.info(
            "running shards %s of %d in %d workers (max_concurrency %d, %d session starts left)",
            describe_ids(ids),
            count,
            len(groups),
            bot.max_concurrency,
            bot.remaining,
        )
        if bot.remaining < len(ids):
            log.warning(
                "only %d of Discord's daily session starts are left for %d shards: the rest "
                "will wait for the budget to reset in %.0f s rather than run it out",
                bot.remaining,
                len(ids),
                bot.reset_after,
            )
        address = settings.prometheus
        options = SupervisorOptions(
            groups=groups,
            shard_count=count,
            max_concurrency=bot.max_concurrency,
            plan=plan_fields(plan),
            argv=argv,
            stdio=settings.stdio.format if settings.broker.type == "stdio" else None,
            shutdown_timeout=settings.gateway.shutdown_timeout,
            stall_timeout=settings.supervisor.stall_timeout,
            metrics_dir=metrics_dir,
            http=(address.host, address.port) if address.enabled else None,
            metrics_path=address.endpoint,
            budget=SessionBudget(bot.total, bot.remaining, time.monotonic() + bot.reset_after),
            notifier=_notifier(),
        )
        return Supervisor(options).run()
    except Fatal as exc:
        log.error("%s", exc)
        return EX_CONFIG
    except ValueError as exc:  # shard specs and protocol limits checked at start-up
        log.error("configuration error: %s", exc)
        return EX_CONFIG
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if simulated is not None:
            simulated.stop()
        if metrics_dir is not None and not settings.prometheus.multiproc_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    loaded = run_or_exit(args, os.environ)
    if loaded.cli.command is not None:  # parsed by the config package; not run yet
        name = type(loaded.cli.command).__name__.removesuffix("Command").lower()
        print(f"spectacles-supervise: the {name} command is not available yet", file=sys.stderr)
        return 1
    settings = loaded.settings
    setup_logging(settings.logging_level, settings.secrets())
    for warning in loaded.warnings:
        log.warning("%s", warning)
    return run(loaded, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
