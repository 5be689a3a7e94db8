"""The image and the compose stack, built and run in a real Docker engine (tests/dockerengine.py
starts one when none is running, and skips these tests with the reason when it cannot).

- The image (docker/Dockerfile on the local Python base): non-root, read-only root filesystem
  and nothing writable mounted, ``spectacles-supervise --simulate`` writes events on
  stdout, the HEALTHCHECK turns healthy, ``docker stop`` ends it with 0 within the grace period,
  a token given as a Docker secret file is used and never printed. Size and layers are reported.
- The compose stack (docker/docker-compose.yml, Grafana left out: it has no Debian package and
  nothing here depends on it) with the stand-ins: every service healthy, the gateway publishing a
  simulator's events into RabbitMQ (read by a consumer here), Prometheus scraping the gateway
  (``up == 1`` through its HTTP API), and ``down -v`` leaving nothing behind.

The run times are printed at the end of the module (``docker: ...`` lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml

from spectacles_gateway.durations import parse_duration

from .dockerengine import (
    GATEWAY_IMAGE,
    ROOT,
    Engine,
    Unavailable,
    compose_command,
    container_logs,
    gateway_image,
    inspect,
    remove,
    standins,
    start_engine,
    stop_engine,
)
from .gwproc import SECRET, free_port
from .gwtest import simulator, t

# A Docker engine, image builds and a compose stack: most of the machine, and its network.
pytestmark = pytest.mark.alone

COMPOSE = ROOT / "docker" / "docker-compose.yml"
TOKEN_PATH = "/run/secrets/discord_token"
FIGURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docker")


@pytest.fixture(scope="module")
def engine(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    try:
        engine = start_engine(workdir)
    except Unavailable as exc:
        pytest.skip(f"no Docker engine: {exc}")
    try:
        yield engine
    finally:
        undone = stop_engine(engine)
        lines = [f"docker: {key}: {value}" for key, value in FIGURES.items()]
        lines += [f"docker: {key}: {took:.1f} s" for key, took in engine.timings.items()]
        if undone:
            lines.append(f"docker: put back after dockerd: {', '.join(undone)}")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print("\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def image(engine: Engine, workdir: Path) -> str:
    try:
        gateway_image(engine, workdir)
    except Unavailable as exc:
        pytest.skip(str(exc))
    size, layers = inspect(engine, GATEWAY_IMAGE, "{{.Size}} {{len .RootFS.Layers}}").split()
    FIGURES["image size"] = f"{int(size) / 2**20:.0f} MiB, {layers} layers"
    return GATEWAY_IMAGE


def token_file(directory: Path, token: str) -> Path:
    """The token as compose and the docs hand it over: readable by the image's group only."""
    path = directory / "discord_token"
    path.write_text(token + "\n")
    os.chown(path, 0, 10001)
    path.chmod(0o440)
    return path


def run_container(engine: Engine, image: str, *args: str, name: str) -> None:
    engine.run(
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        *args[:-1],
        image,
        *args[-1].split(),
    )


def wait_for(what: str, timeout: float, check: Any, context: Any = None) -> Any:
    deadline = time.monotonic() + t(timeout)
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {t(timeout):.0f} s: {what}\n{context and context()}"
            )
        time.sleep(0.5)


def events_in(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_image_runs_read_only_as_non_root_turns_healthy_and_stops_with_0(
    engine: Engine, image: str
) -> None:
    name = f"sgw-test-{uuid.uuid4().hex[:8]}"
    grace = parse_duration(
        yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]["stop_grace_period"]
    )
    assert inspect(engine, image, "{{.Config.User}}") == "10001:10001"
    start = time.monotonic()
    run_container(
        engine, image, "spectacles-supervise --simulate --events MESSAGE_CREATE", name=name
    )
    try:
        logs = lambda: container_logs(engine, name)  # noqa: E731
        wait_for("5 events on stdout", 30, lambda: len(events_in(logs()[0])) >= 5, logs)
        assert {e["event"] for e in events_in(logs()[0])} == {"MESSAGE_CREATE"}
        ids = engine.run("exec", name, "python", "-c", "import os; print(os.getuid(), os.getgid())")
        assert ids.stdout.split() == ["10001", "10001"]
        write = engine.run(
            "exec", name, "python", "-c", "open('/opt/venv/probe', 'w')", check=False
        )
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
        assert inspect(engine, name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
        health = lambda: inspect(engine, name, "{{.State.Health.Status}}")  # noqa: E731
        wait_for("the HEALTHCHECK to turn healthy", 60, lambda: health() == "healthy", logs)
        FIGURES["image: healthy after"] = f"{time.monotonic() - start:.1f} s"
        stop_start = time.monotonic()
        engine.run("stop", "--time", str(int(grace)), name, timeout=grace + 30)
        took = time.monotonic() - stop_start
        FIGURES["image: docker stop took"] = f"{took:.1f} s"
        assert inspect(engine, name, "{{.State.ExitCode}}") == "0", logs()
        assert took < grace
        stdout, stderr = logs()
        assert "Traceback" not in stdout + stderr, stderr[-3000:]
    finally:
        remove(engine, [name])


async def test_image_uses_a_token_given_as_a_docker_secret_and_never_prints_it(
    engine: Engine, image: str, tmp_path: Path
) -> None:
    """The secret file mounted where compose puts it, no DISCORD_TOKEN in the environment; the
    simulator accepts only that token. Docker calls run in threads: the simulator shares this
    event loop."""
    name = f"sgw-test-{uuid.uuid4().hex[:8]}"
    secret = token_file(tmp_path, SECRET)
    async with simulator(token=SECRET, rate=20) as sim:
        host = sim.http_base.split("://", 1)[1].split("/", 1)[0]
        options = {
            "--network": "host",
            "--volume": f"{secret}:{TOKEN_PATH}:ro",
            "--env": f"DISCORD_API_HOST={host}",
        }
        env = {
            "DISCORD_API_PROTOCOL": "http",
            "DISCORD_EVENTS": "MESSAGE_CREATE",
            "PROMETHEUS_ADDRESS": f"127.0.0.1:{free_port()}",
        }
        args = [x for k, v in options.items() for x in (k, v)]
        args += [x for k, v in env.items() for x in ("--env", f"{k}={v}")]
        await asyncio.to_thread(
            run_container, engine, image, *args, "spectacles-supervise", name=name
        )
        try:

            def logs() -> tuple[str, str]:
                return container_logs(engine, name)

            deadline = time.monotonic() + t(30)
            while len(events_in((await asyncio.to_thread(logs))[0])) < 5:
                state = await asyncio.to_thread(inspect, engine, name, "{{.State.Status}}")
                assert state == "running", f"the gateway exited: {logs()}"
                assert time.monotonic() < deadline, f"no events: {logs()}"
                await asyncio.sleep(0.5)
            assert sim.ledger.identifies, "identified with the secret's token"
            await asyncio.to_thread(engine.run, "stop", "--time", "20", name, timeout=60)
            stdout, stderr = await asyncio.to_thread(logs)
            everything = stdout + stderr + engine.run("inspect", name).stdout
            assert SECRET not in everything
            assert SECRET.split(".")[-1] not in everything
            assert (
                "DISCORD_TOKEN"
                not in engine.run("inspect", name, "--format", "{{.Config.Env}}").stdout
            )
        finally:
            remove(engine, [name])


# ------------------------------------------------------------------ the compose stack

SIM_PORT = 8999


def stack_file(workdir: Path, token: Path, ports: dict[str, int]) -> Path:
    """docker/docker-compose.yml as an operator runs it, adapted to a test run: relative paths
    made absolute (the file is written elsewhere), the images prebuilt (no ``build``), host ports
    remapped to free ones, the settings file and the token secret from ``workdir``, RabbitMQ's
    AMQP port published for the test's consumer, Grafana left out, and a simulator service that
    plays Discord for the gateway (it accepts only the secret's token)."""
    doc = yaml.safe_load(COMPOSE.read_text())
    base = COMPOSE.parent
    services = doc["services"]
    services.pop("grafana")
    doc["volumes"].pop("grafana-data")
    for name, svc in services.items():
        svc.pop("build", None)
        svc["volumes"] = [
            f"{(base / v.split(':', 1)[0]).resolve()}:{v.split(':', 1)[1]}"
            if v.startswith(".")
            else v
            for v in svc.get("volumes", [])
        ]
        if not svc["volumes"]:
            del svc["volumes"]
        svc["ports"] = [
            f"127.0.0.1:{ports[name + ':' + p.rsplit(':', 1)[1]]}:{p.rsplit(':', 1)[1]}"
            for p in svc.get("ports", [])
        ]
    services["rabbitmq"]["ports"].append(f"127.0.0.1:{ports['rabbitmq:5672']}:5672")
    settings = workdir / "gateway.env"
    settings.write_text("DISCORD_EVENTS=MESSAGE_CREATE\nDISCORD_INTENTS=GUILDS,GUILD_MESSAGES\n")
    gateway = services["gateway"]
    gateway["env_file"] = [str(settings)]
    gateway["environment"].update(
        DISCORD_API_PROTOCOL="http", DISCORD_API_HOST=f"simulator:{SIM_PORT}"
    )
    gateway["depends_on"]["simulator"] = {"condition": "service_healthy"}
    doc["secrets"]["discord_token"]["file"] = str(token)
    probe = f"import urllib.request as r; r.urlopen('http://simulator:{SIM_PORT}/api/v10/gateway')"
    services["simulator"] = {
        "image": GATEWAY_IMAGE,
        "hostname": "simulator",
        "command": [
            "spectacles-simulator",
            "--host",
            "simulator",
            "--port",
            str(SIM_PORT),
            "--rate",
            "20",
            "--token",
            SECRET,
        ],
        "healthcheck": {
            "test": ["CMD", "python", "-c", probe],
            "interval": "2s",
            "timeout": "5s",
            "retries": 30,
        },
    }
    path = workdir / "docker-compose.test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def consume(port: int, count: int, timeout: float) -> list[tuple[dict[str, Any], bytes]]:
    """``count`` MESSAGE_CREATE deliveries from the stack's RabbitMQ (exchange ``gateway``, as a
    Spectacles consumer binds it), as (headers, body)."""
    params = pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F")
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.exchange_declare("gateway", "direct", durable=True)
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, "gateway", "MESSAGE_CREATE")
        got: list[tuple[dict[str, Any], bytes]] = []
        for method, properties, body in channel.consume(queue, inactivity_timeout=t(timeout)):
            if method is None:
                break
            got.append((dict(properties.headers or {}), body))
            channel.basic_ack(method.delivery_tag)
            if len(got) >= count:
                break
        channel.cancel()
        return got
    finally:
        connection.close()


def prometheus_up(port: int) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": 'up{job="spectacles-gateway"}'})
    url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]["result"]  # type: ignore[no-any-return]
    except OSError:
        return []


def project_leftovers(engine: Engine, project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    found = []
    for kind in ("container", "volume", "network"):
        listing = engine.run(
            kind, "ls", *(["--all"] if kind == "container" else []), "--quiet", "--filter", label
        ).stdout.split()
        found += [f"{kind} {item}" for item in listing]
    return found


def test_compose_stack_reaches_healthy_publishes_and_is_scraped(
    engine: Engine, image: str, workdir: Path
) -> None:
    try:
        compose = compose_command()
        standins(engine, workdir)
    except Unavailable as exc:
        pytest.skip(str(exc))
    project = f"sgwtest{uuid.uuid4().hex[:8]}"
    ports = {
        key: free_port()
        for key in ("gateway:8080", "rabbitmq:15672", "rabbitmq:5672", "prometheus:9090")
    }
    stack_dir = workdir / project
    stack_dir.mkdir()
    path = stack_file(stack_dir, token_file(stack_dir, SECRET), ports)
    argv = [*compose, "--project-name", project, "--file", str(path)]

    def compose_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=engine.env(),
        )

    def ps() -> dict[str, str]:
        ids = compose_run("ps", "--quiet").stdout.split()
        states = {}
        for cid in ids:
            name, health = inspect(
                engine,
                cid,
                '{{index .Config.Labels "com.docker.compose.service"}} '
                "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
            ).split()
            states[name] = health
        return states

    start = time.monotonic()
    try:
        up = compose_run("up", "--detach", "--no-build")
        assert up.returncode == 0, up.stdout + up.stderr
        wanted = {"gateway", "rabbitmq", "redis", "prometheus", "simulator"}
        logs = lambda: compose_run("logs", "--no-color", "--tail", "40").stdout  # noqa: E731
        wait_for(
            "every service healthy",
            180,
            lambda: set(ps()) == wanted and set(ps().values()) == {"healthy"},
            lambda: (ps(), logs()),
        )
        FIGURES["stack: healthy after"] = f"{time.monotonic() - start:.1f} s"
        deliveries = consume(ports["rabbitmq:5672"], 10, 30)
        assert len(deliveries) == 10, logs()
        assert all(h.get("shard_id") == 0 for h, _ in deliveries)
        assert all(
            body[:1] in (b"\xda", b"\xdb") or body[0] & 0xE0 == 0xA0 for _, body in deliveries
        )
        result = wait_for(
            "Prometheus to scrape the gateway (up == 1)",
            90,
            lambda: [r for r in prometheus_up(ports["prometheus:9090"]) if r["value"][1] == "1"],
            logs,
        )
        assert result[0]["metric"]["job"] == "spectacles-gateway"
        FIGURES["stack: scraped after"] = f"{time.monotonic() - start:.1f} s"
        everything = compose_run("logs", "--no-color").stdout
        assert SECRET not in everything
        assert "Traceback" not in everything, everything[-3000:]
    finally:
        down = compose_run("down", "--volumes", "--timeout", "20")
        FIGURES["stack: up to down"] = f"{time.monotonic() - start:.1f} s"
    assert down.returncode == 0, down.stdout + down.stderr
    assert project_leftovers(engine, project) == []
