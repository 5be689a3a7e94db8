"""Logging to stderr with level, worker and shard context, and secrets redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from .redact import RedactingFilter, Redactor

__all__ = ["setup_logging"]


def setup_logging(level: int, secrets: Iterable[str], *, worker: str = "main") -> None:
    """Configure the root logger once, at start-up (never at import time)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)-7s [{worker}] %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    handler.addFilter(RedactingFilter(Redactor(s for s in secrets if s)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries' chatter (pika's per-frame debug lines) stays out unless asked for.
    for noisy in ("pika", "websockets", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
