"""Workers writing to the supervisor's own stdout, each on its own, records whole and never
interleaved: the stdio broker's direct output (no relay through the supervisor).

A record goes through the relay at the cost of two wake-ups of the supervisor (its read and its
write; each costs about 140 µs of CPU on these virtual machines) and a copy, so with hundreds of
shards at a few events a second the relay cost more per event than the worker itself. Instead,
every worker writes its batches straight to the stdout the supervisor was given, under rules that
keep what a consumer reads exactly as the relay made it:

- **Its own handle.** A pipe or a terminal is opened again through ``/proc/self/fd/1``: a file
  description of the worker's own, so making it non-blocking changes nothing for the supervisor,
  the other workers or whoever started us. A regular file or ``/dev/null`` is written through
  the inherited descriptor (one shared offset, so workers never write over each other); such
  writes do not wait for a reader.
- **One writer at a time.** A write happens under an exclusive ``flock`` on a file the
  supervisor created and every worker opened for itself (locks belong to an open file, so each
  needs its own). It is held for one write, or while a record that was cut waits to be finished.
- **Whole records.** Into a pipe, a worker writes only the records that fit in the room the pipe
  has left (its size, less what it holds and two pages of slack), so the kernel takes the write
  whole and a worker killed at any moment leaves no half record behind. Records that do not fit
  wait (their shards stop reading while the worker's buffer is full). Only a record larger than
  the whole pipe (or any record to a terminal, whose room cannot be known) may be written in
  pieces; the lock is then kept until its end, and a byte in the shared file says "a record is
  being cut". Should its writer die before the end, the next writer ends the cut line with a
  newline, so the stream goes on with whole records (the cut one was never confirmed: a resume
  sends it again).

An event counts as confirmed once the whole of its record is in the pipe or file.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import struct
import termios
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["DirectWriter", "SharedStdout", "fitting"]

from ..pipes import enlarge_pipe

_PAGE = 4096
#: What we ask the kernel to make stdout's pipe hold (capped by /proc/sys/fs/pipe-max-size).
PIPE_SIZE = 1 << 20
#: Seconds between two tries while the lock is taken or the pipe has too little room.
RETRY = 0.005
#: Bytes waiting in a worker before its shards pause (and when they read again).
HIGH_WATER = 1 << 20
LOW_WATER = HIGH_WATER // 4

_CUT = 0  # the shared byte: 1 while a record is written in pieces


class Scheduler(Protocol):
    """What :class:`DirectWriter` needs of an event loop (asyncio's has it)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any: ...
    def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_writer(self, fd: int) -> bool: ...


def fitting(sizes: Iterable[int], room: int) -> int:
    """How many of the first records (by size) fit in ``room`` bytes."""
    total = 0
    count = 0
    for size in sizes:
        total += size
        if total > room:
            break
        count += 1
    return count


class SharedStdout:
    """This process's handle on the shared stdout, and on the lock that the writers share."""

    def __init__(self, stdout_fd: int, lock_fd: int) -> None:
        mode = os.fstat(stdout_fd).st_mode
        self.is_pipe = stat.S_ISFIFO(mode)
        self.pollable = self.is_pipe or (stat.S_ISCHR(mode) and os.isatty(stdout_fd))
        if self.pollable:
            flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC
            self.fd = os.open(f"/proc/self/fd/{stdout_fd}", flags)
            os.set_blocking(self.fd, False)
        else:
            self.fd = os.dup(stdout_fd)
        self.capacity = 0
        if self.is_pipe:  # best effort: someone else's pipe
            enlarge_pipe(self.fd, PIPE_SIZE)
            self.capacity = fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ)
        self.lock_fd = os.open(f"/proc/self/fd/{lock_fd}", os.O_RDWR | os.O_CLOEXEC)
        self.state = mmap.mmap(self.lock_fd, _PAGE)
        self.locked = False

    def room(self) -> int:
        """Bytes a write into the pipe is sure to find room for (pipes only)."""
        queued: int = struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        # The pipe is a ring of pages; a partly read page still takes a whole one.
        return self.capacity - (queued // _PAGE + 2) * _PAGE

    def lock(self) -> bool:
        if not self.locked:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self.locked = True
        return True

    def unlock(self) -> None:
        if self.locked:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            self.locked = False

    @property
    def cut(self) -> bool:
        return self.state[_CUT] == 1

    @cut.setter
    def cut(self, value: bool) -> None:
        self.state[_CUT] = 1 if value else 0

    def close(self) -> None:
        self.unlock()
        with contextlib.suppress(BufferError):
            self.state.close()
        for fd in (self.fd, self.lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class DirectWriter:
    """Batches of whole records to the shared stdout, in order, through the owner's event loop.

    ``written(offset)``: every byte up to ``offset`` (counted from our first) is out;
    ``paused(flag)``: our buffer went over (or back under) its high-water mark;
    ``lost(exc)``: stdout is gone for good.
    """

    def __init__(
        self,
        out: SharedStdout,
        loop: Scheduler,
        *,
        repair: bytes | None,
        written: Callable[[int], None],
        paused: Callable[[bool], None],
        lost: Callable[[OSError], None],
    ) -> None:
        self.out = out
        self.loop = loop
        self.repair = repair  # what ends a cut record (None: the format cannot)
        self._written_cb = written
        self._paused_cb = paused
        self._lost_cb = lost
        self._records: deque[bytes] = deque()
        self.pending = 0  # bytes waiting in _records and _rest
        self.offset = 0  # bytes out so far
        self._rest: memoryview | None = None  # the end of a record being cut
        self._waiting = False  # a retry or writability callback is set
        self._writer_set = False
        self._paused = False
        self.closed = False

    def write(self, records: list[bytes]) -> None:
        if self.closed:
            return
        self._records.extend(records)
        self.pending += sum(map(len, records))
        if not self._waiting:
            self._pump()
        else:  # still waiting for room: hold the shards back once we hold too much
            self._check_water()

    @property
    def idle(self) -> bool:
        return not self.pending

    def _pump(self) -> None:
        self._waiting = False
        if self._writer_set:
            self.loop.remove_writer(self.out.fd)
            self._writer_set = False
        try:
            self._write_what_fits()
        except OSError as exc:  # EPIPE and friends: the reader is gone for good
            self._give_up(exc)
            return
        self._check_water()

    def _check_water(self) -> None:
        if self.pending > HIGH_WATER and not self._paused:
            self._paused = True
            self._paused_cb(True)
        elif self._paused and self.pending <= LOW_WATER:
            self._paused = False
            self._paused_cb(False)

    def _write_what_fits(self) -> None:
        out = self.out
        while self.pending and not self.closed:
            if not out.lock():
                self._retry()
                return
            if self._rest is None and out.cut and not self._finish_cut_by_another():
                return
            if self._rest is not None:
                if not self._continue_cut():
                    return
                continue
            records = self._records
            # A file takes everything; a terminal takes what it takes (its room is unknown).
            count = fitting(map(len, records), out.room()) if out.is_pipe else len(records)
            if count == 0:
                if len(records[0]) + 2 * _PAGE <= out.capacity:
                    out.unlock()  # it fits once the reader made room: let others write
                    self._retry()
                    return
                count = 1  # larger than the pipe: written in pieces
            batch = [records.popleft() for _ in range(count)]
            data = batch[0] if count == 1 else b"".join(batch)
            n = self._os_write(data)
            if n < len(data):  # the rest of the first record waits (under our lock)
                out.cut = n > 0
                self._rest = memoryview(data)[n:]
                self._advance(n)
                if not self._continue_cut():
                    return
                continue
            self._advance(n)
        out.unlock()

    def _continue_cut(self) -> bool:
        """Write more of the record being cut; True once it is whole (lock kept until then)."""
        rest = self._rest
        assert rest is not None
        n = self._os_write(rest)
        self._advance(n)
        if n and not self.out.cut:
            self.out.cut = True  # from now on the record is cut
        if n < len(rest):
            self._rest = rest[n:]
            self._wait_writable()
            return False
        self._rest = None
        self.out.cut = False
        return True

    def _finish_cut_by_another(self) -> bool:
        """A writer died in the middle of a record: end that line (or say we cannot)."""
        if self.repair is not None and self._os_write(self.repair) < len(self.repair):
            self._wait_writable()
            return False
        self.out.cut = False
        return True

    def _os_write(self, data: bytes | memoryview) -> int:
        if not self.out.pollable:
            view = memoryview(data)
            total = 0
            while total < len(view):
                total += os.write(self.out.fd, view[total:])
            return total
        try:
            return os.write(self.out.fd, data)
        except (BlockingIOError, InterruptedError):
            return 0

    def _advance(self, n: int) -> None:
        if n:
            self.pending -= n
            self.offset += n
            self._written_cb(self.offset)

    def _retry(self) -> None:
        self._waiting = True
        self.loop.call_later(RETRY, self._pump)

    def _wait_writable(self) -> None:
        self._waiting = True
        self._writer_set = True
        self.loop.add_writer(self.out.fd, self._pump)

    def _give_up(self, exc: OSError) -> None:
        self.closed = True
        self._records.clear()
        self.pending = 0
        self._rest = None
        self.out.unlock()
        self._lost_cb(exc)

    def close(self) -> None:
        self.closed = True
        if self._writer_set:
            self.loop.remove_writer(self.out.fd)
            self._writer_set = False
        self.out.close()
