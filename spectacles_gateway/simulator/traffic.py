"""Generated traffic: ``rate`` dispatches per second on every session, each at its own phase.

Every attached session has a :class:`Stream`: a next-due time that starts at a random phase
in its first interval and then advances by ``1 / rate`` with ``jitter`` (a uniform share of
the interval either way), so shards are never in step. At each due time the stream's session
gets one event, in a websocket message and a write of its own, on a wake-up of its own; a
stream that fell behind is handed over again at once rather than batched (and one that fell
more than a second behind skips ahead).

The due times are kept by a :class:`Pacer` thread, because the event loop cannot wake
precisely: asyncio's epoll selector and libuv (uvloop) both round timer waits to whole
milliseconds, which caps a timer chain at 1,000 wake-ups a second and would batch a paced
8,000/s stream eight to a write. The thread sleeps until the earliest due time and hands the
due streams to the loop with ``call_soon_threadsafe``; everything else (generating, compressing
and writing) stays on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.corpus import Corpus, corpus
from spectacles_gateway.simulator.ledger import GENERATED
from spectacles_gateway.simulator.sessions import Session, SessionTable

logger = logging.getLogger(__name__)

SLACK: Final = 50e-6
"""Streams due within this of each other are handed to the loop together."""
MAX_BACKLOG: Final = 1.0
"""A stream more than this many seconds behind skips ahead instead of catching up."""


class Pacer:
    """A thread that calls ``fire(keys)`` on the loop when the keys' due times come."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[list[Any]], None]) -> None:
        self._loop = loop
        self._fire = fire
        self._heap: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()  # guards the heap and _sleeping_until
        self._wake = threading.Lock()  # released to wake the thread before its timeout
        self._wake.acquire()
        self._sleeping_until = float("inf")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="simulator pacer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._poke()
        self._thread.join(5)

    def schedule(self, when: float, key: Any) -> None:
        """Hand ``key`` to ``fire`` at ``when`` (``time.monotonic()`` seconds)."""
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._order), key))
            earlier = when < self._sleeping_until
        if earlier:
            self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(RuntimeError):  # already released: the thread is awake
            self._wake.release()

    def _run(self) -> None:
        heap, lock, monotonic = self._heap, self._lock, time.monotonic
        while not self._stopping:
            with lock:
                horizon = monotonic() + SLACK
                keys = []
                while heap and heap[0][0] <= horizon:
                    keys.append(heapq.heappop(heap)[2])
                self._sleeping_until = heap[0][0] if heap else float("inf")
            if keys:
                try:
                    self._loop.call_soon_threadsafe(self._fire, keys)
                except RuntimeError:  # the loop is closed: nothing left to pace
                    return
                continue
            wait = self._sleeping_until - monotonic()
            if wait == float("inf"):
                self._wake.acquire()
            elif wait > 0:
                self._wake.acquire(timeout=wait)
            with lock:
                self._sleeping_until = -1.0  # awake: schedule() need not poke


@dataclass(slots=True)
class Stream:
    """When the next event of one source (a session, or a guild) is due."""

    session: Session | None
    guild_id: int
    interval: float
    jitter: float
    rng: random.Random
    due: float = 0.0

    def advance(self) -> None:
        spread = self.jitter * (2.0 * self.rng.random() - 1.0) if self.jitter else 0.0
        self.due += self.interval * (1.0 + spread)


@dataclass
class TrafficStats:
    """What the generator did, to tell whether it kept up."""

    wakeups: int = 0
    """Times the pacer handed due streams to the loop."""
    writes: int = 0
    """Writes of generated events (one per stream and wake-up)."""
    events: int = 0
    late_writes: int = 0
    """Writes made more than one interval after the event was due (the generator was
    behind: the client may read those events two or more at a time)."""
    skipped: int = 0
    """Events not generated because a stream fell more than a second behind."""
    max_late: float = 0.0
    """Largest delay between an event's due time and its write, in seconds."""
    total_late: float = 0.0
    started: float = 0.0

    def as_dict(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "wakeups": self.wakeups,
            "writes": self.writes,
            "events": self.events,
            "events_per_second": round(self.events / elapsed, 1),
            "late_writes": self.late_writes,
            "skipped": self.skipped,
            "max_late_ms": round(self.max_late * 1000, 3),
            "mean_late_us": round(self.total_late / max(self.writes, 1) * 1e6, 1),
            "seconds": round(elapsed, 3),
        }


class Traffic:
    """Generates ``rate`` events per second on every attached session, and ``guild_rate``
    per guild of a growing bot (``emit_guild`` delivers them)."""

    def __init__(
        self, config: SimulatorConfig, table: SessionTable, take_ids: Callable[[int], int]
    ) -> None:
        self.config = config
        self.table = table
        self.rate = config.rate
        self.guild_rate = config.guild_rate
        self.emit_guild: Callable[[int], None] = lambda guild_id: None
        self._guilds: dict[int, Stream] = {}
        self.stats = TrafficStats()
        self._take_ids = take_ids
        self._pacer: Pacer | None = None
        self._streams: dict[str, Stream] = {}
        self._sizes = [s for s, _ in config.size_mix]
        self._weights = [w for _, w in config.size_mix]
        self._rng = random.Random(config.seed)
        self._attaches = 0
        self.corpus: Corpus | None = (
            corpus(config.seed, config.corpus_pool) if config.profile == "realistic" else None
        )
        table.corpus = self.corpus
        table.on_attach.append(self._attached)

    def start(self) -> None:
        self._pacer = Pacer(asyncio.get_running_loop(), self._fire)
        self._pacer.start()
        self.stats.started = time.monotonic()
        self.restart()

    def stop(self) -> None:
        if self._pacer is not None:
            self._pacer.stop()
            self._pacer = None

    @property
    def running(self) -> bool:
        return not self.table.paused and self._pacer is not None

    @property
    def active(self) -> bool:
        return self.rate > 0 and self.running

    def set_rate(self, rate: float) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self.rate = rate
        self.restart()

    def set_guild_rate(self, rate: float) -> None:
        if rate < 0:
            raise ValueError("guild_rate must be >= 0")
        self.guild_rate = rate
        self.restart()

    def restart(self) -> None:
        """New phases for every attached session and guild (after a rate change or a
        pause)."""
        self._streams.clear()
        for session in list(self.table.attached.values()):
            self._attached(session)
        for guild_id in list(self._guilds):
            self.start_guild(guild_id)

    def start_guild(self, guild_id: int) -> None:
        """Start (or restart, at a new phase) the stream of ``guild_id``."""
        self._guilds[guild_id] = stream = Stream(None, guild_id, 0.0, 0.0, random.Random())
        if self.guild_rate <= 0 or not self.running:
            return
        assert self._pacer is not None
        stream.interval = 1.0 / self.guild_rate
        stream.jitter = self.config.jitter
        stream.rng = random.Random(hash((self.config.seed, guild_id, len(self._guilds))))
        stream.due = time.monotonic() + stream.rng.random() * stream.interval
        self._pacer.schedule(stream.due, stream)

    def _attached(self, session: Session) -> None:
        if not self.active:
            return
        assert self._pacer is not None
        interval = 1.0 / self.rate
        self._attaches += 1
        rng = random.Random(hash((self.config.seed, session.shard_id, self._attaches)))
        stream = Stream(session, 0, interval, self.config.jitter, rng)
        stream.due = time.monotonic() + rng.random() * interval
        self._streams[session.session_id] = stream
        self._pacer.schedule(stream.due, stream)

    def _fire(self, due: list[Stream]) -> None:
        if not self.running:
            return
        assert self._pacer is not None
        stats = self.stats
        stats.wakeups += 1
        now = time.monotonic()
        for stream in due:
            session = stream.session
            if session is None:
                if self._guilds.get(stream.guild_id) is not stream:
                    continue  # restarted: this stream is over
            elif self._streams.get(session.session_id) is not stream or session.conn is None:
                continue  # detached or restarted: this stream is over
            late = now - stream.due
            stats.max_late = max(stats.max_late, late)
            stats.total_late += late
            stats.late_writes += late > stream.interval
            if late > MAX_BACKLOG:
                behind = int(late / stream.interval)
                stats.skipped += behind
                stream.due += behind * stream.interval
            # One event per wake-up and write, even when late: the next one is already due,
            # so the pacer hands it over again at once, in a write of its own.
            if session is None:
                self.emit_guild(stream.guild_id)
            else:
                self.generate(session, 1)
            stats.writes += 1
            stats.events += 1
            stream.advance()
            self._pacer.schedule(stream.due, stream)

    def generate(self, session: Session, count: int) -> None:
        """``count`` events of the profile for ``session``, written in one write."""
        log = session.log
        first = self._take_ids(count)
        if self.corpus is not None:
            pick, event = self.corpus.pick, self.corpus.event
            for uid in range(first, first + count):
                index = pick(session.intents)
                log.append(event(index), uid, -index - 1)
        elif len(self._sizes) == 1:
            log.extend_generated(first, count, self._sizes[0])
        else:
            sizes = self._rng.choices(self._sizes, self._weights, k=count)
            for i, size in enumerate(sizes):
                log.append(GENERATED, first + i, size)
        self.table.flush(session)
