"""Pipe sizes: the stdio path between a worker and the supervisor (used by both sides)."""

from __future__ import annotations

__all__ = ["enlarge_pipe"]


def enlarge_pipe(fd: int, size: int) -> int | None:
    """Ask the kernel to let the pipe ``fd`` hold ``size`` bytes (Linux ``F_SETPIPE_SZ``, capped
    for unprivileged processes by ``/proc/sys/fs/pipe-max-size``). Best effort: the size it
    got, or None where pipes cannot be resized (another system, not a pipe, over the cap)."""
    try:
        import fcntl

        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):
        return None
