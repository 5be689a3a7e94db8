"""discord.md §14, end to end: the real worker over real sockets against the simulator."""

from __future__ import annotations

import asyncio
import itertools
import json
from urllib.parse import parse_qs, urlsplit

import pytest

from spectacles_gateway.simulator import (
    RESUME_PATH,
    Close,
    CorruptCompressed,
    Drop,
    HeartbeatRequest,
    InvalidSession,
    MalformedJson,
    Op7BeforeHello,
    Reconnect,
    UnknownDispatch,
    UnknownOpcode,
    WithholdAcks,
)

from .gwtest import TOKEN, running_worker, simulator, t, wait_until

QUERY = {"v": ["10"], "encoding": ["json"], "compress": ["zstd-stream"]}


def ready(worker: object, shard_id: int = 0) -> bool:
    runner = worker.runners.get(shard_id)  # type: ignore[attr-defined]
    return runner is not None and runner.ready


async def test_s1_hello_heartbeat_identify_ready_dispatches() -> None:
    async with simulator(heartbeat_interval_ms=1000, rate=50) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: len(broker.ids()) >= 20, 10, "dispatches")
            await wait_until(lambda: len(sim.ledger.heartbeats) >= 2, 5, "two heartbeats")
        (identify,) = sim.ledger.identifies
        assert identify.token_ok and identify.payload["d"]["token"] == TOKEN
        assert identify.shard_id == 0 and identify.num_shards == 1
        assert identify.intents == 513 and identify.large_threshold == 250
        assert set(identify.properties) == {"os", "browser", "device"}
        assert identify.size <= 4096
        conn = sim.ledger.connections[0]
        assert parse_qs(conn.query and "&".join(f"{k}={v}" for k, v in conn.query.items())) == QUERY
        first_beat = sim.ledger.heartbeats[0]
        # The first heartbeat comes after HELLO, within one interval (jitter), d = last seq.
        assert 0 <= first_beat.time - conn.opened_at <= 1.0 + t(0.2)
        beats = [h.time for h in sim.ledger.heartbeats if h.conn_id == conn.conn_id]
        assert all(1.0 - t(0.2) <= b - a <= 1.0 + t(0.3) for a, b in itertools.pairwise(beats[1:]))
        # Dispatches in seq order; the stored READY seq was 1.
        seqs = [s for _, e, s, _ in broker.events if e == "MESSAGE_CREATE"]
        assert seqs == sorted(seqs) and seqs[0] > 1
        # s14: every forwarded event with a guild_id came on the shard Discord routes it to.
        assert all((int(d["guild_id"]) >> 22) % 1 == 0 for d in broker.by_event("MESSAGE_CREATE"))
        assert conn.client_close_code == 1000  # s10: a shutdown that ends the session sends 1000


async def test_s2_big_guild_create_and_fragmented_messages_decode() -> None:
    async with simulator(big_guild_create_bytes=1_300_000, ws_fragment_over=4096, rate=20) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: len(broker.by_event("GUILD_CREATE")) >= 1, 10, "GUILD_CREATE")
            await wait_until(lambda: len(broker.ids()) >= 5, 10, "messages")
        sizes = [len(d) for _, e, _, d in broker.events if e == "GUILD_CREATE"]
        assert max(sizes) > 1 << 20  # over 1 MiB: over websockets' default max_size


async def test_s2_fresh_decompressor_on_every_connection() -> None:
    async with simulator(rate=100) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: len(broker.ids()) >= 10, 10, "dispatches")
            for _ in range(3):
                n = len(broker.ids())
                sim.inject(0, Drop())
                await wait_until(lambda n=n: len(broker.ids()) >= n + 20, 10, "events after drop")
        assert sim.ledger.resume_count(0, success=True) == 3
        assert sim.ledger.identify_count() == 1


@pytest.mark.parametrize("compression", ["zlib-stream", "none"])
async def test_s2_other_transport_compressions(compression: str) -> None:
    compress = None if compression == "none" else compression
    async with simulator(rate=100, zlib_split_over=2048, big_guild_create_bytes=200_000) as sim:
        async with running_worker(sim, compress=compress) as (worker, broker):
            await wait_until(lambda: len(broker.ids()) >= 30, 10, "dispatches")
            sim.inject(0, Reconnect())
            n = len(broker.ids())
            await wait_until(lambda: len(broker.ids()) >= n + 30, 10, "after reconnect")
        assert sim.ledger.connections[0].compression == compress
        assert sim.ledger.resume_count(0, success=True) == 1
        assert max(len(d) for _, e, _, d in broker.events if e == "GUILD_CREATE") > 190_000


async def test_s3_withheld_acks_zombie_resume_at_resume_url_with_query() -> None:
    async with simulator(heartbeat_interval_ms=500, rate=50, heartbeat_timeout_factor=0) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: ready(worker) and len(broker.ids()) > 5, 10, "ready")
            sim.inject(0, WithholdAcks(True))
            await wait_until(lambda: sim.ledger.resume_count(0) >= 1, 10, "resume")
            sim.inject(0, WithholdAcks(False))
            await wait_until(lambda: sim.ledger.resume_count(0, success=True) >= 1, 10, "resumed")
        first, second = sim.ledger.connections[:2]
        assert first.client_close_code not in (None, 1000, 1001)
        assert urlsplit(second.path).path == RESUME_PATH or second.path.startswith(RESUME_PATH)
        assert {k: [v] for k, v in second.query.items()} == QUERY
        resume = sim.ledger.resumes[0]
        assert resume.session_id == first.session_id
        assert resume.seq == max(
            s for _, _, s, _ in broker.events if s is not None and s <= resume.seq
        )


async def test_s4_heartbeat_request_is_answered_at_once() -> None:
    async with simulator(heartbeat_interval_ms=41250) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: ready(worker), 10, "ready")
            sim.inject(0, HeartbeatRequest())
            asked_at = sim.ledger.faults[-1].time
            await wait_until(
                lambda: any(h.time >= asked_at for h in sim.ledger.heartbeats), 1, "heartbeat"
            )
        assert sim.ledger.heartbeats[-1].d is not None


async def test_s5_op7_after_ready_and_instead_of_hello() -> None:
    async with simulator(rate=50) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: ready(worker) and len(broker.ids()) > 5, 10, "ready")
            sim.inject(0, Reconnect())
            await wait_until(lambda: sim.ledger.resume_count(0, success=True) == 1, 10, "resume")
            sim.inject(0, Op7BeforeHello())
            sim.inject(0, Drop())
            await wait_until(lambda: sim.ledger.resume_count(0, success=True) == 2, 10, "resume 2")
        assert sim.ledger.identify_count() == 1
        closes = [c.client_close_code for c in sim.ledger.connections[:-1]]
        assert all(code not in (1000, 1001) for code in closes if code is not None)


async def test_s6_resume_replays_exactly_the_missed_events() -> None:
    async with simulator(rate=200) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: len(broker.ids()) > 50, 10, "dispatches")
            for n in range(1, 4):
                sim.inject(0, Drop())
                await wait_until(
                    lambda n=n: sim.ledger.resume_count(0, success=True) >= n, 10, f"resume {n}"
                )
            await wait_until(lambda: sim.ledger.resume_count(0, success=True) >= 3, 10, "resumes")
            sim.pause_dispatch()
            await wait_until(
                lambda: set(broker.ids()) >= set(sim.ledger.events_sent(0)), 10, "all events"
            )
        ids = broker.ids()
        assert sorted(ids) == sorted(set(sim.ledger.events_sent(0)))  # each exactly once
        seqs = [s for _, e, s, _ in broker.events if e == "MESSAGE_CREATE"]
        assert seqs == sorted(seqs)  # replay keeps the original seqs, in order
        assert sim.ledger.identify_count() == 1


async def test_s7_failed_resume_identifies_on_original_url_after_a_wait() -> None:
    async with simulator(rate=50, resume_window=0.0) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: ready(worker) and len(broker.ids()) > 5, 10, "ready")
            sim.inject(0, Close(4000))  # resumable close, but the session expires at once
            await wait_until(lambda: sim.ledger.identify_count() == 2, 15, "second identify")
            await wait_until(lambda: ready(worker), 10, "ready again")
            core = worker.runners[0].core
            assert core.session_id == sim.ledger.identifies[1].session_id
            assert core.seq is not None and core.seq < 50  # seq restarted with the new session
        (failed,) = sim.ledger.resumes
        assert not failed.success and failed.outcome == "invalid_session"
        second_identify = sim.ledger.identifies[1]
        assert 1.0 <= second_identify.time - failed.time <= 5.0 + t(0.5)  # waited 1-5 s
        last_conn = sim.ledger.connections[-1]
        assert not last_conn.path.startswith(RESUME_PATH)


async def test_s8_op9_true_resumes_and_op9_false_identifies() -> None:
    async with simulator(rate=20) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: ready(worker), 10, "ready")
            sim.inject(0, InvalidSession(resumable=True))
            await wait_until(lambda: sim.ledger.resume_count(0, success=True) == 1, 10, "resume")
            sim.inject(0, InvalidSession(resumable=False))
            await wait_until(lambda: sim.ledger.identify_count() == 2, 10, "identify")
            await wait_until(lambda: ready(worker), 10, "ready")
        assert sim.ledger.resume_count(0) == 1


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (4000, "resume"),
        (4001, "resume"),
        (4002, "resume"),
        (4003, "identify"),
        (4004, "fatal"),
        (4005, "resume"),
        (4007, "identify"),
        (4008, "resume"),
        (4009, "identify"),
        (4010, "fatal"),
        (4011, "fatal"),
        (4012, "fatal"),
        (4013, "fatal"),
        (4014, "fatal"),
        (1000, "resume"),
        (1001, "resume"),
    ],
)
async def test_s9_close_codes(code: int, outcome: str) -> None:
    async with simulator(rate=20) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: ready(worker), 10, "ready")
            sim.inject(0, Close(code))
            if outcome == "fatal":
                # The shard's task has ended: it will not reconnect. The checks below run
                # once the whole worker has returned.
                await wait_until(lambda: worker.runners[0].task.done(), 5, "shard stopped")
            elif outcome == "identify":
                await wait_until(lambda: sim.ledger.identify_count() == 2, 15, "identify")
            else:
                await wait_until(lambda: sim.ledger.resume_count(0) == 1, 10, "resume")
        if outcome == "fatal":
            assert worker.exit_code == 78  # type: ignore[attr-defined]
            assert len(sim.ledger.connections) == 1 and sim.ledger.resume_count() == 0
        elif outcome == "identify":
            assert sim.ledger.resume_count() == 0
        else:
            assert sim.ledger.identify_count() == 1


async def test_s9_tcp_drop_resumes() -> None:
    async with simulator(rate=20) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: ready(worker), 10, "ready")
            sim.inject(0, Drop())
            await wait_until(lambda: sim.ledger.resume_count(0, success=True) == 1, 10, "resume")
        assert sim.ledger.identify_count() == 1


async def test_s10_reconnect_paths_never_send_1000() -> None:
    async with simulator(rate=20, heartbeat_interval_ms=300, heartbeat_timeout_factor=0) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: ready(worker), 10, "ready")
            faults = [
                Reconnect(),
                InvalidSession(resumable=True),
                CorruptCompressed(),
                MalformedJson(),
            ]
            for n, fault in enumerate(faults, start=1):
                sim.inject(0, fault)
                await wait_until(lambda n=n: len(sim.ledger.connections) > n, 15, f"after {fault}")
                await wait_until(lambda: ready(worker), 10, "ready")
            sim.inject(0, WithholdAcks(True))
            await wait_until(lambda: len(sim.ledger.connections) > 5, 5, "zombie reconnect")
            sim.inject(0, WithholdAcks(False))
            await wait_until(lambda: ready(worker), 10, "ready")
        *reconnects, last = sim.ledger.connections
        assert [c.client_close_code for c in reconnects if c.closed_by == "client"]
        assert all(c.client_close_code not in (1000, 1001) for c in reconnects)
        assert last.client_close_code == 1000
        assert sim.ledger.identify_count() == 1


async def test_s11_command_flood_stays_under_the_send_limit() -> None:
    async with simulator(send_limit=(20, 3.0), heartbeat_interval_ms=1000) as sim:
        async with running_worker(sim, send_limit=20, send_period=3.0) as (worker, broker):
            await wait_until(lambda: ready(worker), 10, "ready")
            acked: list[int] = []
            for i in range(40):
                body = json.dumps(
                    {"shard_id": 0, "packet": {"op": 3, "d": {"status": "online", "n": i}}}
                )
                worker.handle_command(body.encode(), lambda i=i: acked.append(i))
            await wait_until(lambda: len(sim.ledger.commands) == 40, 20, "all commands")
        assert [c.d["n"] for c in sim.ledger.commands] == list(range(40))
        assert acked == list(range(40))
        assert not [v for v in sim.ledger.violations if "4008" in v]
        assert sim.ledger.connections[0].server_close_code is None


async def test_s12_identify_gate_buckets() -> None:
    async with simulator(shard_count=4, max_concurrency=2, identify_window=5.0) as sim:
        async with running_worker(sim, (0, 1, 2, 3)) as (worker, broker):
            await wait_until(lambda: sim.ledger.identify_count() == 4, 12, "4 identifies")
        times = {r.shard_id: r.time for r in sim.ledger.identifies}
        assert abs(times[0] - times[1]) < t(1.0)  # buckets 0 and 1 together
        assert times[2] - times[0] >= 5.0 and times[3] - times[1] >= 5.0
        assert times[2] - times[0] < 5.0 + t(1.5)
        assert not sim.ledger.violations


async def test_s12_session_start_budget_exhausted_waits_for_reset() -> None:
    from spectacles_gateway.gate import LocalIdentifyGate
    from spectacles_gateway.protocol.identify import SessionBudget

    async with simulator() as sim:
        loop = asyncio.get_running_loop()
        budget = SessionBudget(total=1000, remaining=0, reset_at=loop.time() + 2.0)
        gate = LocalIdentifyGate(1, budget=budget)
        started = loop.time()
        async with running_worker(sim, gate=gate) as (worker, broker):
            await wait_until(lambda: sim.ledger.identify_count() == 1, 10, "identify")
            elapsed = loop.time() - started
        assert elapsed >= 2.0
        assert budget.remaining == 999


async def test_s13_unknown_opcodes_and_events_are_tolerated_and_forwarded() -> None:
    async with simulator(rate=20) as sim:
        async with running_worker(sim) as (worker, broker):
            await wait_until(lambda: ready(worker), 10, "ready")
            sim.inject(0, UnknownOpcode())
            sim.inject(0, UnknownDispatch())
            await wait_until(lambda: broker.by_event("FUTURE_EVENT"), 5, "future event")
            n = len(broker.ids())
            await wait_until(lambda: len(broker.ids()) > n + 5, 5, "still flowing")
        assert len(sim.ledger.connections) == 1  # no reconnect for unknown things


async def test_s14_sharding_routes_guild_events_to_their_shard() -> None:
    async with simulator(shard_count=3, rate=50) as sim:
        async with running_worker(sim, (0, 1, 2)) as (worker, broker):
            await wait_until(lambda: len(broker.ids()) > 90, 15, "dispatches")
            sim.dispatch(0, "MESSAGE_CREATE", {"id": "dm-1", "channel_id": "5", "content": "dm"})
            await wait_until(lambda: "dm-1" in broker.ids(), 5, "DM on shard 0")
        for shard_id, event, _, data in broker.events:
            d = json.loads(data)
            if event == "MESSAGE_CREATE" and "guild_id" in d:
                assert (int(d["guild_id"]) >> 22) % 3 == shard_id
        assert [s for s, e, _, d in broker.events if e == "MESSAGE_CREATE" and b"dm-1" in d] == [0]


async def test_commands_route_by_guild_shard_and_broadcast() -> None:
    async with simulator(shard_count=2) as sim:
        async with running_worker(sim, (0, 1)) as (worker, broker):
            await wait_until(lambda: ready(worker, 0) and ready(worker, 1), 15, "ready")
            guild_on_1 = (1 << 22) * 7  # (7) % 2 == 1
            sends = [
                {
                    "guild_id": str(guild_on_1),
                    "packet": {
                        "op": 4,
                        "d": {
                            "guild_id": str(guild_on_1),
                            "channel_id": None,
                            "self_mute": False,
                            "self_deaf": False,
                        },
                    },
                },
                {
                    "shard_id": 0,
                    "packet": {
                        "op": 3,
                        "d": {"status": "idle", "afk": False, "since": None, "activities": []},
                    },
                },
                {
                    "packet": {
                        "op": 3,
                        "d": {"status": "dnd", "afk": False, "since": None, "activities": []},
                    }
                },
            ]
            for body in sends:
                worker.handle_command(json.dumps(body).encode(), lambda: None)
            await wait_until(lambda: len(sim.ledger.commands) == 4, 5, "commands")
        got = sorted((c.shard_id, c.op) for c in sim.ledger.commands)
        assert got == [(0, 3), (0, 3), (1, 3), (1, 4)]
