"""The stdio broker: events to stdout (the supervisor reads stdin and delivers commands).

Output formats: ``json`` (one object per line, so ``| jq`` works) or ``msgpack`` (the seed's
back-to-back maps ``{"event", "data"}``). Every batch is written with one write through a
non-blocking pipe transport, so whole messages never interleave and a slow reader pushes back on
the shards (they stop reading their sockets) instead of blocking the event loop. Logs go to stderr.

When is an event confirmed (its seq may be saved, so a resume will not replay it)?
- ``confirm_on_relay`` (a worker under the supervisor): once the supervisor has written it to
  the real stdout and said so (:meth:`StdioBroker.relayed`, with the byte offset of this worker's
  output that reached stdout). A supervisor killed with events still in its relay buffer loses
  nothing: those events were never confirmed.
- ``direct_lock`` (a worker under the supervisor whose stdout the workers share, see
  :mod:`.sharedout`): once the whole of its record is in the shared stdout.
- otherwise: once the pipe or file took it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections import deque

from .. import metrics
from ..pipes import enlarge_pipe
from .base import Broker, Progress
from .sharedout import DirectWriter, SharedStdout
from .wire import json_line, msgpack_event_map

__all__ = ["StdioBroker"]

log = logging.getLogger(__name__)

#: How often a worker whose pipe is full checks whether its last write left our buffer.
DRAIN_CHECK = 0.02
#: How long a stopping worker waits for the supervisor to report its last output written.
RELAY_WAIT = 2.0
#: What we ask the kernel to make a stdout pipe hold (capped by /proc/sys/fs/pipe-max-size).
PIPE_SIZE = 1 << 20


class _Writer(asyncio.Protocol):
    def __init__(self, broker: StdioBroker) -> None:
        self.broker = broker

    def pause_writing(self) -> None:
        self.broker._writer_paused(True)

    def resume_writing(self) -> None:
        self.broker._writer_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.broker._writer_lost(exc)


class StdioBroker(Broker):
    name = "stdio"

    def __init__(
        self,
        fmt: str = "json",
        *,
        stdout_fd: int = 1,
        confirm_on_relay: bool = False,
        direct_lock: int | None = None,
        generation: int = 0,
    ) -> None:
        super().__init__()
        self.generation = generation
        if fmt not in ("json", "msgpack"):
            raise ValueError(f"unknown stdio format {fmt!r}")
        self.format = fmt
        self.confirm_on_relay = confirm_on_relay
        self._direct_lock = direct_lock  # the workers' shared lock file (direct output)
        self._direct: DirectWriter | None = None
        self._flushing = False
        self._stdout_fd = stdout_fd
        self._buffer: list[bytes] = []
        self._last: dict[int, tuple[str, int]] = {}  # per shard, the last event of the batch
        self._transport: asyncio.WriteTransport | None = None
        self._blocking_fd: int | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._held: dict[int, tuple[str, int]] = {}  # written, waiting to leave our buffer
        self._offset = 0  # bytes written so far
        self._relayed = 0  # ... and reported written to stdout by the supervisor
        self._relay_waiter: asyncio.Event | None = None
        self._unrelayed: deque[tuple[int, dict[int, tuple[str, int]]]] = deque()
        self.published = 0

    # ------------------------------------------------------------------ output

    def publish(
        self, shard_id: int, event: str, seq: int | None, data: bytes, session: str
    ) -> None:
        if self.format == "json":
            self._buffer.append(json_line(event, shard_id, seq, data, self.generation))
        else:
            self._buffer.append(msgpack_event_map(event, data))
        if seq is not None:
            self._last[shard_id] = (session, seq)

    def flush(self) -> Progress | None:
        buffer = self._buffer
        if buffer:
            self._flushing = True
            try:
                self._write(buffer)
            finally:
                self._flushing = False
        return self.take_progress()

    def _write(self, buffer: list[bytes]) -> None:
        last = self._last
        self._last = {}
        if not self.connected:  # stdout is gone: nothing is confirmed, sessions replay it
            metrics.publish_failures.labels("output_closed").inc(len(buffer))
            buffer.clear()
            return
        if self._direct is not None:
            self.published += len(buffer)
            self._offset += sum(map(len, buffer))
            if last:  # confirmed as soon as the writer has written up to here
                self._unrelayed.append((self._offset, last))
            self._direct.write(buffer)
            buffer.clear()
            return
        data = b"".join(buffer)
        self.published += len(buffer)
        buffer.clear()
        self._offset += len(data)
        if self._transport is not None:
            self._transport.write(data)
        elif self._blocking_fd is not None:
            try:
                _write_all(self._blocking_fd, data)
            except OSError as exc:
                self._writer_lost(exc)
                return
        else:
            raise RuntimeError("stdio broker used before start()")
        if not last:
            return
        if self.confirm_on_relay:
            self._unrelayed.append((self._offset, last))
        elif self._transport is not None and self._transport.get_write_buffer_size():
            # Still in our buffer, not yet in the pipe: confirm once it has left, so a crash
            # now replays these events instead of losing them.
            self._held.update(last)
            self._check_drained_later()
        else:
            self._confirm_all(last)

    def _confirm_all(self, last: dict[int, tuple[str, int]]) -> None:
        self._progress.confirmed.update(last)  # shard -> (session, seq), as _confirmed does
        self._news = True

    def relayed(self, offset: int) -> None:
        """The supervisor wrote our output up to byte ``offset`` to its stdout."""
        self._relayed = max(self._relayed, offset)
        if self._confirm_up_to(offset):
            self._wake()
        if self._relay_waiter is not None and self._relayed >= self._offset:
            self._relay_waiter.set()

    def _direct_written(self, offset: int) -> None:
        """The direct writer has written our output up to byte ``offset``."""
        if self._confirm_up_to(offset) and not self._flushing:  # flush() hands them over
            self._wake()

    def _confirm_up_to(self, offset: int) -> bool:
        """Confirm the batches whose output ends at or before ``offset``; whether any did."""
        unrelayed = self._unrelayed
        if not unrelayed or unrelayed[0][0] > offset:
            return False
        done: dict[int, tuple[str, int]] = {}
        while unrelayed and unrelayed[0][0] <= offset:
            done.update(unrelayed.popleft()[1])
        self._confirm_all(done)
        return True

    def _check_drained_later(self) -> None:
        if self._drain_timer is None:
            loop = asyncio.get_running_loop()
            self._drain_timer = loop.call_later(DRAIN_CHECK, self._check_drained)

    def _check_drained(self) -> None:
        self._drain_timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            self._check_drained_later()
        elif self._held:
            held, self._held = self._held, {}
            self._confirm_all(held)
            self._wake()

    def _writer_paused(self, paused: bool) -> None:
        self._flow(paused)
        self._wake()

    def _writer_lost(self, exc: Exception | None) -> None:
        if not self.connected:
            return
        self.connected = False
        metrics.broker_connected.set(0)
        self._failed(f"stdout was closed ({exc or 'EOF'}); events can no longer be written")
        self._wake()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._direct_lock is not None:
            self._direct = DirectWriter(
                SharedStdout(self._stdout_fd, self._direct_lock),
                loop,
                repair=b"\n" if self.format == "json" else None,
                written=self._direct_written,
                paused=self._writer_paused,
                lost=self._writer_lost,
            )
            self.connected = True
            metrics.broker_connected.set(1)
            return
        out_fd = os.dup(self._stdout_fd)
        if _is_pipe_like(out_fd):
            if stat.S_ISFIFO(os.fstat(out_fd).st_mode):
                # Room for a while of output: the reader (the supervisor) takes it in batches.
                enlarge_pipe(out_fd, PIPE_SIZE)
            os.set_blocking(out_fd, False)
            pipe = os.fdopen(out_fd, "wb", buffering=0)
            transport, _ = await loop.connect_write_pipe(lambda: _Writer(self), pipe)
            self._transport = transport
        else:  # a regular file: writes do not block for long, and pipes would refuse it
            self._blocking_fd = out_fd
        self.connected = True
        metrics.broker_connected.set(1)

    async def drain(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until everything written has left our buffer (or ``timeout``)."""
        if self._buffer:
            self._write(self._buffer)
        if self._direct is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not self._direct.idle and not self._direct.closed and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return
        transport = self._transport
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Transports have no "buffer empty" callback: poll (only at shutdown).
        while transport.get_write_buffer_size() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        await self.drain()
        if self.confirm_on_relay and self.connected and self._relayed < self._offset:
            # Stopping (a rolling restart, say): the sessions we leave behind should include
            # everything the supervisor has written out, or our successor replays it.
            self._relay_waiter = asyncio.Event()
            try:
                await asyncio.wait_for(self._relay_waiter.wait(), RELAY_WAIT)
            except TimeoutError:
                log.info("stdout is behind: the last events stay unconfirmed (they will replay)")
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self._held and self._transport is not None:
            if not self._transport.get_write_buffer_size():
                self._confirm_all(self._held)
            self._held = {}
        if self._direct is not None:
            self._direct.close()
        elif self._transport is not None:
            self._transport.close()
        elif self._blocking_fd is not None:
            os.close(self._blocking_fd)
            self._blocking_fd = None
        self.connected = False


def _is_pipe_like(fd: int) -> bool:
    """Pipes, sockets and terminals can be polled; /dev/null and regular files cannot (and
    uvloop aborts the process if asked to watch them)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
