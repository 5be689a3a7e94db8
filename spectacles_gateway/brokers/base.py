"""The broker interface: publish events, receive commands, acknowledge them.

Data flows one way. The worker hands events down (:meth:`Broker.publish`, then
:meth:`Broker.flush` at the end of each socket read); the broker never calls back into the
worker with data. What happened in the broker (events confirmed, a full or drained buffer,
commands received, a lost output) is collected in a :class:`Progress`, returned by
:meth:`Broker.flush`. When something happens on the broker's own time (a publisher confirm
arrives, a command is consumed) the broker calls the worker's wake-up hook, which takes no data:
the worker then calls :meth:`Broker.flush` again (soon, on its own loop) and applies what it gets.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["Ack", "Broker", "Inbound", "Progress"]

#: Acknowledges a command to its source: call once it was sent, rejected or handed on.
Ack = Callable[[], None]


class Inbound(NamedTuple):
    """A command body from a consumer. ``shard_id`` None: a ``SEND`` body, routed by its
    content; otherwise a bare packet ``{"op", "d"}`` for that shard (a per-shard queue)."""

    body: bytes
    ack: Ack
    shard_id: int | None = None


@dataclass(slots=True)
class Progress:
    """What happened in a broker since the worker last asked."""

    #: shard id -> (session id, seq): every event of that session up to seq is safe.
    confirmed: dict[int, tuple[str, int]] = field(default_factory=dict)
    #: True: stop reading the gateway (buffer full); False: read again; None: no change.
    paused: bool | None = None
    commands: list[Inbound] = field(default_factory=list)
    #: The output is gone for good (not a reconnectable outage): why.
    failed: str | None = None


def _nothing() -> None:
    return None


class Broker(abc.ABC):
    """One broker connection per worker. Publishing never blocks: it buffers, and the broker
    reports ``paused=True`` when its buffer is full (the worker stops reading sockets)."""

    name = "broker"

    def __init__(self) -> None:
        self.connected = False
        self._progress = Progress()
        self._news = False
        self._wakeup: Callable[[], None] = _nothing

    # ------------------------------------------------------------------ the worker's side

    def set_wakeup(self, wakeup: Callable[[], None]) -> None:
        """``wakeup()`` is called (without data) when there is news outside :meth:`flush`."""
        self._wakeup = wakeup

    @abc.abstractmethod
    def publish(
        self, shard_id: int, event: str, seq: int | None, data: bytes, session: str
    ) -> None:
        """Hand one event over. ``data`` is the raw JSON of ``d``."""

    def flush(self) -> Progress | None:
        """End of a batch of events from one read: write what is buffered. Returns what
        happened since the last call (None: nothing)."""
        return self.take_progress()

    def take_progress(self) -> Progress | None:
        if not self._news:
            return None
        progress = self._progress
        self._progress = Progress()
        self._news = False
        return progress

    def forward(self, shard_id: int, packet: bytes, ack: Ack) -> bool:
        """Hand a packet for a shard this worker does not run to whoever runs it (AMQP: the
        per-shard queue). Return False when this broker cannot (the command is rejected);
        call ``ack()`` once it was handed on."""
        return False

    def track(self, shard_id: int, *, running: bool) -> None:  # noqa: B027 - optional hook
        """Fleet: this worker now runs ``shard_id`` (or no longer): consume its per-shard
        commands (or stop), so commands for it reach whoever runs it."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; start consuming commands."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Flush what is buffered and disconnect."""

    # ------------------------------------------------------------------ for implementations

    def _confirmed(self, shard_id: int, session: str, seq: int) -> None:
        """Everything of ``shard_id`` up to ``seq`` (of ``session``) is safe."""
        self._progress.confirmed[shard_id] = (session, seq)
        self._news = True

    def _flow(self, paused: bool) -> None:
        self._progress.paused = paused
        self._news = True

    def _command(self, body: bytes, ack: Ack, shard_id: int | None = None) -> None:
        self._progress.commands.append(Inbound(body, ack, shard_id))
        self._news = True

    def _failed(self, reason: str) -> None:
        self._progress.failed = reason
        self._news = True

    def _wake(self) -> None:
        """Tell the worker there is news (call after queuing it outside :meth:`flush`)."""
        if self._news:
            self._wakeup()
