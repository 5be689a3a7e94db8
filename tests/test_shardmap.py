"""The shard map (``GET /``) in a real headless Chromium.

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them), driven by Selenium
through that chromedriver (never a downloaded browser or driver). Against a real
``spectacles-supervise`` and the simulator: the page shows the shards the simulator runs, with
their seq; a shard whose connection the simulator kills turns not-ready on the page, and ready
again once it resumed; the screenshot of that moment goes to the test's temporary directory, or
to ``SHARDMAP_SCREENSHOT`` when set (``docs/shardmap.png`` was made that way: a test run
leaves the checkout as it was). Against the real
status routes with 2,500 shards of our making: the render and refresh times, and the fleet view.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from spectacles_gateway.simulator import Drop, Simulator, SimulatorConfig
from supervisor.status import page

from .gwproc import BIN, duration, free_port, gateway_env, status
from .gwtest import t, wait_until
from .support.statusview import FakeView, FleetView, MemberView, fleet_member, serve, shard_status

#: Where the screenshot of a shard gone offline is saved (None: the test's temporary directory).
SCREENSHOT = os.environ.get("SHARDMAP_SCREENSHOT") or None
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: The flags of the machine notes: no network of Chromium's own, a fresh profile per run.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
NOT_READY = {"disconnected", "waiting_hello", "resuming", "identifying"}


def test_the_page_is_one_self_contained_file() -> None:
    html = page().decode()
    assert html.startswith("<!doctype html>")
    # Nothing fetched from elsewhere: no script or style source, no import, no font or image URL.
    assert not re.search(r"<script[^>]+src=|<link[^>]+stylesheet|@import|@font-face", html)
    assert re.findall(r"(?:src|href)=\"([^\"]*)\"", html) == ["data:,"]  # the empty favicon
    assert "url(" not in html
    assert not re.search(r"https?://", html)
    # It refreshes itself from the compact status, by a relative URL (works behind a prefix).
    assert 'fetch("status?shards=columns"' in html


# --------------------------------------------------------------------------------------------
# The browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed "
            "(apt-get install chromium chromium-driver; .ci/run does)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="shardmap-chromium-")
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # The driver's path given: Selenium Manager (which would download one) is never asked.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(t(30))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def js(browser: Any, script: str, *args: Any) -> Any:
    return browser.execute_script(script, *args)


def script_errors(browser: Any) -> list[str]:
    """What the page's scripts threw (or logged as errors) since the last call."""
    entries = browser.get_log("browser")
    return [e["message"] for e in entries if e.get("source") in ("javascript", "console-api")]


def shown(browser: Any) -> dict[int, dict[str, Any]]:
    """Every shard as the page shows it: the cell's state, class and text, and the page's
    values behind the detail panel."""
    rows = js(
        browser,
        """return Array.from(document.querySelectorAll('#grid .c')).map((c) => {
             const s = window.shardmap.shard(c.dataset.shard);
             return [Number(c.dataset.shard), c.dataset.state, c.className, c.textContent, s];
           });""",
    )
    return {
        shard: dict(info, dom_state=state, cls=cls, text=text)
        for shard, state, cls, text, info in rows
    }


# --------------------------------------------------------------------------------------------
# A real supervisor against the simulator


class SimulatorThread:
    """The simulator on an event loop of its own, so that the test can hold that loop still
    (Discord not answering) while the browser and the supervisor go on."""

    def __init__(self, **config: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim", daemon=True)
        self.thread.start()
        self.sim: Simulator = self.run(self._start(SimulatorConfig(**config)))

    async def _start(self, config: SimulatorConfig) -> Simulator:
        sim = Simulator(config)
        await sim.start()
        return sim

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(t(30))

    def call(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self.run(call())

    def kill_and_hold(self, shard: int, release: threading.Event) -> None:
        """Abort the shard's connection, then hold the simulator's loop until ``release``: the
        gateway's reconnection waits for an answer as long as the test wants."""

        def fault() -> None:
            self.sim.inject(shard, Drop())
            # After the aborted socket is closed (the transport queued that first).
            self.loop.call_soon(release.wait, t(60))

        self.loop.call_soon_threadsafe(fault)

    def close(self) -> None:
        self.run(self.sim.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(t(10))
        self.loop.close()


def supervisor_status(port: int) -> dict[str, Any] | None:
    try:
        return status(port, shards=True)
    except OSError:
        return None


async def test_the_map_follows_a_real_gateway_through_a_dropped_connection(
    browser: Any, tmp_path: Path
) -> None:
    shards, rate, victim = 24, 5.0, 7
    # Heartbeats every 15 s: every shard has a latency soon, and holding the simulator still
    # for a few seconds misses no heartbeat ACK (no zombie connection to close).
    sim = SimulatorThread(
        shard_count=shards, max_concurrency=shards, rate=rate, heartbeat_interval_ms=15_000
    )
    port = free_port()
    env = gateway_env(
        sim.sim,
        PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
        SUPERVISOR_WORKERS="2",
        DISCORD_OPEN_TIMEOUT=duration(30),
    )
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        gateway = subprocess.Popen(
            [str(BIN / "spectacles-supervise")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    release = threading.Event()
    try:
        await wait_until(
            lambda: (supervisor_status(port) or {}).get("ready"), 60, "every shard READY"
        )
        browser.get(f"http://127.0.0.1:{port}/")
        # Every shard the simulator runs, ready, on the page; nothing else.
        running = set(sim.call(lambda: {r.shard_id for r in sim.sim.ledger.identifies}))
        assert running == set(range(shards))
        await wait_until(
            lambda: (
                set(view := shown(browser)) == running
                and all(v["dom_state"] == "ready" and "s-ready" in v["cls"] for v in view.values())
            ),
            20,
            "every shard ready on the page",
        )

        # Events per second (derived in the page from seq deltas), latency, the worker's pid.
        await wait_until(
            lambda: all(v["eps"] and v["latency_ms"] is not None for v in shown(browser).values()),
            40,
            "events per second and latency for every shard",
        )
        view = shown(browser)
        total = sum(v["eps"] for v in view.values())
        print(f"shard map: {total:.1f} events/s on the page for {shards} shards x {rate:g}/s")
        assert 0.3 * shards * rate <= total <= 3 * shards * rate
        pids = {w["pid"] for w in (supervisor_status(port) or {})["workers"]}
        assert {v["worker_pid"] for v in view.values()} == pids
        # The seq the page shows is the simulator's, once dispatching holds still.
        sim.call(sim.sim.pause_dispatch)
        written = sim.call(
            lambda: {s: sim.sim.ledger.sessions_for(s)[-1].written for s in range(shards)}
        )
        await wait_until(
            lambda: {s: v["seq"] for s, v in shown(browser).items()} == written,
            20,
            f"the page's seq to be the simulator's {written}",
        )
        sim.call(sim.sim.resume_dispatch)
        identifies = sim.call(sim.sim.ledger.identify_count)

        # Kill one shard's connection; the simulator answers nothing until the page shows it.
        sim.kill_and_hold(victim, release)
        await wait_until(
            lambda: shown(browser)[victim]["dom_state"] in NOT_READY,
            30,
            f"shard {victim} shown as not ready",
        )
        down = shown(browser)[victim]  # and so it stays while the simulator is held
        assert f"s-{down['state']}" in down["cls"], down
        others = shown(browser)
        assert all(v["dom_state"] == "ready" for s, v in others.items() if s != victim)
        js(browser, "document.querySelector(`[data-shard='${arguments[0]}']`).click()", victim)
        problems = js(browser, "return document.querySelector('#problems tbody').innerText")
        assert problems.split()[0] == str(victim), problems
        detail = js(browser, "return document.querySelector('#detail').innerText")
        assert f"Shard {victim}" in detail.replace("SHARD", "Shard"), detail
        screenshot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "shardmap.png"
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        release.set()
        await wait_until(
            lambda: shown(browser)[victim]["dom_state"] == "ready",
            30,
            f"shard {victim} ready again on the page",
        )
        assert js(browser, "return document.querySelector('#problemsBox').hidden") is True
        assert sim.call(lambda: sim.sim.ledger.resume_count(victim, success=True)) >= 1
        assert sim.call(sim.sim.ledger.identify_count) == identifies  # resumed, not identified
        assert not script_errors(browser)
        seen = js(browser, "return [window.shardmap.refreshes, window.shardmap.errors]")
        assert seen[1] == 0, js(browser, "return window.shardmap.lastError")
        print(f"shard map: {seen[0]} refreshes, {seen[1]} failed; shard {victim}: {down['state']}")
    finally:
        release.set()
        if gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
        try:
            code = gateway.wait(t(20))
        finally:
            if gateway.poll() is None:
                gateway.kill()
            sim.close()
    assert code == 0, log.read_text()[-3000:]


# --------------------------------------------------------------------------------------------
# 2,500 shards, and a fleet


def refreshes(browser: Any) -> int:
    return js(browser, "return window.shardmap.refreshes")  # type: ignore[no-any-return]


def timings(browser: Any) -> dict[str, list[float]]:
    return js(browser, "return window.shardmap.timings")  # type: ignore[no-any-return]


async def test_two_thousand_five_hundred_shards_render_and_refresh(browser: Any) -> None:
    shards = 2500
    view = FakeView.of(shards, workers=8)
    # Start-up: the last 500 shards wait for their identify.
    for shard in range(2000, shards):
        view.set(shard, shard_status("starting", seq=None, latency_ms=None))
        view.pacer.request(shard)
    turn = {"n": 0}

    def churn(view: FakeView) -> None:
        """Before each refresh: every running shard 50 events further, 1 % resuming."""
        turn["n"] += 1
        n = turn["n"]
        for shard in range(2000):
            state = "resuming" if shard % 100 == n % 100 else "ready"
            view.set(shard, shard_status(state, seq=1000 + shard + 50 * n, latency_ms=40 + n % 7))

    with serve(view) as served:
        served.before = churn
        started = time.monotonic()
        browser.get(served.url + "/?every=500")
        await wait_until(lambda: refreshes(browser) >= 1, 30, "a first render")
        first = time.monotonic() - started
        await wait_until(lambda: refreshes(browser) >= 21, 60, "20 refreshes")
        got = timings(browser)
        cells = js(browser, "return document.querySelectorAll('#grid .c').length")
        size = js(browser, "return window.shardmap.bytes")
        counts = js(
            browser,
            "const c = {}; document.querySelectorAll('#grid .c').forEach((e) => "
            "{ c[e.dataset.state] = (c[e.dataset.state] || 0) + 1 }); return c;",
        )
        waiting = js(browser, "return document.getElementById('pWaiting').textContent")
        eta = js(browser, "return document.getElementById('pEta').textContent")
        eps = js(browser, "return window.shardmap.shard(0).eps")
        detailed = len(fetch_bytes(served.url + "/status?shards=1"))
    assert not script_errors(browser)
    assert js(browser, "return window.shardmap.errors") == 0
    render = got["render"][1:]
    refresh = [f + r for f, r in zip(got["fetch"], got["render"], strict=True)]
    print(
        f"shard map, 2,500 shards: page {len(page()) / 1024:.1f} KiB; status?shards=columns "
        f"{size / 1024:.1f} KiB (status?shards=1: {detailed / 1024:.1f} KiB); first load to "
        f"first render {first * 1000:.0f} ms (first render {got['render'][0]:.1f} ms); refresh "
        f"render median {statistics.median(render):.1f} ms, max {max(render):.1f} ms; whole "
        f"refresh (fetch, parse, render) median {statistics.median(refresh[1:]):.1f} ms; "
        f"to the next frame median {statistics.median(got['frame'][1:]):.1f} ms"
    )
    assert cells == shards
    assert (
        counts.get("starting") == 500 and counts.get("ready", 0) + counts.get("resuming", 0) == 2000
    )
    assert waiting == "500" and eta not in ("", "\u2013")  # an en dash: no estimate
    assert eps == pytest.approx(100.0, rel=0.5)  # 50 seq per refresh, one every 0.5 s
    assert size < detailed / 3
    # Usable: a refresh is a small part of its interval even at 2,500 shards.
    assert statistics.median(render) < t(100), render


def fetch_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=t(10)) as response:
        return response.read()  # type: ignore[no-any-return]


async def test_a_fleet_section_shows_members_and_every_owner(browser: Any) -> None:
    # This member runs shards 0-5 of 12; another runs 6-10; shard 11 has no owner right now.
    owners = {s: ("host-a-101" if s < 6 else "host-b-202", 3 + s) for s in range(11)}
    members = [MemberView("host-a-101", 0, 6, 0.4), MemberView("host-b-202", 8, 5, 2.5)]
    targets = {"host-a-101": 6, "host-b-202": 6}
    view = fleet_member(
        FakeView.of(6, workers=2), "host-a-101", 12, FleetView(members, owners, targets)
    )
    with serve(view) as served:
        browser.get(served.url + "/")
        await wait_until(lambda: len(shown(browser)) == 12, 20, "12 shards on the map")
        cells = shown(browser)
        assert [cells[s]["dom_state"] for s in range(12)] == ["ready"] * 6 + ["remote"] * 5 + [
            "unowned"
        ]
        assert "s-remote" in cells[6]["cls"] and "s-unowned" in cells[11]["cls"]
        assert [cells[s]["owner"] for s in (0, 10, 11)] == ["host-a-101", "host-b-202", None]
        assert cells[10]["epoch"] == 13
        table = js(browser, "return document.querySelector('#members tbody').innerText")
        rows = [line.split("\t") for line in table.splitlines()]
        assert rows == [
            ["host-a-101 (this one)", "6", "6", "any", "0.4 s ago"],
            ["host-b-202", "5", "6", "8", "2.5 s ago"],
        ]
        assert js(browser, "return document.getElementById('fleetBox').hidden") is False
        # The shard nobody owns is a problem to show.
        problems = js(browser, "return document.querySelector('#problems tbody').innerText")
        assert problems.split("\t")[:2] == ["11", "no owner"]
        # Coloured by member: one colour per owner.
        js(
            browser,
            "const s = document.getElementById('colour'); s.value = 'owner';"
            "s.dispatchEvent(new Event('change'));",
        )
        classes = {s: v["cls"].split()[1] for s, v in shown(browser).items()}
        assert len({classes[s] for s in range(6)}) == 1
        assert len({classes[s] for s in range(6, 11)}) == 1
        assert classes[0] != classes[10]
        assert not script_errors(browser)


async def test_a_supervisor_that_stops_answering_is_said_so(browser: Any) -> None:
    with serve(FakeView.of(4, workers=1)) as served:
        browser.get(served.url + "/?every=250")
        await wait_until(lambda: refreshes(browser) >= 1, 20, "a render")
    # The listener is gone: the page says so and keeps the last picture.
    banner = "return document.getElementById('banner').innerText"
    await wait_until(lambda: js(browser, banner), 20, "the banner")
    assert "does not answer" in js(browser, banner)
    assert js(browser, "return document.getElementById('badge').textContent") == "no answer"
    assert len(shown(browser)) == 4
