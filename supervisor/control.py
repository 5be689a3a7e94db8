"""The supervisor <-> worker control channel: JSON objects, one per line, on a socketpair."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["LineBuffer", "encode"]

MAX_LINE = 1 << 20


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineBuffer:
    """Split a byte stream into JSON messages; a garbled line is skipped, never fatal."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        buf = self._buf
        buf += data
        out: list[dict[str, Any]] = []
        while True:
            newline = buf.find(b"\n")
            if newline < 0:
                if len(buf) > MAX_LINE:
                    buf.clear()
                return out
            line = bytes(buf[:newline])
            del buf[: newline + 1]
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                out.append(message)
