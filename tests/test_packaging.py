"""Packaging and installing, for real: the sdist and wheel (``python -m build``, ``twine check``),
the wheel in a fresh virtualenv, the lock (docker/requirements.lock) on every Python the package
claims, and the README's first command.

These download from PyPI (through pip's cache): the build backend for ``python -m build``, the
locked dependencies for each fresh virtualenv.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from .gwtest import t

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "docker" / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SYSTEM_PYTHON = Path("/usr/bin/python3")
REQUIRES_PYTHON = PYPROJECT["project"]["requires-python"]
#: Every minor version the package claims (requires-python) that is released, with the patch
#: releases where a dependency's markers change (redis needs async-timeout below 3.11.3).
PYTHONS = ["3.11.0", "3.11.2", "3.11.3", "3.12.0", "3.13.0", "3.14.0"]


def marker_env(python: str) -> dict[str, str]:
    return dict(
        default_environment(),
        python_full_version=python,
        python_version=".".join(python.split(".")[:2]),
        sys_platform="linux",
        platform_system="Linux",
    )


def lock_entries() -> dict[str, tuple[str, Requirement]]:
    """name -> (version, requirement with its marker) for every pin in the lock."""
    entries: dict[str, tuple[str, Requirement]] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line[0] in "# ":
            continue
        req = Requirement(line.rstrip(" \\"))
        (spec,) = req.specifier
        entries[canonicalize_name(req.name)] = (spec.version, req)
    return entries


def run(argv: list[str], timeout: float = 300, **kwargs: object) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert result.returncode == 0, f"{argv[:4]}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def venv(python: str | Path, path: Path) -> Path:
    run([str(python), "-m", "venv", str(path)])
    return path / "bin"


def pip_env() -> dict[str, str]:
    """pip quiet and without its version check; the rest as configured on this machine."""
    return dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")


# ------------------------------------------------------------------ the lock


@pytest.mark.parametrize("python", PYTHONS)
def test_the_lock_is_complete_on_every_python_the_package_claims(python: str) -> None:
    """For each Python: every runtime dependency, and every dependency of a locked package,
    is pinned with a marker that selects it there (metadata of the locked versions installed
    here; the closure on the system Python is also installed for real below)."""
    assert SpecifierSet(REQUIRES_PYTHON).contains(python)
    env = marker_env(python)
    entries = lock_entries()
    selected = {
        name for name, (_, req) in entries.items() if req.marker is None or req.marker.evaluate(env)
    }
    needed: list[Requirement] = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    seen: set[str] = set()
    while needed:
        req = needed.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in selected, f"Python {python}: {req} is needed but not locked for it"
        assert req.specifier.contains(entries[name][0], prereleases=True), (req, entries[name])
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:  # the real installs below check it
            continue
        if dist.version == entries[name][0]:
            needed += [Requirement(r) for r in dist.requires or []]
    assert ("async-timeout" in seen) == (Version(python) < Version("3.11.3"))


def test_the_lock_installs_with_require_hashes_on_the_system_python(tmp_path: Path) -> None:
    """Debian 12's own Python (3.11.2): the documented host install, hashes checked, nothing
    resolved outside the lock, then ``pip check``."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} is not there")
    version = run([str(SYSTEM_PYTHON), "-c", "import platform; print(platform.python_version())"])
    if not SpecifierSet(REQUIRES_PYTHON).contains(version.strip()):
        pytest.skip(f"{SYSTEM_PYTHON} is {version.strip()}, the package needs {REQUIRES_PYTHON}")
    bin_ = venv(SYSTEM_PYTHON, tmp_path / "venv")
    run(
        [str(bin_ / "pip"), "install", "--quiet", "--require-hashes", "-r", str(LOCK)],
        env=pip_env(),
    )
    run([str(bin_ / "pip"), "check"])
    installed = json.loads(run([str(bin_ / "pip"), "list", "--format", "json"]))
    versions = {canonicalize_name(p["name"]): p["version"] for p in installed}
    env = marker_env(version.strip())
    for name, (pinned, req) in lock_entries().items():
        if req.marker is None or req.marker.evaluate(env):
            assert versions.get(name) == pinned, (name, versions.get(name))
    assert "async-timeout" in versions, "the 3.11.2 case the lock once missed"


# ------------------------------------------------------------------ sdist and wheel


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("dist")
    run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
        timeout=600,
        env=pip_env(),
    )
    yield out


def test_sdist_and_wheel_build_and_pass_twine_check(dist: Path) -> None:
    files = sorted(p.name for p in dist.iterdir())
    version = PYPROJECT["project"]["version"]
    assert f"spectacles_gateway-{version}.tar.gz" in files
    assert f"spectacles_gateway-{version}-py3-none-any.whl" in files
    out = run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())])
    assert out.count("PASSED") == 2, out
    wheel = next(dist.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
    assert not any(n.startswith("tests/") for n in names), "tests stay out of the wheel"
    assert "supervisor/cli.py" in names and "spectacles_gateway/worker.py" in names
    assert "supervisor/shardmap.html" in names, "the shard map (GET /) ships as package data"


def simulate(bin_: Path, cwd: Path, events: int = 5) -> tuple[int, list[dict[str, object]], str]:
    """``spectacles-supervise --simulate`` from ``bin_``: ``events`` records, then SIGTERM."""
    log = cwd / "simulate.log"
    records = []
    with (
        log.open("wb") as stderr,
        subprocess.Popen(
            [str(bin_ / "spectacles-supervise"), "--simulate", "--events", "MESSAGE_CREATE"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={"PATH": os.environ.get("PATH", "")},
        ) as process,
    ):
        assert process.stdout is not None
        try:
            while len(records) < events:
                line = process.stdout.readline()
                assert line, f"stdout closed early: {log.read_text()[-3000:]}"
                records.append(json.loads(line))
            process.send_signal(signal.SIGTERM)
            process.stdout.read()
            code = process.wait(t(30))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return code, records, log.read_text(errors="replace")


def test_the_wheel_in_a_fresh_virtualenv_prints_its_version_and_runs_the_simulator(
    dist: Path, tmp_path: Path
) -> None:
    bin_ = venv(sys.executable, tmp_path / "venv")
    wheel = next(dist.glob("*.whl"))
    run(
        [str(bin_ / "pip"), "install", "--quiet", "--require-hashes", "-r", str(LOCK)],
        env=pip_env(),
    )
    run([str(bin_ / "pip"), "install", "--quiet", "--no-deps", str(wheel)], env=pip_env())
    run([str(bin_ / "pip"), "check"])
    printed = run([str(bin_ / "spectacles-supervise"), "--version"])
    assert PYPROJECT["project"]["version"] in printed, printed
    code, records, log = simulate(bin_, tmp_path)
    assert code == 0, log[-3000:]
    assert {r["event"] for r in records} == {"MESSAGE_CREATE"}
    assert not (bin_ / "pytest").exists(), "the test tools are not runtime dependencies"


# ------------------------------------------------------------------ the README


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.*?)\n```", text, re.S)[:2]


def test_readme_first_command_installs_only_what_running_needs_and_says_which_python() -> None:
    first, second = readme_commands()
    assert "[test]" not in first and "pip install" in first
    assert "--simulate" in first
    intro = (ROOT / "README.md").read_text().split("```sh", 1)[0]
    claimed = REQUIRES_PYTHON.removeprefix(">=")
    assert f"Python {claimed}" in intro, f"the README says it needs Python {claimed} or newer"
    assert "[test]" in second and "pytest" in second


def test_readme_first_command_runs_on_a_fresh_checkout(tmp_path: Path) -> None:
    """The first command as written, in a copy of the project with no virtualenv: it installs
    and then runs the simulator, whose events come out on stdout."""
    first, _ = readme_commands()
    checkout = tmp_path / "checkout"
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(
            ".venv*", ".git", "node_modules", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    install, _, command = first.rpartition(" && ")
    run(
        ["sh", "-c", install.replace("python3 ", f"{sys.executable} ", 1)],
        cwd=checkout,
        env=pip_env(),
        timeout=600,
    )
    assert command.startswith(".venv/bin/spectacles-supervise --simulate")
    code, records, log = simulate(checkout / ".venv" / "bin", checkout)
    assert code == 0, log[-3000:]
    assert records and all(r["event"] == "MESSAGE_CREATE" for r in records)
