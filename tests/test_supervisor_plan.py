"""Pure parts of the supervisor: worker counts, shard groups, the identify pacer, exits."""

from __future__ import annotations

import os
import signal

import pytest

from spectacles_gateway.protocol.identify import IdentifyPacer as IdentifyScheduler
from spectacles_gateway.protocol.identify import SessionBudget
from supervisor.lifecycle import describe_exit
from supervisor.plan import describe_ids, group_shards, worker_count


@pytest.mark.parametrize(
    ("shards", "kw", "expected"),
    [
        (16, {"workers": 4}, 4),
        (16, {"shards_per_worker": 5}, 4),
        (16, {"cpus": 2}, 2),
        (3, {"workers": 8}, 3),  # never more workers than shards
        (1, {"cpus": 32}, 1),
        (0, {"workers": 4}, 0),
        (10, {"workers": 2, "shards_per_worker": 1}, 2),  # workers wins
    ],
)
def test_worker_count(shards: int, kw: dict[str, int], expected: int) -> None:
    assert worker_count(shards, **kw) == expected


def test_groups_spread_each_identify_window_across_workers() -> None:
    groups = group_shards(range(16), 4, max_concurrency=4)
    assert sorted(s for g in groups for s in g) == list(range(16))
    for window in range(4):  # shards that identify together sit on different workers
        shards = set(range(window * 4, window * 4 + 4))
        assert [len(shards & set(g)) for g in groups] == [1, 1, 1, 1]
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


@pytest.mark.parametrize(
    ("ids", "workers", "mc", "expected"),
    [
        ([0, 1, 2, 3], 2, 1, [(0, 2), (1, 3)]),
        ([5, 3, 3, 9], 2, 1, [(3, 9), (5,)]),
        ([0, 1, 2], 5, 1, [(0,), (1,), (2,)]),
        (list(range(8)), 2, 4, [(0, 2, 4, 6), (1, 3, 5, 7)]),
    ],
)
def test_group_table(
    ids: list[int], workers: int, mc: int, expected: list[tuple[int, ...]]
) -> None:
    assert group_shards(ids, workers, mc) == expected


def test_group_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="worker"):
        group_shards([1], 0)


@pytest.mark.parametrize(
    ("ids", "text"),
    [([0, 1, 2, 3], "0-3"), ([0, 2, 4, 5, 6], "0,2,4-6"), ([7], "7"), ([], ""), ([3, 1, 2], "1-3")],
)
def test_describe_ids(ids: list[int], text: str) -> None:
    assert describe_ids(ids) == text


def drive(
    scheduler: IdentifyScheduler, shards: list[int], latency: float = 0.1
) -> dict[int, float]:
    """Request every shard at t=0; each granted shard sends its IDENTIFY ``latency`` later."""
    for shard in shards:
        scheduler.request(shard)
    now = 0.0
    sent: dict[int, float] = {}
    in_flight: list[tuple[float, int]] = []
    while len(sent) < len(shards) and now < 10_000:
        for shard in scheduler.grants(now):
            in_flight.append((now + latency, shard))
        in_flight.sort()
        due = [(t, s) for t, s in in_flight if t <= now]
        for t, s in due:
            in_flight.remove((t, s))
            sent[s] = t
            scheduler.release(s, t)
        candidates = [t for t, _ in in_flight]
        nxt = scheduler.next_time(now)
        if nxt is not None and nxt > now:
            candidates.append(nxt)
        if not candidates:
            break
        now = max(now, min(candidates)) if min(candidates) > now else now + 0.001
    return sent


def test_scheduler_buckets_windows_and_order() -> None:
    scheduler = IdentifyScheduler(2, window=5.0)
    sent = drive(scheduler, [3, 2, 1, 0])
    assert sent[0] == pytest.approx(0.1) and sent[1] == pytest.approx(0.1)  # together
    assert sent[2] - sent[0] >= 5.0 and sent[3] - sent[1] >= 5.0
    assert sent[2] == pytest.approx(5.2)  # bucket 0: the lowest waiting id first, 5 s after
    assert scheduler.identified == 4


def test_scheduler_sixteen_shards_four_buckets_takes_three_windows() -> None:
    scheduler = IdentifyScheduler(4, window=5.15)
    sent = drive(scheduler, list(range(16)))
    for shard in range(4, 16):
        assert sent[shard] - sent[shard - 4] >= 5.15
    assert max(sent.values()) == pytest.approx(0.1 + 3 * (5.15 + 0.1))  # window + latency


def test_scheduler_cancel_frees_the_bucket_and_unsent_release_keeps_the_window() -> None:
    scheduler = IdentifyScheduler(1, window=5.0)
    scheduler.request(0)
    scheduler.request(1)
    assert scheduler.grants(0.0) == [0]
    assert scheduler.grants(0.0) == []  # one holder per bucket
    scheduler.cancel(0)  # the worker died holding it
    assert scheduler.grants(0.0) == [1]
    scheduler.release(1, None)  # connection failed before IDENTIFY: no window spent
    scheduler.request(1)
    assert scheduler.grants(0.1) == [1]
    scheduler.release(1, 0.2)
    scheduler.request(2)
    assert scheduler.grants(5.1) == []
    assert scheduler.next_time(5.1) == pytest.approx(5.2)
    assert scheduler.grants(5.2) == [2]


@pytest.mark.parametrize(
    ("max_concurrency", "shards", "left"),
    [
        (16, range(2500), 156 * 5.0),  # 2,500 shards at 16: 157 windows, Discord's minimum
        (512, range(512), 0.0),  # one window: all at once
        (16, range(0, 512, 16), 31 * 5.0),  # a subset in one bucket waits for that bucket alone
        (4, [0, 1, 2, 3, 4], 5.0),
        (4, [], 0.0),
    ],
)
def test_seconds_left_at_discords_pace(max_concurrency: int, shards: range, left: float) -> None:
    scheduler = IdentifyScheduler(max_concurrency, window=5.0)
    for shard in shards:
        scheduler.request(shard)
    assert scheduler.seconds_left(0.0) == pytest.approx(left)


def test_seconds_left_as_identifies_go_out() -> None:
    scheduler = IdentifyScheduler(2, window=5.0)
    for shard in range(6):  # three windows of two
        scheduler.request(shard)
    assert scheduler.seconds_left(0.0) == pytest.approx(10.0)
    assert scheduler.grants(0.0) == [0, 1]
    assert scheduler.seconds_left(0.0) == pytest.approx(10.0)  # permits out: a window each
    scheduler.release(0, 0.5)
    scheduler.release(1, 0.5)
    assert scheduler.seconds_left(1.0) == pytest.approx(9.5)  # 5.5, then 10.5
    budget = SessionBudget(total=1000, remaining=1, reset_at=600.0)
    short = IdentifyScheduler(2, window=5.0, budget=budget)
    short.request(0)
    short.request(1)
    assert short.seconds_left(0.0) == pytest.approx(600.0)  # one start left for two shards


def test_scheduler_never_runs_the_session_budget_out() -> None:
    budget = SessionBudget(total=1000, remaining=2, reset_at=100.0)
    scheduler = IdentifyScheduler(4, window=5.0, budget=budget)
    for shard in range(3):
        scheduler.request(shard)
    # Two session starts left: two permits, never three (a permit out is a start to come).
    assert scheduler.grants(0.0) == [0, 1]
    assert scheduler.next_time(0.0) is None  # the permits out decide
    scheduler.release(0, 0.1)
    scheduler.release(1, None)  # not used: the start is still there
    scheduler.request(1)
    assert scheduler.grants(1.0) == [1]  # one left: the lowest shard id gets it
    scheduler.release(1, 1.1)
    assert budget.remaining == 0
    assert scheduler.grants(2.0) == []
    assert scheduler.next_time(2.0) == pytest.approx(100.0)
    assert scheduler.grants(100.0) == [2]  # the budget is back


def test_describe_exit() -> None:
    kill9 = signal.SIGKILL  # encode a "killed by signal" wait status
    assert describe_exit(kill9, killed_by_us=False)[0] == "sigkill"
    assert "OOM" in describe_exit(kill9, killed_by_us=False)[1]
    assert describe_exit(kill9, killed_by_us=True)[1] == "killed by SIGKILL"
    assert describe_exit(signal.SIGSEGV, killed_by_us=False)[0] == "sigsegv"
    assert describe_exit(78 << 8, killed_by_us=False)[0] == "fatal"
    assert describe_exit(0, killed_by_us=False)[0] == "exit"
    assert describe_exit(3 << 8, killed_by_us=False) == ("exit_3", "exited with status 3")
    assert os.WIFEXITED(78 << 8)
