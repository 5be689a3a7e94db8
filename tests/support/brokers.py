"""Playing the worker's part for a broker under test."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from spectacles_gateway.brokers.base import Ack, Broker, Progress


def _nothing(*args: object) -> None:
    return None


class Driver:
    """Takes a broker's :class:`Progress` (after each flush, and when the broker wakes us) and
    hands it to callbacks shaped like the worker's handling of it."""

    def __init__(
        self,
        broker: Broker,
        *,
        confirm: Callable[[int, str, int], None] = _nothing,
        pause: Callable[[], None] = _nothing,
        resume: Callable[[], None] = _nothing,
        commands: Callable[[bytes, Ack], None] | None = None,
        shard_commands: Callable[[int, bytes, Ack], None] | None = None,
        fail: Callable[[str], None] = _nothing,
    ) -> None:
        self.broker = broker
        self.confirm = confirm
        self.pause = pause
        self.resume = resume
        self.commands = commands
        self.shard_commands = shard_commands
        self.fail = fail
        self._scheduled = False
        broker.set_wakeup(self._wake)

    def flush(self) -> None:
        self.apply(self.broker.flush())

    def _wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        self._scheduled = False
        self.apply(self.broker.take_progress())

    def apply(self, progress: Progress | None) -> None:
        if progress is None:
            return
        for shard_id, (session, seq) in progress.confirmed.items():
            self.confirm(shard_id, session, seq)
        if progress.paused is True:
            self.pause()
        elif progress.paused is False:
            self.resume()
        for inbound in progress.commands:
            if inbound.shard_id is None:
                if self.commands is not None:
                    self.commands(inbound.body, inbound.ack)
                else:
                    inbound.ack()
            elif self.shard_commands is not None:
                self.shard_commands(inbound.shard_id, inbound.body, inbound.ack)
            else:
                inbound.ack()
        if progress.failed is not None:
            self.fail(progress.failed)
