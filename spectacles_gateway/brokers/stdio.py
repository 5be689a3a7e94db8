"""The stdio broker: events to stdout, ``SEND`` commands from stdin.

Output formats: ``json`` (one object per line, so ``| jq`` works) or ``msgpack`` (the seed's
back-to-back maps ``{"event", "data"}``). Every batch is written with one write through a
non-blocking pipe transport, so whole messages never interleave and a slow reader pushes back on
the shards (they stop reading their sockets) instead of blocking the event loop. Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable

import msgspec

from .. import metrics
from .base import Broker
from .wire import json_line, msgpack_event_map

__all__ = ["StdioBroker", "msgpack_object_end"]

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a command line longer than this is dropped


class _Writer(asyncio.Protocol):
    def __init__(self, broker: StdioBroker) -> None:
        self.broker = broker

    def pause_writing(self) -> None:
        self.broker._writer_paused(True)

    def resume_writing(self) -> None:
        self.broker._writer_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.broker._writer_lost(exc)


class _Reader(asyncio.Protocol):
    def __init__(self, feed: Callable[[bytes], None], eof: Callable[[], None]) -> None:
        self.feed = feed
        self.eof = eof

    def data_received(self, data: bytes) -> None:
        self.feed(data)

    def eof_received(self) -> bool | None:
        self.eof()
        return None


class StdioBroker(Broker):
    name = "stdio"

    def __init__(self, fmt: str = "json", *, stdout_fd: int = 1, stdin_fd: int | None = 0) -> None:
        super().__init__()
        if fmt not in ("json", "msgpack"):
            raise ValueError(f"unknown stdio format {fmt!r}")
        self.format = fmt
        self._stdout_fd = stdout_fd
        self._stdin_fd = stdin_fd
        self._buffer: list[bytes] = []
        self._last: dict[int, tuple[str, int]] = {}
        self._transport: asyncio.WriteTransport | None = None
        self._blocking_fd: int | None = None
        self._in_buffer = bytearray()
        self._skipping = False
        self._reader_transport: asyncio.ReadTransport | None = None
        self._file_reader: asyncio.Future[None] | None = None
        self._confirm_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._drained: asyncio.Event | None = None
        self.published = 0

    # ------------------------------------------------------------------ output

    def publish(
        self, shard_id: int, event: str, seq: int | None, data: bytes, session: str
    ) -> None:
        if self.format == "json":
            self._buffer.append(json_line(event, shard_id, seq, data))
        else:
            self._buffer.append(msgpack_event_map(event, data))
        if seq is not None:
            self._last[shard_id] = (session, seq)

    def flush(self) -> None:
        buffer = self._buffer
        if not buffer:
            return
        if not self.connected:  # stdout is gone: nothing is confirmed, sessions replay it
            metrics.publish_failures.labels("output_closed").inc(len(buffer))
            buffer.clear()
            self._last.clear()
            return
        data = b"".join(buffer)
        self.published += len(buffer)
        buffer.clear()
        if self._transport is not None:
            self._transport.write(data)
            if self._transport.get_write_buffer_size():
                # Still in our buffer, not yet in the pipe: confirm once it has left, so a
                # crash now replays these events instead of losing them.
                self._hold_confirms()
                return
        elif self._blocking_fd is not None:
            try:
                _write_all(self._blocking_fd, data)
            except OSError as exc:
                self._last.clear()
                self._writer_lost(exc)
                return
        else:
            raise RuntimeError("stdio broker used before start()")
        self._release_confirms()

    def _release_confirms(self) -> None:
        last = self._last
        if last:
            confirm = self._confirm
            for shard_id, (session, seq) in last.items():
                confirm(shard_id, session, seq)
            last.clear()

    def _hold_confirms(self) -> None:
        if self._confirm_timer is None:
            loop = asyncio.get_running_loop()
            self._confirm_timer = loop.call_later(0.02, self._check_drained)

    def _check_drained(self) -> None:
        self._confirm_timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            self._hold_confirms()
        else:
            self._release_confirms()

    def _writer_paused(self, paused: bool) -> None:
        self._paused = paused
        if paused:
            self._pause()
        else:
            self._resume()
            if self._drained is not None:
                self._drained.set()

    def _writer_lost(self, exc: Exception | None) -> None:
        if not self.connected:
            return
        self.connected = False
        metrics.broker_connected.set(0)
        reason = f"stdout was closed ({exc or 'EOF'}); events can no longer be written"
        self._fail(reason)

    # ------------------------------------------------------------------ input

    def _feed(self, data: bytes) -> None:
        buf = self._in_buffer
        buf += data
        if self.format == "json":
            self._feed_lines()
        else:
            self._feed_msgpack()

    def _feed_lines(self) -> None:
        buf = self._in_buffer
        while True:
            newline = buf.find(b"\n")
            if newline < 0:
                if len(buf) > MAX_LINE:
                    self._drop("too_large", f"command line over {MAX_LINE} bytes")
                    buf.clear()
                    self._skipping = True
                return
            line = bytes(buf[:newline])
            del buf[: newline + 1]
            if self._skipping:  # the tail of an oversized line
                self._skipping = False
                continue
            if line.strip():
                self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            obj = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            self._drop("not_json", f"stdin line is not JSON ({exc}): {line[:80]!r}")
            return
        self._record(obj)

    def _feed_msgpack(self) -> None:
        buf = self._in_buffer
        while buf:
            try:
                end = msgpack_object_end(buf, 0)
            except ValueError as exc:
                self._drop("not_msgpack", f"stdin is not a msgpack stream ({exc}); discarding")
                buf.clear()
                return
            if end is None:
                if len(buf) > MAX_LINE:
                    self._drop("too_large", f"msgpack record over {MAX_LINE} bytes")
                    buf.clear()
                return
            record = bytes(buf[:end])
            del buf[:end]
            try:
                obj = msgspec.msgpack.decode(record)
            except msgspec.DecodeError as exc:
                self._drop("not_msgpack", f"bad msgpack record: {exc}")
                continue
            self._record(obj)

    def _record(self, obj: object) -> None:
        if not isinstance(obj, dict):
            self._drop("wrong_shape", "a stdin record must be a map with event and data")
            return
        event = obj.get("event")
        if event != "SEND":
            self._drop("unknown_event", f"stdin record with event {event!r}; only SEND is read")
            return
        data = obj.get("data")
        if isinstance(data, str):
            body = data.encode()
        elif isinstance(data, bytes):
            body = data
        elif isinstance(data, dict):
            body = msgspec.json.encode(data)
        else:
            self._drop("wrong_shape", "SEND record without a data object")
            return
        if self._commands is not None:
            self._commands(body, _no_ack)

    def _drop(self, reason: str, detail: str) -> None:
        log.warning("dropped input from stdin: %s", detail)
        metrics.input_dropped.labels("stdio", reason).inc()

    def _eof(self) -> None:
        log.info("stdin closed; no more commands from stdin")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        out_fd = os.dup(self._stdout_fd)
        if _is_pipe_like(out_fd):
            os.set_blocking(out_fd, False)
            pipe = os.fdopen(out_fd, "wb", buffering=0)
            transport, _ = await loop.connect_write_pipe(lambda: _Writer(self), pipe)
            self._transport = transport
        else:  # a regular file: writes do not block for long, and pipes would refuse it
            self._blocking_fd = out_fd
        self.connected = True
        metrics.broker_connected.set(1)
        if self._stdin_fd is not None and self._commands is not None:
            try:
                in_fd = os.dup(self._stdin_fd)
            except OSError:
                log.info("no stdin: commands can only come from a broker")
                return
            if _is_pipe_like(in_fd):
                pipe_in = os.fdopen(in_fd, "rb", buffering=0)
                self._reader_transport, _ = await loop.connect_read_pipe(
                    lambda: _Reader(self._feed, self._eof), pipe_in
                )
            elif stat.S_ISREG(os.fstat(in_fd).st_mode):  # `< commands.jsonl`: read it aside
                self._file_reader = loop.run_in_executor(None, self._read_file, in_fd, loop)
            else:  # /dev/null and other devices that cannot be polled
                os.close(in_fd)
                log.debug("stdin cannot be polled: not reading commands from it")

    def _read_file(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        with os.fdopen(fd, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                loop.call_soon_threadsafe(self._feed, chunk)
        loop.call_soon_threadsafe(self._eof)

    async def drain(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until everything written has left our buffer (or ``timeout``)."""
        self.flush()
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
        if self._reader_transport is not None:
            self._reader_transport.close()
        if self._transport is not None:
            self._transport.close()
        elif self._blocking_fd is not None:
            os.close(self._blocking_fd)
            self._blocking_fd = None
        self.connected = False


def _no_ack() -> None:
    return None


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


def msgpack_object_end(buf: bytes | bytearray, pos: int) -> int | None:
    """End offset of the msgpack object starting at ``pos``; None if ``buf`` holds only part of
    it. Raises ValueError on a byte that starts no msgpack object (0xc1)."""
    n = len(buf)
    todo = 1
    while todo:
        if pos >= n:
            return None
        b = buf[pos]
        todo -= 1
        pos += 1
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            continue
        if 0x80 <= b <= 0x8F:
            todo += 2 * (b & 0x0F)
        elif 0x90 <= b <= 0x9F:
            todo += b & 0x0F
        elif 0xA0 <= b <= 0xBF:
            pos += b & 0x1F
        elif b in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
            width = {0xC4: 1, 0xD9: 1, 0xC5: 2, 0xDA: 2, 0xC6: 4, 0xDB: 4}[b]
            if pos + width > n:
                return None
            pos += width + int.from_bytes(buf[pos : pos + width], "big")
        elif b in (0xC7, 0xC8, 0xC9):
            width = {0xC7: 1, 0xC8: 2, 0xC9: 4}[b]
            if pos + width > n:
                return None
            pos += width + 1 + int.from_bytes(buf[pos : pos + width], "big")
        elif b in (0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD1, 0xD2, 0xD3):
            pos += {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(
                b, {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}.get(b, 0)
            )
        elif 0xD4 <= b <= 0xD8:
            pos += 1 + (1, 2, 4, 8, 16)[b - 0xD4]
        elif b in (0xDC, 0xDD, 0xDE, 0xDF):
            width = 2 if b in (0xDC, 0xDE) else 4
            if pos + width > n:
                return None
            count = int.from_bytes(buf[pos : pos + width], "big")
            pos += width
            todo += count * (2 if b in (0xDE, 0xDF) else 1)
        else:
            raise ValueError(f"byte 0x{b:02x} starts no msgpack object")
    return pos if pos <= n else None
