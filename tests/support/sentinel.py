"""A real Redis Sentinel set-up on loopback for the tests: two ``redis-server`` processes (a
master and its replica) and one or three Sentinels (``redis-server <conf> --sentinel``), each on
a free port, in a temporary directory that goes away with them.

Tuned to fail over fast: a master is down after :data:`DOWN_AFTER_MS` without answers, and a
failover may be retried after :data:`FAILOVER_TIMEOUT_MS`. :meth:`SentinelSet.start` returns once
every Sentinel names the master, knows the replica (and the other Sentinels), and the replica
is in sync; :meth:`SentinelSet.close` kills every process and removes every file.

Failovers, as an operator or a crash makes them: :meth:`SentinelSet.failover` (``SENTINEL
FAILOVER``: the old master is made a replica of the new one) and :meth:`SentinelSet.kill_master`
(``kill -9`` of the master's process; it stays dead). Both return the old master's port;
:meth:`SentinelSet.wait_new_master` waits until every Sentinel names another one.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from spectacles_gateway.config import Settings

from ..gwproc import free_port
from ..gwtest import t
from .redis import settings_for

__all__ = [
    "DOWN_AFTER_MS",
    "FAILOVER_TIMEOUT_MS",
    "SentinelSet",
    "sentinel_set",
    "sentinel_settings",
]

#: A master that does not answer for this long is down (Sentinel's default: 30 s).
DOWN_AFTER_MS = 400
#: How long a failover may take before another may be tried (Sentinel's default: 3 min).
FAILOVER_TIMEOUT_MS = 3000


@dataclass
class _Process:
    port: int
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port,
            socket_timeout=t(2),
            socket_connect_timeout=t(1),
            retry=Retry(NoBackoff(), 0),
        )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class SentinelSet:
    """Master, replica and Sentinels of the master named :attr:`name`; see the module."""

    def __init__(self, sentinels: int = 1) -> None:
        assert sentinels in (1, 3), "one Sentinel, or three (a quorum of two)"
        self.name = f"m{uuid.uuid4().hex[:8]}"
        self.count = sentinels
        self.dir = Path(tempfile.mkdtemp(prefix="sentinel-test-"))
        self.servers: dict[int, _Process] = {}  # port -> redis-server (data)
        self.sentinels: list[_Process] = []
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is needed for these tests"
        self.binary = binary

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        """``redis+sentinel://`` URL the gateway is given."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.name}"

    def master_port(self) -> int:
        """The master's port as the first Sentinel that answers names it."""
        for sentinel in (s for s in self.sentinels if s.alive):
            with contextlib.suppress(redis.RedisError), sentinel.client() as c:
                address = c.sentinel_get_master_addr_by_name(self.name)
                if address:
                    return int(address[1])
        raise AssertionError("no Sentinel names a master")

    def master(self) -> redis.Redis:
        """A plain client of the current master (the test's own reads)."""
        return self.servers[self.master_port()].client()

    def server(self, port: int) -> redis.Redis:
        return self.servers[port].client()

    # ------------------------------------------------------------------ life

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.dir / log).open("wb") as out:
            return subprocess.Popen(
                [self.binary, *args], stdout=out, stderr=subprocess.STDOUT, cwd=self.dir
            )

    def _server(self, replica_of: int | None) -> _Process:
        port = free_port()
        data = self.dir / f"data-{port}"
        data.mkdir()
        args = [
            "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(data), "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1",
        ]  # fmt: skip
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        node = _Process(port, self._spawn(args, f"redis-{port}.log"))
        self.servers[port] = node
        _until(lambda: _pings(node), 10, f"redis-server on {port} answers")
        return node

    def _sentinel(self, master: int) -> _Process:
        port = free_port()
        conf = self.dir / f"sentinel-{port}.conf"
        quorum = 1 if self.count == 1 else 2
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {master} {quorum}\n"
            f"sentinel down-after-milliseconds {self.name} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {self.name} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )
        node = _Process(port, self._spawn([str(conf), "--sentinel"], f"sentinel-{port}.log"))
        self.sentinels.append(node)
        return node

    def start(self) -> SentinelSet:
        master = self._server(None)
        replica = self._server(master.port)
        _until(lambda: _in_sync(master, replica), 10, "the replica in sync with the master")
        for _ in range(self.count):
            self._sentinel(master.port)
        _until(self._agreed, 20, "the Sentinels agree on master, replica and each other")
        return self

    def _agreed(self, master: int | None = None) -> bool:
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as c:
                    state = c.sentinel_master(self.name)
                    replicas = c.sentinel_slaves(self.name)
            except redis.RedisError:
                return False
            if master is not None and int(state["port"]) != master:
                return False
            if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                return False
            if int(state["num-other-sentinels"]) != self.count - 1:
                return False
            if master is None and not any(
                not r["is_sdown"] and r.get("master-link-status") == "ok" for r in replicas
            ):
                return False
        return True

    def failover(self) -> int:
        """``SENTINEL FAILOVER``: the replica becomes the master, the old master its replica.
        Returns the old master's port."""
        old = self.master_port()
        alive = next(s for s in self.sentinels if s.alive)
        with alive.client() as c:
            c.execute_command("SENTINEL", "FAILOVER", self.name)
        return old

    def kill_sentinel(self, index: int) -> None:
        """``kill -9`` of one Sentinel (it stays dead)."""
        node = self.sentinels[index]
        node.process.kill()
        node.process.wait()

    def kill_master(self) -> int:
        """``kill -9`` of the master's ``redis-server`` (it stays dead). Returns its port."""
        old = self.master_port()
        node = self.servers[old]
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        return old

    def pause_master(self) -> int:
        """``SIGSTOP`` of the master's ``redis-server`` (a VM stall, a long fork): the Sentinels
        fail it over; :meth:`resume` wakes it up, a master with stale data until they make it a
        replica. Returns its port."""
        old = self.master_port()
        self.servers[old].process.send_signal(signal.SIGSTOP)
        return old

    def resume(self, port: int) -> None:
        self.servers[port].process.send_signal(signal.SIGCONT)

    def wait_new_master(self, old: int, timeout: float = 20) -> int:
        """Wait until every Sentinel names a master other than ``old`` and that server says it
        is a master; returns its port."""

        def moved() -> bool:
            try:
                port = self.master_port()
            except AssertionError:
                return False
            if port == old or not _is_master(self.servers[port]):
                return False
            return self._agreed_on(port)

        _until(moved, timeout, f"a master other than {old}")
        return self.master_port()

    def _agreed_on(self, port: int) -> bool:
        for sentinel in (s for s in self.sentinels if s.alive):
            try:
                with sentinel.client() as c:
                    address = c.sentinel_get_master_addr_by_name(self.name)
            except redis.RedisError:
                return False
            if not address or int(address[1]) != port:
                return False
        return True

    def wait_replica_synced(self, timeout: float = 20) -> None:
        """After a ``SENTINEL FAILOVER``: the old master is the new one's replica, in sync."""
        master = self.servers[self.master_port()]
        others = [n for p, n in self.servers.items() if p != master.port and n.alive]
        _until(lambda: all(_in_sync(master, n) for n in others), timeout, "the replicas in sync")

    def close(self) -> None:
        for node in [*self.sentinels, *self.servers.values()]:
            if node.alive:
                node.process.send_signal(signal.SIGCONT)  # a paused one too
                node.process.kill()
            node.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        """The tail of every process's log (for a failing test's message)."""
        out = []
        for path in sorted(self.dir.glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(out)


def _until(check: object, timeout: float, what: str) -> None:
    assert callable(check)
    deadline = time.monotonic() + t(timeout)
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {t(timeout):.1f} s waiting for {what}")
        time.sleep(0.02)


def _pings(node: _Process) -> bool:
    assert node.alive, f"redis-server on {node.port} exited ({node.process.returncode})"
    try:
        with node.client() as c:
            return bool(c.ping())
    except redis.RedisError:
        return False


def _is_master(node: _Process) -> bool:
    try:
        with node.client() as c:
            return bytes(c.execute_command("ROLE")[0]) == b"master"
    except redis.RedisError:
        return False


def _in_sync(master: _Process, replica: _Process) -> bool:
    """The replica's link is up and it has every byte of the master's replication stream."""
    try:
        with master.client() as m, replica.client() as r:
            mine = m.info("replication")
            theirs = r.info("replication")
    except redis.RedisError:
        return False
    if theirs.get("master_link_status") != "up" or theirs.get("master_port") != master.port:
        return False
    return int(theirs.get("slave_repl_offset", -1)) >= int(mine.get("master_repl_offset", 0))


@contextlib.contextmanager
def sentinel_set(sentinels: int = 1) -> Iterator[SentinelSet]:
    """A started :class:`SentinelSet`, closed (processes killed, files removed) at the end."""
    group = SentinelSet(sentinels)
    try:
        yield group.start()
    except BaseException:
        print(group.logs())
        raise
    finally:
        group.close()


def sentinel_settings(group: SentinelSet, prefix: str) -> Settings:
    """Settings of a Redis shard store (and streams) reached through ``group``'s Sentinels, as
    the configuration would make them from ``REDIS_URL=<group.url>``."""
    settings = settings_for(prefix)
    redis_settings = msgspec.structs.replace(
        settings.redis,
        url=group.url,
        sentinels=tuple(("127.0.0.1", s.port) for s in group.sentinels),
        sentinel_master=group.name,
    )
    return msgspec.structs.replace(settings, redis=redis_settings)
