"""The reshard's decisions as pure functions, and its state machine driven with a fake clock and
a fake supervisor (no processes): when it starts, waits, switches, retires and rolls back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from spectacles_gateway.control import ShardStatus
from spectacles_gateway.discovery import GatewayBot
from spectacles_gateway.protocol.identify import SessionBudget
from supervisor.reshard import (
    Reshard,
    ReshardOptions,
    State,
    budget_wait,
    choose_target,
    round_up,
)
from supervisor.slots import WorkerSlot


@pytest.mark.parametrize(
    ("count", "mc", "expected"), [(5, 1, 5), (5, 2, 6), (16, 16, 16), (17, 16, 32), (1, 4, 4)]
)
def test_counts_are_rounded_up_to_a_multiple_of_max_concurrency(
    count: int, mc: int, expected: int
) -> None:
    assert round_up(count, mc) == expected


@pytest.mark.parametrize(
    ("reason", "running", "recommended", "requested", "mc", "expected"),
    [
        ("recommended", 4, 8, None, 1, 8),
        ("recommended", 4, 4, None, 1, None),  # nothing to do
        ("recommended", 8, 4, None, 1, None),  # never down by itself
        ("recommended", 16, 20, None, 16, 32),
        ("sharding_required", 4, 4, None, 2, 8),  # Discord says 4 but refused one: double
        ("sharding_required", 4, 6, None, 1, 6),  # a higher recommendation wins
        ("operator", 4, 4, 3, 1, 3),  # an operator may go down
        ("operator", 4, 8, 5, 2, 6),
        ("operator", 4, 8, 4, 1, None),
    ],
)
def test_the_target_count(
    reason: str,
    running: int,
    recommended: int,
    requested: int | None,
    mc: int,
    expected: int | None,
) -> None:
    got = choose_target(
        reason=reason, running=running, recommended=recommended, requested=requested, mc=mc
    )
    assert got == expected


def test_the_budget_keeps_its_reserve() -> None:
    budget = SessionBudget(total=1000, remaining=60, reset_at=100.0)
    assert budget_wait(budget, 8, 50, 10.0) is None  # 52 left after: fine
    assert budget_wait(budget, 16, 50, 10.0) == 90.0  # wait for the reset
    assert budget_wait(budget, 16, 50, 100.0) is None  # reset: the whole budget is back
    assert budget_wait(budget, 990, 50, 10.0) == math.inf  # never enough


# --------------------------------------------------------------------------------------------


@dataclass
class FakeHost:
    slots: list[WorkerSlot]
    generation: int = 0
    shard_count: int = 4
    stopping: str | None = None
    max_concurrency: int = 2
    budget: SessionBudget | None = field(default_factory=lambda: SessionBudget(1000, 1000, 0.0))
    sent: list[tuple[str, int, Any]] = field(default_factory=list)
    next_index: int = 10

    def spawn_generation(self, generation: int, shard_count: int) -> list[WorkerSlot]:
        slots = [
            WorkerSlot(self.next_index + i, tuple(range(i, shard_count, 2)), generation=generation)
            for i in range(2)
        ]
        self.next_index += 2
        for slot in slots:
            slot.proc = object()  # type: ignore[assignment]
            slot.broker = True
        self.slots += slots
        self.sent.append(("spawn", generation, shard_count))
        return slots

    def publish(self, slot: WorkerSlot) -> None:
        self.sent.append(("publish", slot.index, None))

    def commit_generation(self, generation: int, count: int, slots: Any, sessions: Any) -> None:
        self.generation, self.shard_count = generation, count
        self.sent.append(("commit", generation, count))

    def retire(self, slot: WorkerSlot, successor: tuple[int, int] | None) -> None:
        slot.retiring = True
        self.sent.append(("retire", slot.index, successor))

    def kill(self, slot: WorkerSlot) -> None:
        self.sent.append(("kill", slot.index, None))

    def cover(self, slot: WorkerSlot, shard_count: int, shards: frozenset[int]) -> None:
        self.sent.append(("cover", slot.index, sorted(shards)))

    def lock_reshard(self) -> bool:
        self.sent.append(("lock", 0, None))
        return True

    def unlock_reshard(self) -> None:
        self.sent.append(("unlock", 0, None))

    def switch_fleet(self, generation: int, shard_count: int) -> None:
        self.sent.append(("switch", generation, shard_count))

    def running_unsettled(self) -> str:
        down = [
            shard
            for slot in self.slots
            if slot.generation == self.generation and not slot.fatal
            for shard in slot.shards
            if (info := slot.status.get(shard)) is None or not (info.ready or info.fatal)
        ]
        return f"running shards {down} are reconnecting" if down else ""

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.sent]


def ready(slot: WorkerSlot, guilds: int = 0, fatal: int | None = None) -> None:
    slot.apply_status(
        {
            s: ShardStatus(
                "ready" if fatal is None else "stopped",
                fatal is None,
                1,
                40.0,
                None,
                fatal,
                guilds_pending=guilds,
            )
            for s in slot.shards
        }
    )


def make(
    *, recommended: int = 8, policy: str = "recommended", remaining: int = 1000, **host: Any
) -> tuple[Reshard, FakeHost]:
    old = [WorkerSlot(0, (0, 2)), WorkerSlot(1, (1, 3))]
    for slot in old:
        slot.proc = object()  # type: ignore[assignment]
        slot.broker = True
        ready(slot)
    fake = FakeHost(old, **host)
    bot = GatewayBot("wss://g", recommended, 1000, remaining, 5000.0, 2)
    options = ReshardOptions(
        policy=policy,
        check_interval=60.0,
        budget_reserve=50,
        timeout=30.0,
        overlap=1.0,
        check=lambda: bot,
    )
    # A fake clock: answers that arrive between ticks (the fleet's lock, a crash) read the
    # time of the last tick, as they would read the monotonic clock just after it.
    now = [0.0]
    reshard = Reshard(fake, options, clock=lambda: now[0])
    tick = reshard.tick

    def ticked(at: float) -> None:
        now[0] = at
        tick(at)

    reshard.tick = ticked  # type: ignore[method-assign]
    return reshard, fake


def check_now(reshard: Reshard, now: float) -> None:
    """Run a due check and collect its answer (the check thread is fast: wait for it)."""
    reshard.tick(now)
    for _ in range(200):
        with reshard._lock:
            if reshard._checked is not None:
                break
        import time

        time.sleep(0.005)
    reshard.tick(now)


def test_a_recommendation_above_the_running_count_goes_all_the_way() -> None:
    reshard, host = make()
    reshard.tick(30.0)
    assert host.kinds() == []  # not yet time to look
    check_now(reshard, 60.0)
    assert reshard.state is State.STARTING and ("spawn", 1, 8) in host.sent
    new = [s for s in host.slots if s.generation == 1]
    reshard.tick(61.0)
    assert reshard.status(61.0)["waiting"] == "0/8 new shards ready"
    for slot in new:
        ready(slot, guilds=3)
    reshard.tick(62.0)
    assert "guilds not received" in reshard.status(62.0)["waiting"]
    for slot in new:
        ready(slot)
    reshard.tick(63.0)
    assert reshard.state is State.SWITCHING and host.kinds().count("publish") == 2
    for slot in new:
        reshard.publishing(slot)
    assert reshard.state is State.OVERLAP
    reshard.tick(63.5)
    assert "commit" not in host.kinds()  # both publish for the overlap
    reshard.tick(reshard.next_deadline() or 0.0)
    assert ("commit", 1, 8) in host.sent
    assert [(k, i, s) for k, i, s in host.sent if k == "retire"] == [
        ("retire", 0, (1, 8)),
        ("retire", 1, (1, 8)),
    ]
    for slot in host.slots[:2]:
        slot.proc = None
    reshard.tick(70.0)
    assert reshard.state is State.IDLE and reshard.last is not None
    assert reshard.last["outcome"] == "done"


def test_a_new_shard_refused_rolls_back_and_waits_before_trying_again() -> None:
    reshard, host = make()
    check_now(reshard, 60.0)
    new = [s for s in host.slots if s.generation == 1]
    ready(new[0])
    ready(new[1], fatal=4010)
    reshard.tick(61.0)
    assert reshard.state is State.ROLLING_BACK
    assert {(k, i) for k, i, _ in host.sent if k == "retire"} == {("retire", s.index) for s in new}
    assert "commit" not in host.kinds() and "publish" not in host.kinds()
    for slot in new:
        slot.proc = None
    reshard.tick(62.0)
    assert reshard.state is State.IDLE and reshard.last["outcome"] == "rolled_back"  # type: ignore[index]
    reshard.tick(100.0)
    assert host.kinds().count("spawn") == 1  # not before RETRY_AFTER


def test_not_ready_in_time_rolls_back() -> None:
    reshard, host = make()
    check_now(reshard, 60.0)
    reshard.tick(60.0 + 4 * 5.15 + 29.0)
    assert reshard.state is State.STARTING
    reshard.tick(60.0 + 4 * 5.15 + 31.0)
    assert reshard.state is State.ROLLING_BACK


def test_a_crash_of_a_new_worker_rolls_back() -> None:
    reshard, host = make()
    check_now(reshard, 60.0)
    new = [s for s in host.slots if s.generation == 1]
    new[0].status[0] = ShardStatus("stopped", False, None, None, None, 4013)
    reshard.crashed(new[0], "exited with 78")
    assert reshard.state is State.ROLLING_BACK
    assert "4013" in reshard.last["detail"]  # type: ignore[index]


def test_a_small_budget_waits_and_says_so() -> None:
    reshard, host = make(remaining=55)  # Discord's answer sets the budget
    check_now(reshard, 60.0)
    assert reshard.state is State.WAITING_BUDGET
    assert "55 starts left" in reshard.status(60.0)["waiting"]
    assert "resets in 5000 s" in reshard.status(60.0)["waiting"]
    assert "spawn" not in host.kinds()
    reshard.tick(61.0)  # no new look at Discord before the check interval
    assert reshard.state is State.WAITING_BUDGET
    assert host.budget is not None
    host.budget.reset_at = 70.0  # the budget resets: all 1000 again
    reshard.tick(70.0)
    assert ("spawn", 1, 8) in host.sent


def test_the_switch_waits_for_running_shards_that_reconnect() -> None:
    reshard, host = make()
    check_now(reshard, 60.0)
    for slot in host.slots:
        if slot.generation == 1:
            ready(slot)
    host.slots[0].apply_status({0: ShardStatus("resuming", False, 1, None, "1006", None)})
    reshard.tick(61.0)
    assert reshard.state is State.STARTING
    assert "reconnecting" in reshard.status(61.0)["waiting"]


def test_running_shards_refused_for_good_are_covered_by_the_new_generation() -> None:
    reshard, host = make(recommended=4)
    host.slots[1].apply_status({1: ShardStatus("stopped", False, 9, None, "4011", 4011)})
    reshard.sharding_required(1)
    check_now(reshard, 1.0)
    assert ("spawn", 1, 8) in host.sent  # Discord still says 4: twice the count
    assert [(k, s) for k, _, s in host.sent if k == "cover"] == [("cover", [1])] * 2
    for slot in host.slots:
        if slot.generation == 1:
            ready(slot)
    reshard.tick(2.0)
    assert reshard.state is State.SWITCHING  # the refused shard does not hold the switch


def test_policies() -> None:
    reshard, host = make(policy="manual")
    check_now(reshard, 60.0)
    assert reshard.state is State.IDLE and reshard.recommended == 8  # looked, did not act
    reshard.sharding_required(1)
    assert reshard.state is State.IDLE and reshard._request is None
    assert reshard.request("operator") == "accepted"
    check_now(reshard, 61.0)
    assert ("spawn", 1, 8) in host.sent
    assert reshard.request("operator") == "a reshard is already running (starting)"
    off, off_host = make(policy="off")
    check_now(off, 60.0)
    assert off.recommended is None and off_host.kinds() == []  # never even asks Discord


# --------------------------------------------------------------------------------------------
# POST /reshard is answered on loopback only


def _own_address() -> str | None:
    """An address of this host that is not loopback (the route to a documentation network)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def test_posts_are_answered_on_loopback_only() -> None:
    import http.client
    import selectors

    from supervisor.httpd import HttpServer, Response, _loopback

    from .support.statusview import running

    assert _loopback(("127.0.0.1", 5)) and _loopback(("127.8.0.2", 5)) and _loopback(("::1", 5))
    assert not _loopback(("192.0.2.2", 5)) and not _loopback(("fd00::2", 5, 0, 0))
    asked: list[str] = []

    def post(path: str, query: str) -> Response:
        asked.append(f"{path}?{query}")
        return Response(202, b"accepted\n")

    selector = selectors.DefaultSelector()
    server = HttpServer(selector, "0.0.0.0", 0, lambda p, q: Response(200, b"ok\n"), post=post)

    def ask(host: str, method: str) -> int:
        conn = http.client.HTTPConnection(host, server.port, timeout=5)
        conn.request(method, "/reshard?to=8")
        code = conn.getresponse().status
        conn.close()
        return code

    with running(selector, server):
        assert ask("127.0.0.1", "POST") == 202
        assert ask("127.0.0.1", "PUT") == 405
        assert ask("127.0.0.1", "GET") == 200
        other = _own_address()
        if other is not None:
            assert ask(other, "POST") == 403
            assert ask(other, "GET") == 200  # reading stays open to the network
        assert asked == ["/reshard?to=8"]


def fleet_reshard(**kw: Any) -> tuple[Reshard, FakeHost]:
    reshard, host = make(**kw)
    reshard.options = msgspec.structs.replace(reshard.options, fleet=True)
    return reshard, host


def test_in_a_fleet_only_the_holder_of_the_lock_reshards() -> None:
    reshard, host = fleet_reshard()
    check_now(reshard, 60.0)
    assert reshard.state is State.LOCKING and host.kinds() == ["lock"]
    reshard.locked(False, "member-b")
    assert reshard.state is State.IDLE and "spawn" not in host.kinds()
    check_now(reshard, 121.0)  # someone else's turn: look again at the next check
    assert reshard.state is State.LOCKING
    reshard.locked(True, "")
    assert reshard.state is State.STARTING and ("spawn", 1, 8) in host.sent
    for slot in host.slots:
        if slot.generation == 1:
            ready(slot)
    reshard.tick(122.0)
    for slot in [s for s in host.slots if s.generation == 1]:
        reshard.publishing(slot)
    reshard.tick(reshard.next_deadline() or 0.0)
    # The agent leases the new shards and moves the pointer: the workers do not.
    assert ("switch", 1, 8) in host.sent
    assert {s for k, _, s in host.sent if k == "retire"} == {None}


def test_a_lock_that_never_answers_and_a_switch_elsewhere() -> None:
    reshard, host = fleet_reshard()
    check_now(reshard, 60.0)
    reshard.tick(60.0 + 11.0)
    assert reshard.state is State.IDLE and "unlock" in host.kinds()
    check_now(reshard, 121.0)
    reshard.locked(True, "")
    assert reshard.state is State.STARTING
    reshard.superseded()  # another member's reshard switched the fleet first
    assert reshard.state is State.ROLLING_BACK
