"""A real Docker engine for tests/test_docker.py, and the images it needs, from Debian's packages.

No registry is needed: the base is a ``debootstrap --variant=minbase`` of Debian imported as
``local/debian:bookworm``; ``local/python:3.11-bookworm`` adds Debian's Python and the host's
extra CA certificates (docker/standins/python.Dockerfile) and stands in for ``python:3.11-slim``;
RabbitMQ, Redis and Prometheus stand-ins are built from Debian's packages and tagged with the names
docker/docker-compose.yml uses. Every image stays in the engine's data root, so a second run on
the same machine builds nothing again (the build cache checks each layer's inputs).

The engine: an already running one is used as it is. Otherwise ``dockerd`` is started here as
root and stopped at the end, configured to leave the host's network alone (no docker0 bridge, no
iptables rules, ip_forward untouched: ``--bridge=none --iptables=false --ip-forward=false``); what
it changed all the same (links it created, iptables rules, ip_forward) is put back when it stops.
Builds use ``--network host`` and the classic builder (``DOCKER_BUILDKIT=0``: the client may have
no buildx), never ``--pull``.

When the engine cannot start, :class:`Unavailable` says why and how to install it (the tests skip
with that message): ``apt-get install docker.io docker-compose debootstrap``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STANDINS = ROOT / "docker" / "standins"
DEBIAN_IMAGE = "local/debian:bookworm"
PYTHON_IMAGE = "local/python:3.11-bookworm"
GATEWAY_IMAGE = "spectacles-gateway:local"
#: The label every stand-in carries, so that a real image of the same name is never replaced.
STANDIN_LABEL = "org.spectacles-gateway.standin"
INSTALL = "apt-get install docker.io docker-compose debootstrap"
#: apt in the imported base keeps no package caches, as in Debian's official images.
APT_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""


class Unavailable(Exception):
    """No Docker engine could be used here; the message says why."""


@dataclass
class Engine:
    docker: str
    dockerd: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    network: NetworkState | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return dict(os.environ, DOCKER_BUILDKIT="0")

    def run(
        self, *args: str, timeout: float = 120, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.docker, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env(),
            input=input.decode() if input is not None else None,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args[:3])} ... exited {result.returncode}\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def has_image(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0

    def label(self, tag: str, name: str) -> str:
        fmt = "{{index .Config.Labels " + json.dumps(name) + "}}"
        return self.run("image", "inspect", "--format", fmt, tag).stdout.strip()

    def build(
        self,
        context: Path,
        tag: str,
        dockerfile: Path | None = None,
        args: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        timeout: float = 900,
    ) -> float:
        """``docker build`` (classic builder, host network, no pull); returns the seconds taken."""
        argv = ["build", "--network", "host", "--tag", tag]
        if dockerfile is not None:
            argv += ["--file", str(dockerfile)]
        for key, value in (args or {}).items():
            argv += ["--build-arg", f"{key}={value}"]
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        start = time.monotonic()
        self.run(*argv, str(context), timeout=timeout)
        took = time.monotonic() - start
        self.timings[f"build {tag}"] = took
        return took


# ------------------------------------------------------------------ the host's network


@dataclass
class NetworkState:
    """What dockerd may change on the host: network links, iptables rules, ip_forward."""

    links: set[str]
    iptables: str | None
    ip_forward: str

    @classmethod
    def read(cls) -> NetworkState:
        links = set(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else set()
        return cls(links, _iptables_rules(), Path("/proc/sys/net/ipv4/ip_forward").read_text())

    def restore(self) -> list[str]:
        """Undo what changed since this snapshot; returns what was put back."""
        now = NetworkState.read()
        undone: list[str] = []
        # Only the kinds dockerd makes: another process's new links are none of our business.
        for link in sorted(now.links - self.links):
            if not link.startswith(("docker", "br-", "veth")):
                continue
            subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
            undone.append(f"link {link}")
        if self.iptables is not None and now.iptables != self.iptables:
            saved = shutil.which("iptables-restore")
            if saved:
                subprocess.run([saved], input=self.iptables, text=True, check=False)
                undone.append("iptables rules")
        if now.ip_forward != self.ip_forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward)
            undone.append("ip_forward")
        return undone


def _iptables_rules() -> str | None:
    save = shutil.which("iptables-save")
    if save is None:
        return None
    result = subprocess.run([save], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    # Counters and the timestamp comments change on their own.
    lines = [
        re.sub(r"\[\d+:\d+\]", "[0:0]", line)
        for line in result.stdout.splitlines()
        if not line.startswith("#")
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the engine


def _answers(docker: str, timeout: float = 10) -> bool:
    try:
        result = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def start_engine(workdir: Path, wait: float = 60) -> Engine:
    """A Docker engine that answers: the running one, or ``dockerd`` started here."""
    docker = shutil.which("docker")
    if docker is None:
        raise Unavailable(f"no docker client ({INSTALL})")
    if _answers(docker):
        return Engine(docker)
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise Unavailable(f"no Docker engine running and no dockerd to start ({INSTALL})")
    if os.geteuid() != 0:
        raise Unavailable("dockerd can only be started as root here")
    network = NetworkState.read()
    log = workdir / "dockerd.log"
    argv = [
        dockerd,
        "--storage-driver=overlay2",
        "--bridge=none",
        "--iptables=false",
        "--ip-forward=false",
        "--pidfile",
        str(workdir / "dockerd.pid"),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    engine = Engine(docker, process, log, network)
    deadline = time.monotonic() + wait
    while not _answers(docker, timeout=5):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_engine(engine)
            tail = log.read_text(errors="replace")[-2000:]
            raise Unavailable(f"dockerd did not start:\n{tail}")
        time.sleep(0.5)
    return engine


def stop_engine(engine: Engine, timeout: float = 30) -> list[str]:
    """Stop the dockerd started here (not one that was running before) and put the host's
    network back as it was; returns what had to be undone."""
    process = engine.dockerd
    if process is None:
        return []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert engine.network is not None
    return engine.network.restore()


# ------------------------------------------------------------------ images


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        text = path.read_text(errors="replace")
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.M):
            uri = m[1]
            if "debian.org/debian" in uri and "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


def debian_base(engine: Engine, workdir: Path) -> None:
    """``local/debian:bookworm`` from debootstrap, once per engine."""
    if engine.has_image(DEBIAN_IMAGE):
        return
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise Unavailable(f"debootstrap is not installed ({INSTALL})")
    start = time.monotonic()
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=workdir))
    try:
        subprocess.run(
            [debootstrap, "--variant=minbase", "bookworm", str(rootfs), debian_mirror()],
            capture_output=True,
            check=True,
            timeout=900,
        )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        for path in (rootfs / "var/cache/apt").glob("*.bin"):
            path.unlink()
        (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(APT_CLEAN)
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            subprocess.run(
                [engine.docker, "import", "-", DEBIAN_IMAGE],
                stdin=tar.stdout,
                capture_output=True,
                check=True,
                timeout=300,
            )
        assert tar.returncode == 0
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    engine.timings["debootstrap and import"] = time.monotonic() - start


def host_ca_certificates() -> list[Path]:
    """The extra CA certificates this host trusts, where update-ca-certificates reads them."""
    local = Path("/usr/local/share/ca-certificates")
    return sorted(p for p in local.rglob("*.crt") if p.is_file()) if local.is_dir() else []


def python_base(engine: Engine, workdir: Path) -> None:
    """``local/python:3.11-bookworm``: Debian's Python and the host's CA certificates."""
    debian_base(engine, workdir)
    context = Path(tempfile.mkdtemp(prefix="python-base-", dir=workdir))
    certs = context / "ca-certificates"
    certs.mkdir()
    for n, cert in enumerate(host_ca_certificates()):
        shutil.copyfile(cert, certs / f"host-{n}-{cert.name}")
    (certs / "README").write_text("extra CA certificates of the build host\n")
    engine.build(context, PYTHON_IMAGE, STANDINS / "python.Dockerfile")


def standin_tags() -> dict[str, str]:
    """Stand-in Dockerfile name -> the image name docker/docker-compose.yml uses for it."""
    import yaml

    services = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())["services"]
    return {
        name: services[name]["image"]
        for name in ("rabbitmq", "redis", "prometheus")
        if name in services
    }


def standins(engine: Engine, workdir: Path) -> dict[str, str]:
    """Build (or reuse) the RabbitMQ, Redis and Prometheus stand-ins under the compose file's
    image names; a real image already there under such a name is left alone."""
    debian_base(engine, workdir)
    tags = standin_tags()
    for name, tag in tags.items():
        if engine.has_image(tag) and engine.label(tag, STANDIN_LABEL) != "true":
            continue  # the real image is here: use it
        engine.build(STANDINS, tag, STANDINS / f"{name}.Dockerfile", labels={STANDIN_LABEL: "true"})
    return tags


def gateway_image(engine: Engine, workdir: Path, tag: str = GATEWAY_IMAGE) -> float:
    """docker/Dockerfile built from this checkout on the local Python base."""
    python_base(engine, workdir)
    return engine.build(
        ROOT, tag, ROOT / "docker" / "Dockerfile", args={"BASE_IMAGE": PYTHON_IMAGE}
    )


# ------------------------------------------------------------------ compose


def compose_command() -> list[str]:
    """Debian's ``docker-compose`` (v1), else the ``docker compose`` plugin (v2)."""
    found = shutil.which("docker-compose")
    if found:
        return [found]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    raise Unavailable(f"neither docker-compose nor docker compose is installed ({INSTALL})")


@contextlib.contextmanager
def engine_for_tests(workdir: Path) -> Iterator[Engine]:
    engine = start_engine(workdir)
    try:
        yield engine
    finally:
        undone = stop_engine(engine)
        if undone:
            print(f"dockerd: put back {', '.join(undone)}")


def container_logs(engine: Engine, name: str) -> tuple[str, str]:
    result = engine.run("logs", name, check=False)
    return result.stdout, result.stderr


def inspect(engine: Engine, name: str, template: str) -> str:
    return engine.run("inspect", "--format", template, name).stdout.strip()


def remove(engine: Engine, names: Sequence[str]) -> None:
    if names:
        engine.run("rm", "--force", "--volumes", *names, check=False)
