"""The house's boundaries, checked at run time (import-linter checks them statically in CI).

The supervisor must stay small and must never load what only a worker needs; the protocol core
must stay sans-I/O. Each check imports the module in a fresh interpreter and reads
``sys.modules``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .gwtest import t

WORKER_ONLY = [
    "asyncio",
    "uvloop",
    "websockets",
    "zstandard",
    "backports.zstd",
    "pika",
    "redis.asyncio",
    "prometheus_client",
    "pydantic",
    "spectacles_gateway.transport",
    "spectacles_gateway.runner",
    "spectacles_gateway.worker",
]
IO = ["asyncio", "socket", "ssl", "selectors", "uvloop", "websockets"]
#: What the supervisor uses rarely, loaded only then (issue 14: its fixed memory): HTTPS for
#: ``GET /gateway/bot`` (a child process asks), the shard map's file, --simulate's prctl, the
#: TOML parser (a configuration file), difflib (a suggestion for a key we do not know), fleet
#: mode, --simulate, and random (the jitter of a worker's restart).
RARELY = [
    "ssl",
    "http.client",
    "email",
    "importlib.resources",
    "ctypes",
    "tomllib",
    "difflib",
    "supervisor.fleet",
    "supervisor.simulate",
    "random",
]


def loaded_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=t(60)
    )
    return set(json.loads(result.stdout))


#: What the supervisor loads: its entry point, and what it does before the first fork
#: (configuration, plan, control codec).
SUPERVISOR_LOADS = pytest.mark.parametrize(
    "statement",
    [
        "import supervisor.cli",
        "from spectacles_gateway.config import load; load([], {'DISCORD_TOKEN': 't'})\n"
        "import supervisor.arbiter, supervisor.status, supervisor.relay",
    ],
    ids=["entry-point", "start-up"],
)


@SUPERVISOR_LOADS
def test_the_supervisor_loads_none_of_the_workers_libraries(statement: str) -> None:
    modules = loaded_after(statement)
    assert not [m for m in WORKER_ONLY if m in modules]


@SUPERVISOR_LOADS
def test_the_supervisor_loads_what_it_rarely_uses_only_when_used(statement: str) -> None:
    modules = loaded_after(statement)
    assert not [m for m in RARELY if m in modules]
    # ... and the check sees them when they are used:
    used = loaded_after(f"{statement}\nimport supervisor.status; supervisor.status.page()")
    assert "importlib.resources" in used
    used = loaded_after(
        "import os, tempfile\nfrom spectacles_gateway.config import load\n"
        "path = os.path.join(tempfile.mkdtemp(), 'gateway.toml')\n"
        "open(path, 'w').write('shard_cuont = 2\\n')\n"  # a key we do not know
        "load(['--config', path], {'DISCORD_TOKEN': 't'})"
    )
    assert {"tomllib", "difflib"} <= used
    used = loaded_after(f"{statement}\nimport supervisor.arbiter; supervisor.arbiter.jitter()")
    assert "random" in used


def test_the_protocol_core_loads_no_io() -> None:
    modules = loaded_after("import spectacles_gateway.protocol.shard")
    assert not [m for m in IO if m in modules]


def test_the_check_sees_an_import_it_must_refuse() -> None:
    """The check itself can fail: importing the transport does load websockets and asyncio."""
    modules = loaded_after("import supervisor.cli, spectacles_gateway.transport")
    assert {"websockets", "asyncio"} <= modules


#: What none of the supervisor's code needs: ``dataclasses`` loads ``inspect``, which loads
#: ``ast`` and ``dis`` (about 0.9 MiB of a supervisor's 20; our types are msgspec structs).
#: msgspec loads ``inspect`` itself when it can import ``typing_extensions``; the command keeps
#: it out (``supervisor.entry``, checked below), and these checks run as without it.
UNNEEDED = ["dataclasses", "inspect", "ast", "dis"]
WITHOUT_TYPING_EXTENSIONS = "import sys\nsys.modules['typing_extensions'] = None\n"


@SUPERVISOR_LOADS
def test_the_supervisor_loads_no_introspection(statement: str) -> None:
    modules = loaded_after(WITHOUT_TYPING_EXTENSIONS + statement)
    assert not [m for m in UNNEEDED if m in modules]
    # ... and the check sees them when they are used:
    used = loaded_after(f"{WITHOUT_TYPING_EXTENSIONS}{statement}\nimport dataclasses")
    assert set(UNNEEDED) <= used


def test_the_command_keeps_typing_extensions_out() -> None:
    """The ``spectacles-supervise`` entry point, through to a configuration error (exit 78,
    after the configuration and its msgspec types were loaded), loads neither
    ``typing_extensions`` nor what it would bring, though it is installed here; the CLI's
    ``main`` called directly does load it: the check can fail."""
    if importlib.util.find_spec("typing_extensions") is None:
        pytest.skip("typing_extensions is not installed: nothing to keep out")
    code = (
        "import json, sys\nfrom supervisor.{module} import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 78, exc.code\n"
        "print(json.dumps(sorted(k for k, v in sys.modules.items() if v is not None)))"
    )
    env = {"PATH": os.environ.get("PATH", "")}  # no token: the configuration is refused

    def loaded_by(module: str) -> set[str]:
        result = subprocess.run(
            [sys.executable, "-c", code.format(module=module)],
            capture_output=True, text=True, check=True, timeout=t(60), env=env,
        )  # fmt: skip
        assert "config key 'token'" in result.stderr
        return set(json.loads(result.stdout))

    modules = loaded_by("entry")
    assert {"msgspec", "spectacles_gateway.config"} <= modules
    assert not [m for m in ["typing_extensions", *UNNEEDED] if m in modules]
    assert {"typing_extensions", "inspect"} <= loaded_by("cli")
