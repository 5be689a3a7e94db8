"""The supervisor's end of one worker's control socket (driven by the select loop).

Messages out go through a buffer that is written as the socket accepts it (registered for write
readiness): nothing is ever dropped or cut in half, whatever the socket's buffer holds. A worker
that stops reading lets the buffer grow; beyond :data:`STALL_BYTES` it is stalled, and the
supervisor kills and restarts it (its shards resume), rather than dropping an identify grant.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
from collections.abc import Callable

from spectacles_gateway.control import FrameError, FrameReader, Message, encode

__all__ = ["STALL_BYTES", "ControlChannel"]

log = logging.getLogger("spectacles_gateway.supervisor")

#: Bytes waiting for a worker beyond which it counts as stalled (a status report of thousands
#: of shards is a few hundred KiB; nothing we send a worker is large).
STALL_BYTES = 16 << 20
READ_SIZE = 1 << 18


class ControlChannel:
    def __init__(
        self,
        sock: socket.socket,
        selector: selectors.BaseSelector,
        on_message: Callable[[Message | FrameError], None],
        on_closed: Callable[[], None],
    ) -> None:
        self.sock = sock
        self.selector = selector
        self.on_message = on_message
        self.on_closed = on_closed
        self.reader = FrameReader()
        self.out = bytearray()
        self.closed = False
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._ready)
        self._events = selectors.EVENT_READ

    @property
    def backlog(self) -> int:
        """Bytes written by us and not yet taken by the socket."""
        return len(self.out)

    @property
    def stalled(self) -> bool:
        return len(self.out) > STALL_BYTES

    def send(self, message: Message) -> None:
        """Queue ``message``; it goes out whole, in order, as soon as the socket takes it."""
        if self.closed:
            return
        self.out += encode(message)
        self._write()

    def _write(self) -> None:
        out = self.out
        if out:
            try:
                sent = self.sock.send(out)
                del out[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                out.clear()  # the worker is gone; its death is handled by the reaper
        self._interest(selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))

    def _interest(self, events: int) -> None:
        if events != self._events and not self.closed:
            self.selector.modify(self.sock, events, self._ready)
            self._events = events

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._write()
        if mask & selectors.EVENT_READ:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            self.on_closed()
            return
        for message in self.reader.feed(data):
            self.on_message(message)

    def drain(self) -> None:
        """Read everything the worker wrote before it died (its last status, its last
        ``identified``), then close. The peer is gone, so this ends at EOF."""
        while not self.closed:
            try:
                data = self.sock.recv(READ_SIZE)
            except OSError:  # nothing more (or never will be)
                break
            if not data:
                break
            for message in self.reader.feed(data):
                self.on_message(message)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.sock)
        self.sock.close()
        self.out.clear()
