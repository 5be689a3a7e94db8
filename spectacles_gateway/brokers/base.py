"""The broker interface: publish events, receive commands, acknowledge them."""

from __future__ import annotations

import abc
from collections.abc import Callable

__all__ = ["Broker", "CommandHandler", "ConfirmHandler", "ShardCommandHandler"]

#: ``confirm(shard_id, session_id, seq)``: every event of that session up to ``seq`` is safe.
ConfirmHandler = Callable[[int, str, int], None]
#: ``handle(body, ack)``: a raw command body; call ``ack()`` once it was sent or rejected.
CommandHandler = Callable[[bytes, Callable[[], None]], None]
#: ``handle(shard_id, body, ack)``: a bare packet ``{"op", "d"}`` for one shard.
ShardCommandHandler = Callable[[int, bytes, Callable[[], None]], None]


class Broker(abc.ABC):
    """One broker connection per worker. Publishing never blocks: it buffers, and the broker
    asks the worker to pause reading sockets (``pause``) when its buffer is full."""

    name = "broker"

    def __init__(self) -> None:
        self._confirm: ConfirmHandler = lambda shard_id, session, seq: None
        self._pause: Callable[[], None] = lambda: None
        self._resume: Callable[[], None] = lambda: None
        self._commands: CommandHandler | None = None
        self._shard_commands: ShardCommandHandler | None = None
        self._fail: Callable[[str], None] = lambda reason: None
        self.connected = False

    def bind(
        self,
        *,
        confirm: ConfirmHandler,
        pause: Callable[[], None],
        resume: Callable[[], None],
        commands: CommandHandler,
        shard_commands: ShardCommandHandler | None = None,
        fail: Callable[[str], None] | None = None,
    ) -> None:
        """``fail(reason)``: the output is gone for good (not a reconnectable outage)."""
        self._confirm = confirm
        self._shard_commands = shard_commands
        if fail is not None:
            self._fail = fail
        self._pause = pause
        self._resume = resume
        self._commands = commands

    @abc.abstractmethod
    def publish(
        self, shard_id: int, event: str, seq: int | None, data: bytes, session: str
    ) -> None:
        """Hand one event over. ``data`` is the raw JSON of ``d``."""

    def forward(self, shard_id: int, packet: bytes, ack: Callable[[], None]) -> bool:
        """Hand a packet for a shard this worker does not run to whoever runs it (AMQP: the
        per-shard queue). Return False when this broker cannot (the command is rejected);
        call ``ack()`` once it was handed on."""
        return False

    def flush(self) -> None:  # noqa: B027 - optional hook
        """End of a batch of events from one read."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; start consuming commands."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Flush what is buffered and disconnect."""
