"""Open files: how many a process needs for its shards, and the soft limit raised to the hard one.

Every shard holds one socket, so a worker of 2,500 shards needs more than the usual soft limit
of 1,024 open files. Both the supervisor and each worker raise their soft limit to the hard
limit at start (nothing else can raise it: the hard limit is the administrator's, ``ulimit -Hn``,
systemd's ``LimitNOFILE=``, Docker's ``--ulimit nofile=``); when even the hard limit is too low
for the shards planned, the supervisor stops at once with exit code 78 and says so, instead of
running shards that fail to connect with EMFILE.

:func:`worker_need`, :func:`supervisor_need` and :func:`shortfall` are pure; :func:`raise_soft`
reads and sets the process's limit. Dependency-free (the supervisor imports it).
"""

from __future__ import annotations

import resource
from typing import NamedTuple

__all__ = [
    "SUPERVISOR_RESERVE",
    "WORKER_RESERVE",
    "OpenFiles",
    "raise_soft",
    "shortfall",
    "supervisor_need",
    "worker_need",
]

#: A worker's descriptors besides its shards' sockets: standard streams, the control socket,
#: the event loop's epoll and wake-up pipe, the broker's and the store's connections, a few
#: reconnects overlapping their old socket, and room to spare.
WORKER_RESERVE = 64
#: The supervisor's own: standard streams, selector, signal pipe, HTTP listener, sd-notify,
#: the fleet agent's channel, a short-lived child's pipes, logs.
SUPERVISOR_RESERVE = 32
#: Per worker, in the supervisor: its control socket, its output pipe (stdio relay), and the
#: same again while it is being replaced (a rolling restart overlaps two).
PER_WORKER = 4


def worker_need(shards: int) -> int:
    """Open files a worker running ``shards`` shards needs."""
    return max(0, shards) + WORKER_RESERVE


def supervisor_need(workers: int, http_clients: int) -> int:
    """Open files the supervisor needs for ``workers`` workers and ``http_clients`` HTTP
    clients at once (``PROMETHEUS_MAX_CLIENTS``, 0 without the listener)."""
    return SUPERVISOR_RESERVE + PER_WORKER * max(0, workers) + max(0, http_clients)


class OpenFiles(NamedTuple):
    """The open-file limit of this process: before and after :func:`raise_soft`."""

    before: int
    soft: int
    hard: int


def _finite(value: int) -> int:
    return 1 << 62 if value == resource.RLIM_INFINITY else value


def raise_soft() -> OpenFiles:
    """Raise this process's open-file soft limit to its hard limit (as far as the kernel allows:
    an unlimited hard limit stops at ``fs.nr_open``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return OpenFiles(soft, _finite(soft), _finite(hard))
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return OpenFiles(soft, _finite(soft), _finite(hard))
    return OpenFiles(soft, _finite(target), _finite(hard))


def shortfall(need: int, limit: int, what: str) -> str | None:
    """None when ``limit`` open files are enough for ``need``; otherwise the one line to stop
    with, naming the cause and the remedies."""
    if limit >= need:
        return None
    return (
        f"the open-file limit ({limit}, hard) is too low for {what}: it needs at least {need} "
        "(one socket per shard and a few more); raise the hard limit (ulimit -Hn, systemd "
        "LimitNOFILE=, docker --ulimit nofile=) or run fewer shards per worker "
        "(SUPERVISOR_WORKERS / --workers)"
    )
