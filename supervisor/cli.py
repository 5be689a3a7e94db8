"""``spectacles-supervise``: read the configuration, plan the shards, run and heal the workers.

Exit codes (:mod:`spectacles_gateway.exitcodes`): 0 clean stop; 78 bad configuration or a fatal
refusal from Discord (bad token, invalid shard, invalid version, invalid or disallowed intents;
sharding required only with ``RESHARD_POLICY=off``, else it reshards); 74 the stdio output was
closed; 1 Discord's API could not be reached at start-up.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spectacles_gateway.config import (
    SIMULATED_TOKEN,
    Loaded,
    ReshardCommand,
    Settings,
    StatusCommand,
    run_or_exit,
)
from spectacles_gateway.discovery import BadToken, fetch_in_child
from spectacles_gateway.exitcodes import EX_CONFIG, EX_UNAVAILABLE
from spectacles_gateway.limits import raise_soft, shortfall, supervisor_need, worker_need
from spectacles_gateway.logsetup import setup_logging
from spectacles_gateway.plan import WorkerPlan
from spectacles_gateway.protocol.identify import SessionBudget
from spectacles_gateway.shardspec import parse_shard_spec

from .arbiter import Supervisor, SupervisorOptions
from .plan import describe_ids, group_shards, worker_count
from .reshard import ReshardOptions

if TYPE_CHECKING:  # fleet mode and --simulate only: loaded then
    from .fleet import FleetOptions
    from .simulate import Simulated

__all__ = ["main"]

log = logging.getLogger("spectacles_gateway.supervisor")


class Fatal(Exception):
    """Stop with EX_CONFIG and this one-line message."""


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


def _notifier() -> object | None:
    from .sdnotify import Notifier

    return Notifier.from_env(os.environ)


def stored_generation(settings: Settings, argv: list[str]) -> tuple[int, int] | None:
    """(generation, shard count) the Redis store records as running, from a short-lived child
    process (the Redis client stays out of the supervisor); None: none recorded, or no answer."""
    if settings.shard_store.type != "redis":
        return None
    import json
    import subprocess

    from .children import run_module

    try:
        done = run_module("spectacles_gateway.generation", argv, timeout=15)
        answer = json.loads(done.stdout or b"{}") if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        answer = None
    if answer is None:
        log.warning(
            "could not read the running generation from Redis: starting from the settings' "
            "shard count"
        )
        return None
    if not answer:
        return None
    return int(answer["generation"]), int(answer["shard_count"])


def reshard_options(
    loaded: Loaded, api_base: str, token: str, explicit_ids: bool
) -> ReshardOptions:
    settings = loaded.settings
    reshard = settings.reshard
    unavailable = None
    if explicit_ids:
        unavailable = "this supervisor runs shard ids chosen by hand (shards.ids, --shards)"

    def check() -> object:
        return fetch_in_child(api_base, token)

    return ReshardOptions(
        policy=reshard.policy,
        check_interval=reshard.check_interval,
        budget_reserve=reshard.budget_reserve,
        timeout=reshard.timeout,
        overlap=reshard.overlap,
        check=check,  # type: ignore[arg-type]
        unavailable=unavailable,
        fleet=bool(settings.fleet.name),
    )


def prepare(loaded: Loaded, argv: list[str], simulated: Simulated | None) -> SupervisorOptions:
    """Everything decided before the first worker starts. Raises :class:`Fatal` (exit 78),
    ``ValueError`` for a limit the configuration breaks (exit 78), ``RuntimeError`` when
    Discord's API cannot be reached (exit 1)."""
    settings = loaded.settings
    token = settings.token.get_secret_value()
    api_base = settings.api.base_url
    if simulated is not None:
        token = SIMULATED_TOKEN
        api_base = simulated.http_base
        log.info("simulating Discord at %s (no token needed)", simulated.gateway_url)
    try:
        bot = fetch_in_child(api_base, token)
    except BadToken as exc:
        raise Fatal(str(exc)) from None
    count = settings.shards.count or bot.shards
    explicit = bool(loaded.cli.shards or settings.shards.ids)
    generation = 0
    if settings.reshard.policy != "off" and not explicit:
        stored = stored_generation(settings, argv)
        if stored is not None:
            generation, stored_count = stored
            if stored_count != count:
                log.info(
                    "the store records generation %d with %d shards (a reshard ran): running "
                    "that, not %d",
                    generation,
                    stored_count,
                    count,
                )
            count = stored_count
    ids = _shard_ids(loaded, count)
    n_workers = worker_count(
        len(ids),
        workers=settings.supervisor.workers,
        shards_per_worker=settings.supervisor.shards_per_worker,
        cpus=os.cpu_count() or 1,
    )
    fleet: FleetOptions | None = None
    if settings.fleet.name:
        # The fleet decides which shards run here: the workers start empty and get shards.
        from .fleet import FleetOptions  # fleet mode only

        fleet = FleetOptions(
            name=settings.fleet.name,
            member=settings.fleet.member,
            lease=settings.fleet.lease,
            allowed=ids if explicit else None,
            session_total=bot.total,
            session_remaining=bot.remaining,
            session_reset_after=bot.reset_after,
        )
        groups: list[tuple[int, ...]] = [() for _ in range(n_workers)]
    else:
        groups = group_shards(ids, n_workers, bot.max_concurrency)
    _open_files(groups, ids, settings, fleet is not None)
    gateway = settings.gateway
    plan = WorkerPlan(
        shard_ids=ids,
        shard_count=count,
        token=token,
        intents=settings.intents,
        gateway_url=gateway.url or bot.url,
        events=None if settings.publish_all else settings.events,
        version=settings.gateway_version,
        compress=None if gateway.compression == "none" else gateway.compression,
        large_threshold=gateway.large_threshold,
        presence=dict(settings.presence) if settings.presence is not None else None,
        hello_timeout=gateway.hello_timeout,
        open_timeout=gateway.open_timeout,
        shutdown_timeout=gateway.shutdown_timeout,
        max_concurrency=bot.max_concurrency,
        max_message_size=gateway.max_message_size,
        command_queue_limit=settings.commands.queue_limit,
        command_max_age=settings.commands.max_age,
        generation=generation,
        session_budget=(bot.total, bot.remaining, round((time.time() + bot.reset_after) * 1000)),
    )
    plan.shard_config(ids[0]).identify_payload()  # over 4096 bytes: refused now, not by Discord
    log.info(
        "%s shards %s of %d in %d workers (max_concurrency %d, %d session starts left)",
        f"fleet {fleet.name} member {fleet.member}: may run" if fleet else "running",
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
    return SupervisorOptions(
        groups=groups,
        shard_count=count,
        max_concurrency=bot.max_concurrency,
        plan=plan,
        argv=argv,
        stdio=settings.stdio.format if settings.broker.type == "stdio" else None,
        shutdown_timeout=gateway.shutdown_timeout,
        stall_timeout=settings.supervisor.stall_timeout,
        http=(address.host, address.port) if address.enabled else None,
        metrics_path=address.endpoint,
        max_clients=address.max_clients,
        input_buffer=settings.supervisor.input_buffer,
        budget=SessionBudget(bot.total, bot.remaining, time.monotonic() + bot.reset_after),
        notifier=_notifier(),
        fleet=fleet,
        reshard=reshard_options(loaded, api_base, token, explicit),
        generation=generation,
    )


def _open_files(
    groups: list[tuple[int, ...]], ids: tuple[int, ...], settings: Settings, fleet: bool
) -> None:
    """Raise the open-file soft limit to the hard one (the workers inherit it); stop with
    :class:`Fatal` when even the hard limit cannot hold the planned shards' sockets. In fleet
    mode a worker's shards are not known yet: an even share is checked, and only warned about."""
    limit = raise_soft()
    if limit.soft > limit.before:
        log.info("open-file limit raised from %d to %d", limit.before, limit.soft)
    largest = max((len(g) for g in groups), default=0)
    if fleet and groups:
        largest = -(-len(ids) // len(groups))
    clients = settings.prometheus.max_clients if settings.prometheus.enabled else 0
    needs = [
        (worker_need(largest), f"{largest} shards in one worker", not fleet),
        (supervisor_need(len(groups), 0), f"{len(groups)} workers", not fleet),
        # The HTTP listener survives running out (it refuses clients until some leave): a
        # client cap above the limit is worth a warning, not a stop.
        (
            supervisor_need(len(groups), clients),
            f"{len(groups)} workers and {clients} HTTP clients (PROMETHEUS_MAX_CLIENTS)",
            False,
        ),
    ]
    for need, what, fatal in needs:
        problem = shortfall(need, limit.soft, what)
        if problem is None:
            continue
        if fatal:
            raise Fatal(problem)
        log.warning("%s", problem)
        break  # one line is enough: the first need not met says it


def run(loaded: Loaded, argv: list[str]) -> int:
    simulated: Simulated | None = None
    try:
        try:
            if loaded.cli.simulate:
                count = loaded.settings.shards.count or (
                    max(parse_shard_spec(loaded.cli.shards)) + 1 if loaded.cli.shards else 1
                )
                from .simulate import start_simulator  # --simulate only

                simulated = start_simulator(count, rate=5.0)
            options = prepare(loaded, argv, simulated)
        except Fatal as exc:
            log.error("%s", exc)
            return EX_CONFIG
        except ValueError as exc:  # shard specs and protocol limits checked at start-up
            log.error("configuration error: %s", exc)
            return EX_CONFIG
        except RuntimeError as exc:
            log.error("%s", exc)
            return EX_UNAVAILABLE
        # From here on nothing is a configuration error: a failure is a bug, with a traceback.
        return Supervisor(options).run()
    finally:
        if simulated is not None:
            simulated.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    loaded = run_or_exit(args, os.environ)
    if isinstance(loaded.cli.command, StatusCommand):
        from .statuscmd import run_status

        return run_status(loaded.cli.command, loaded.settings.prometheus, sys.stdout, sys.stderr)
    if isinstance(loaded.cli.command, ReshardCommand):
        from .reshardcmd import run_reshard

        return run_reshard(loaded.cli.command, loaded.settings, args, sys.stdout, sys.stderr)
    settings = loaded.settings
    setup_logging(settings.logging_level, settings.secrets())
    for warning in loaded.warnings:
        log.warning("%s", warning)
    return run(loaded, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
