"""``spectacles-supervise status``: a running gateway's shards in the terminal, as a real
subprocess asking a real supervisor (or a listener we control, for the answers a supervisor
never gives)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path

import pytest

from spectacles_gateway.config import PrometheusSettings
from supervisor.status import shard_columns, status
from supervisor.statuscmd import GLYPHS, default_url, render

from .gwproc import BIN, free_port, gateway, gateway_env
from .gwproc import status as get_status
from .gwtest import simulator, t, wait_until
from .support.answers import answering
from .support.statusview import FakeView, FleetView, MemberView, fleet_member, shard_status

PASSWORD = "s3cret-proxy-pass"


def status_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "spectacles-supervise"), "status", *args],
        capture_output=True,
        text=True,
        timeout=t(30),
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        cwd=Path(__file__).parent,  # no gateway.toml here
        check=False,
    )


def ready(port: int, shards: int) -> bool:
    try:
        return get_status(port)["progress"]["ready"] == shards
    except OSError:
        return False


async def test_status_of_a_running_gateway_table_grid_and_json() -> None:
    port = free_port()
    async with simulator(shard_count=6, max_concurrency=6, rate=20) as sim:
        env = gateway_env(sim, PROMETHEUS_ADDRESS=f"127.0.0.1:{port}", SUPERVISOR_WORKERS="2")
        async with gateway(env) as gw:
            await wait_until(lambda: ready(port, 6), 30, "6 shards ready", gw.log)
            table = await asyncio.to_thread(status_cmd, "--url", f"http://127.0.0.1:{port}")
            # The default address: PROMETHEUS_ADDRESS, its wildcard host asked on loopback.
            raw = await asyncio.to_thread(
                status_cmd, "--json", env={"PROMETHEUS_ADDRESS": f":{port}"}
            )
            pids = {w["worker"]: w["pid"] for w in get_status(port)["workers"]}
            assert await gw.stop() == 0
    assert table.returncode == 0, table.stderr
    assert table.stderr == ""
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"supervisor at http://127.0.0.1:{port}: ready, up ")
    assert "shards ready 6/6, identified 6, waiting to identify 0" in lines[1]
    assert "states: ready 6" in lines
    grid = next(line for line in lines if line.startswith("      0 "))
    assert grid.split() == ["0", GLYPHS["ready"] * 6]
    # A row per shard (6 is a small count): id, state, seq (a number), latency, worker.
    rows = {int(r.split()[0]): r.split() for r in lines[lines.index("shards:") + 2 :]}
    assert sorted(rows) == list(range(6))
    assert all(r[1] == "ready" and int(r[2]) > 0 for r in rows.values())
    workers = {int(r.split()[0]): r.split() for r in lines[lines.index("workers:") + 2 :][:2]}
    assert {w: int(r[1]) for w, r in workers.items()} == pids
    assert raw.returncode == 0, raw.stderr
    summary = json.loads(raw.stdout)
    assert summary["ready"] is True and summary["progress"]["total"] == 6
    assert "columns" not in summary and "shards" not in summary  # the summary, as /status is


def test_nothing_answering_is_one_line_and_exit_1() -> None:
    port = free_port()
    done = status_cmd("--url", f"http://watcher:{PASSWORD}@127.0.0.1:{port}/")
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert f"no supervisor answers at http://***@127.0.0.1:{port}/" in done.stderr
    assert PASSWORD not in done.stderr


def test_no_address_to_ask_is_a_configuration_error() -> None:
    done = status_cmd()
    assert done.returncode == 78
    assert done.stderr.splitlines() == [
        "spectacles-supervise status: no address to ask: pass --url or set PROMETHEUS_ADDRESS "
        "(config key 'prometheus.address')"
    ]


@pytest.mark.parametrize(
    ("code", "body", "says"),
    [
        (200, b"<html>a web page</html>", "did not answer /status with JSON"),
        (200, b'{"status": "ok"}', "did not answer /status with a supervisor's status"),
        (503, b"internal error\n", "answered HTTP 503 to /status"),
        (
            200,
            b'{"progress": {"ready": 1, "total": 1, "identified": 1, "waiting_to_identify": 0},'
            b'"columns": {"ids": "0-3", "states": [], "state": [0]}}',
            "answered a /status this command cannot read",
        ),
    ],
)
def test_an_answer_that_is_not_a_status_is_one_line_and_exit_1(
    code: int, body: bytes, says: str
) -> None:
    with answering(lambda n: (code, {}, body)) as (url, _):
        done = status_cmd("--url", url)
    assert done.returncode == 1, done.stdout
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert says in done.stderr


def test_a_password_in_the_url_is_sent_as_basic_auth_and_never_shown() -> None:
    view = FakeView.of(3, workers=1)
    body = json.dumps(status(view, 0.0) | {"columns": shard_columns(view)}).encode()  # type: ignore[arg-type]
    with answering(lambda n: (200, {"Content-Type": "application/json"}, body)) as (url, seen):
        done = status_cmd("--url", url.replace("://", f"://watcher:{PASSWORD}@") + "/gw/")
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert done.stdout.startswith("supervisor at http://***@127.0.0.1:")
    (request,) = seen
    assert request[":path"] == "/gw/status?shards=columns"  # under the URL's path prefix
    expected = base64.b64encode(f"watcher:{PASSWORD}".encode()).decode()
    assert request["authorization"] == f"Basic {expected}"


def test_many_shards_a_grid_and_the_unready_ones_only() -> None:
    view = FakeView.of(120, workers=3)  # shard i in worker i % 3
    view.set(7, shard_status("resuming", seq=55, latency_ms=None, last_close="no close frame"))
    view.set(64, shard_status("stopped", seq=None, latency_ms=None, fatal=4014))
    for shard in range(100, 120):
        view.set(shard, shard_status("starting", seq=None, latency_ms=None))
    data = status(view, view.started + 65) | {"columns": shard_columns(view)}  # type: ignore[arg-type]
    lines = render(data, "http://127.0.0.1:8080").splitlines()
    assert lines[0] == "supervisor at http://127.0.0.1:8080: not ready, up 1m05s, shard count 120"
    assert "states: ready 98, resuming 1, starting 20, stopped 1" in lines
    legend = lines.index("shards (# ready, r resuming, . starting, X fatal):")
    grid = {int(line.split()[0]): "".join(line.split()[1:]) for line in lines[legend + 1 :][:3]}
    assert sorted(grid) == [0, 50, 100]
    assert grid[0] == "#" * 7 + "r" + "#" * 42
    assert grid[50] == "#" * 14 + "X" + "#" * 35
    assert grid[100] == "." * 20
    # More than 32 shards: the table lists the 22 that are not ready, and only them.
    start = lines.index("shards not ready:")
    assert lines[start + 1].split() == [
        "shard",
        "state",
        "seq",
        "latency",
        "worker",
        "last",
        "close",
    ]
    rows = [line.split() for line in lines[start + 2 :]]
    assert [int(r[0]) for r in rows] == [7, 64, *range(100, 120)]
    assert rows[0] == ["7", "resuming", "55", "-", "1", "no", "close", "frame"]
    assert rows[1] == ["64", "stopped", "(fatal", "4014)", "-", "-", "1", "-"]
    assert rows[2] == ["100", "starting", "-", "-", "1", "-"]


def test_a_long_list_of_unready_shards_is_cut() -> None:
    view = FakeView.of(100, workers=2, state="identifying")
    lines = render(status(view, 0.0) | {"columns": shard_columns(view)}, "http://h:1").splitlines()  # type: ignore[arg-type]
    assert lines[-1] == "  ... and 60 more"
    assert len(lines) - lines.index("shards not ready:") - 3 == 40


@pytest.mark.parametrize(
    ("address", "url"),
    [
        (":8080", "http://127.0.0.1:8080"),
        ("0.0.0.0:9100", "http://127.0.0.1:9100"),
        ("127.0.0.2:81", "http://127.0.0.2:81"),
        ("[::]:8080", "http://[::1]:8080"),
        ("[::1]:8080", "http://[::1]:8080"),
        ("", None),
    ],
)
def test_the_default_address_is_the_listener_seen_from_this_host(
    address: str, url: str | None
) -> None:
    assert default_url(PrometheusSettings(address=address)) == url


def test_a_fleet_member_shows_the_members_and_the_shards_nobody_owns() -> None:
    owners = {s: ("host-a-101" if s < 6 else "host-b-202", 3 + s) for s in range(10)}
    members = [MemberView("host-a-101", 0, 6, 0.4), MemberView("host-b-202", 8, 4, 2.5)]
    fleet = FleetView(members, owners, {"host-a-101": 6, "host-b-202": 6})
    view = fleet_member(FakeView.of(6, workers=2), "host-a-101", 12, fleet)
    data = status(view, 0.0) | {"columns": shard_columns(view)}  # type: ignore[arg-type]
    lines = render(data, "http://h:1").splitlines()
    start = lines.index("fleet bot: this member host-a-101")
    assert [line.split() for line in lines[start + 1 : start + 4]] == [
        ["member", "shards", "target", "capacity", "renewed"],
        ["host-a-101", "(this", "one)", "6", "6", "any", "0.4", "s", "ago"],
        ["host-b-202", "4", "6", "8", "2.5", "s", "ago"],
    ]
    assert lines[start + 4] == "  shards without an owner: 10-11"
    assert "not ready" in lines[0]  # the fleet does not own every shard


def test_a_reshard_in_progress_and_the_last_one_are_one_line() -> None:
    from supervisor.statuscmd import _reshard

    running = {
        "state": "starting",
        "from": 4,
        "to": 8,
        "new_generation": 1,
        "reason": "recommended",
        "new_shards_ready": 3,
        "waiting": "3/8 new shards ready",
    }
    assert _reshard(running) == [
        "reshard: starting, 4 -> 8 shards (generation 1, recommended), 3 new shards ready; "
        "3/8 new shards ready"
    ]
    done = {"state": "idle", "last": {"outcome": "done", "detail": "4 -> 8 shards in 24.5 s"}}
    assert _reshard(done) == ["last reshard: done: 4 -> 8 shards in 24.5 s"]
    assert _reshard({"state": "idle"}) == [] and _reshard(None) == []
