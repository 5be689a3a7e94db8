"""A stand-in for an asyncio transport under a :class:`~spectacles_gateway.transport.
GatewayConnection` fed by hand: it keeps what is written (``keep``) or forgets it, as a socket
with room to spare would."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["FakeTransport"]


class FakeTransport(asyncio.Transport):
    def __init__(self, *, keep: bool = True) -> None:
        super().__init__()
        self.keep = keep
        self.written = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        if self.keep:
            self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0
