"""``spectacles-supervise`` as a real subprocess against the simulator: stdout, stdin, signals."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from spectacles_gateway.simulator import (
    Close,
    CorruptCompressed,
    Drop,
    InvalidSession,
    MalformedJson,
    Reconnect,
    WithholdAcks,
)

from .gwproc import BIN, SECRET, duration, free_port, gateway, gateway_env, metric, metrics_when
from .gwtest import TOKEN, ready_count, simulator, t, wait_until


@pytest.mark.slow
async def test_four_shards_a_minute_of_broken_connections_every_event_exactly_once() -> None:
    rng = random.Random(20261128)
    seconds = float(os.environ.get("CHAOS_SECONDS", "60"))
    async with simulator(
        shard_count=4,
        rate=150,
        heartbeat_interval_ms=1000,
        heartbeat_timeout_factor=0,
        big_guild_create_bytes=1_100_000,
    ) as sim:
        async with gateway(gateway_env(sim)) as gw:
            await wait_until(lambda: ready_count(sim.ledger) == 4, 30, "4 shards ready")
            await wait_until(lambda: len(gw.ids()) > 200, 20, "events on stdout")
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            withheld: dict[int, float] = {}
            faults = 0
            while loop.time() < end:
                shard = rng.randrange(4)
                kind = rng.choice(["drop", "op7", "acks", "close", "op9"])
                if kind == "drop":
                    sim.inject(shard, Drop())
                elif kind == "op7":
                    sim.inject(shard, Reconnect())
                elif kind == "close":
                    sim.inject(shard, Close(rng.choice([4000, 4001, 4002, 4005, 4008, 1001])))
                elif kind == "op9":
                    sim.inject(shard, InvalidSession(resumable=True))
                elif shard not in withheld:
                    sim.inject(shard, WithholdAcks(True))
                    withheld[shard] = loop.time() + t(2.5)
                faults += 1
                for s, until in list(withheld.items()):
                    if loop.time() >= until:
                        sim.inject(s, WithholdAcks(False))
                        del withheld[s]
                await asyncio.sleep(t(rng.uniform(0.2, 0.8)))  # time to recover, scaled
            for s in withheld:
                sim.inject(s, WithholdAcks(False))
            sim.pause_dispatch()
            expected = set(sim.ledger.events_sent())
            await wait_until(lambda: set(gw.ids()) >= expected, 30, "every event on stdout")
            # A late duplicate would be on stdout by the end of it: stop() reads it to the end.
            code = await gw.stop()
        ids = gw.ids()
        assert code == 0, gw.log()[-3000:]
        assert len(ids) == len(set(ids)), "an event appeared twice on stdout"
        assert set(ids) == set(sim.ledger.events_sent())
        assert len(ids) > 200 * seconds / t(1.0)  # 200 events per (scaled) second
        assert sim.ledger.identify_count() == 4, gw.log()[-3000:]
        resumed = sim.ledger.resume_count(success=True)
        assert resumed >= faults * 0.6, (resumed, faults)
        assert not sim.ledger.violations
        assert TOKEN not in gw.log()
        print(
            f"chaos {seconds:.0f} s: {faults} faults, {resumed} resumes, "
            f"{len(sim.ledger.connections)} connections, {len(ids)} events, each exactly once"
        )


async def test_bad_input_is_logged_counted_and_survived() -> None:
    port = free_port()
    async with simulator(shard_count=2, rate=100) as sim:
        env = gateway_env(
            sim,
            DISCORD_TOKEN=SECRET,
            PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
        )
        sim.config.token = SECRET
        async with gateway(env, "--shards", "0-1", "--shard-count", "2", stdin=True) as gw:
            await wait_until(lambda: ready_count(sim.ledger) == 2, 30, "both shards ready")
            await wait_until(lambda: len(gw.ids()) > 100, 20, "events")
            assert gw.process.stdin is not None
            oversize = {"shard_id": 0, "packet": {"op": 3, "d": {"x": "y" * 5000}}}
            garbage = [
                b"this is not json\n",
                b"\x00\xff\xfe binary garbage\n",
                b'{"event":"SEND","data":"{not json"}\n',
                b'{"event":"SEND","data":{"packet":{"op":3}}}\n',
                b'{"event":"SEND","data":{"shard_id":7,"packet":{"op":3,"d":{}}}}\n',
                b'{"event":"SEND","data":{"guild_id":"abc","packet":{"op":3,"d":{}}}}\n',
                b'{"event":"NOPE","data":{}}\n',
                json.dumps({"event": "SEND", "data": oversize}).encode() + b"\n",
                b"[1,2,3]\n",
            ]
            for line in garbage:
                gw.process.stdin.write(line)
            good = {
                "event": "SEND",
                "data": {
                    "shard_id": 1,
                    "packet": {
                        "op": 3,
                        "d": {"status": "idle", "since": None, "activities": [], "afk": False},
                    },
                },
            }
            gw.process.stdin.write(json.dumps(good).encode() + b"\n")
            await gw.process.stdin.drain()
            await wait_until(lambda: len(sim.ledger.commands) == 1, 10, "the good command")
            sim.inject(0, CorruptCompressed())
            sim.inject(1, MalformedJson())
            await wait_until(
                lambda: sim.ledger.resume_count(success=True) >= 2, 15, "resumes", gw.log
            )
            n = len(gw.ids())
            await wait_until(lambda: len(gw.ids()) > n + 100, 10, "events still flowing")
            # Metrics are moved over once a second: wait for the report that counts every event
            # seen on stdout so far, so it comes after the faults, resumes and commands above.
            seen = len(set(gw.ids()))
            text = await metrics_when(
                port,
                lambda m: (
                    metric(m, "gateway_events_published_total", event="MESSAGE_CREATE") >= seen
                ),
                10,
                "the metrics of the events on stdout",
                gw.log,
            )
            code = await gw.stop()
        log = gw.log()
        assert code == 0
        assert sim.ledger.commands[0].shard_id == 1 and sim.ledger.commands[0].d["status"] == "idle"
        for reason in ("not_json", "wrong_shape", "unknown_shard", "unknown_event", "too_large"):
            assert metric(text, "gateway_input_dropped_total", reason=reason) >= 1, reason
        assert metric(text, "gateway_input_dropped_total") == len(garbage)
        assert metric(text, "gateway_decode_errors_total") >= 2
        assert metric(text, "gateway_packets_sent", op="2") == 2  # one IDENTIFY per shard
        assert metric(text, "gateway_packets_sent", op="6") >= 2  # the RESUMEs
        assert metric(text, "gateway_packets_sent", op="3", shard="1") == 1  # the command
        assert metric(text, "gateway_commands_sent_total", shard="1") == 1
        published = metric(text, "gateway_events_published_total", event="MESSAGE_CREATE")
        assert published >= 100
        assert metric(text, "gateway_events_confirmed_total", broker="stdio") >= published - 50
        assert metric(text, "gateway_publish_latency_seconds_count", broker="stdio") >= 1
        assert metric(text, "gateway_broker_connected") == 1
        assert metric(text, "gateway_reconnects_total", reason="decode_error") >= 2
        assert log.count("dropped input from stdin") + log.count("rejected a command") == len(
            garbage
        )
        assert "corrupt compressed data" in log and "malformed JSON" in log
        assert "Traceback" not in log
        assert (
            SECRET not in log and SECRET not in text and SECRET not in b"".join(gw.lines).decode()
        )
        assert sim.ledger.identify_count() == 2


@pytest.mark.parametrize(
    ("files", "env", "args", "needle"),
    [
        (
            {"gateway.toml": "token = 'x'\n[broker\ntype = 1"},
            {},
            ["--config", "gateway.toml"],
            "line",
        ),
        ({}, {"BROKER_TYPE": "kafka"}, [], "broker.type"),
        ({}, {"DISCORD_INTENTS": "GUILDS,GUILD_MESAGES"}, [], "GUILD_MESSAGES"),
        ({}, {"BROKER_MESSAGE_TIMEOUT": "2 minutes"}, [], "message_timeout"),
        ({}, {"DISCORD_TOKEN": ""}, [], "token"),
        ({}, {"DISCORD_SHARD_COUNT": "2", "DISCORD_SHARD_IDS": "0-3"}, [], "shards.ids"),
        ({}, {}, ["--shards", "5-2"], "shards.ids"),
        ({}, {"AMQP_URL": f"ftp://guest:{SECRET}@host/"}, [], "amqp.url"),
    ],
    ids=[
        "malformed-toml",
        "broker-type",
        "intent",
        "duration",
        "empty-token",
        "shard-ids",
        "spec",
        "url",
    ],
)
def test_bad_configuration_exits_78_with_one_line(
    tmp_path: Path, files: dict[str, str], env: dict[str, str], args: list[str], needle: str
) -> None:
    import subprocess

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    full_env = {"PATH": os.environ.get("PATH", ""), "DISCORD_TOKEN": SECRET, **env}
    result = subprocess.run(
        [str(BIN / "spectacles-supervise"), *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        timeout=t(30),
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 78, err
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert SECRET not in err and not result.stdout


async def test_bad_token_at_gateway_bot_exits_78_with_one_line() -> None:
    async with simulator() as sim:
        env = gateway_env(sim, DISCORD_TOKEN=SECRET)
        async with gateway(env) as gw:
            code = await asyncio.wait_for(gw.process.wait(), t(30))
            await asyncio.gather(*gw.tasks)
        log = gw.log()
        assert code == 78
        assert [line for line in log.splitlines() if "ERROR" in line] == [
            line for line in log.splitlines() if "401" in line
        ]
        assert len([line for line in log.splitlines() if "ERROR" in line]) == 1
        assert SECRET not in log


async def test_disallowed_intents_close_4014_exits_78() -> None:
    async with simulator(allowed_privileged=0) as sim:
        env = gateway_env(sim, DISCORD_INTENTS="GUILDS,GUILD_MEMBERS")
        async with gateway(env) as gw:
            code = await asyncio.wait_for(gw.process.wait(), t(30))
            await asyncio.gather(*gw.tasks)
        assert code == 78
        assert "4014" in gw.log()
        assert len(sim.ledger.connections) == 1  # no reconnect loop


async def test_sigterm_and_sigint_stop_in_time_and_keep_sessions_resumable() -> None:
    # TERM: graceful, over before the shutdown timeout (when workers would be killed);
    # INT: fast, workers are killed after 2 s at the latest, plus slack.
    shutdown_timeout = 10.0
    for sig, deadline in ((signal.SIGTERM, t(shutdown_timeout)), (signal.SIGINT, 2.0 + t(1.0))):
        async with simulator(rate=50, shard_count=2, max_concurrency=2) as sim:
            env = gateway_env(sim, DISCORD_SHUTDOWN_TIMEOUT=duration(shutdown_timeout))
            async with gateway(env) as gw:
                await wait_until(lambda: len(gw.ids()) > 10, 20, "events")
                loop = asyncio.get_running_loop()
                started = loop.time()
                code = await gw.stop(sig, timeout=shutdown_timeout + 2)
                took = loop.time() - started
            assert code == 0, gw.log()
            assert took < deadline, took
            for conn in sim.ledger.connections:
                assert conn.client_close_code not in (1000, 1001)  # sessions stay resumable
                assert conn.session_id is not None and sim.is_resumable(conn.session_id)
            assert "Traceback" not in gw.log()


async def test_simulate_flag_runs_without_a_token_or_any_service() -> None:
    env = {"PATH": os.environ.get("PATH", ""), "DISCORD_EVENTS": "MESSAGE_CREATE"}
    async with gateway(env, "--simulate") as gw:
        await wait_until(lambda: len(gw.ids()) >= 3, 20, "simulated events")
        code = await gw.stop()
    assert code == 0, gw.log()
    record = gw.records()[0]
    assert record["event"] == "MESSAGE_CREATE" and record["shard_id"] == 0


async def test_msgpack_stdio_format_is_the_seed_stream() -> None:
    import msgspec

    from spectacles_gateway.records import msgpack_object_end

    async with simulator(rate=100) as sim:
        async with gateway(gateway_env(sim, STDIO_FORMAT="msgpack"), binary=True) as gw:
            await wait_until(lambda: sum(map(len, gw.lines)) > 20000, 20, "output")
            await gw.stop()
        stream = b"".join(gw.lines)
        records = []
        pos = 0
        while pos < len(stream):
            end = msgpack_object_end(stream, pos)
            assert end is not None
            records.append(msgspec.msgpack.decode(stream[pos:end]))
            pos = end
        assert len(records) > 10
        assert all(set(r) == {"event", "data"} and r["event"] == "MESSAGE_CREATE" for r in records)
        assert all(isinstance(json.loads(r["data"])["id"], str) for r in records)


def test_closed_stdout_stops_the_gateway_with_74_not_a_reconnect_loop() -> None:
    import subprocess

    env = {"PATH": os.environ.get("PATH", ""), "DISCORD_EVENTS": "MESSAGE_CREATE"}
    proc = subprocess.Popen(
        [str(BIN / "spectacles-supervise"), "--simulate"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    assert b"MESSAGE_CREATE" in first
    proc.stdout.close()  # the consumer goes away
    code = proc.wait(timeout=t(20))
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert code == 74, err
    assert err.count("stdout was closed") == 1
    assert "Traceback" not in err
    assert err.count("resumed") == 0


def test_stdout_to_a_regular_file(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "events.jsonl"
    env = {"PATH": os.environ.get("PATH", ""), "DISCORD_EVENTS": "MESSAGE_CREATE"}
    with out.open("wb") as f:
        proc = subprocess.Popen(
            [str(BIN / "spectacles-supervise"), "--simulate"],
            stdout=f,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + t(20)
        while out.read_bytes().count(b"\n") < 15 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=t(20))
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert code == 0, err
    lines = out.read_bytes().splitlines()
    assert len(lines) >= 15
    assert all(json.loads(line)["event"] == "MESSAGE_CREATE" for line in lines)


async def test_proxy_variables_in_the_environment_are_not_picked_up() -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proxies = dict.fromkeys(
        ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"), dead
    )
    async with simulator(rate=50) as sim:
        async with gateway(gateway_env(sim, **proxies)) as gw:
            await wait_until(lambda: len(gw.ids()) > 10, 20, "events without a proxy", gw.log)
            code = await gw.stop()
    assert code == 0
    assert sim.ledger.http and sim.ledger.identify_count() == 1
