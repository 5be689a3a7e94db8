"""Commands through RabbitMQ: the command consumers, and packets handed on to other workers.

Inputs (product.md "Inputs"):

- ``<group>:SEND`` (durable, bound with ``SEND``): ``SEND`` bodies, routed by their content.
- ``<group>:<shard id>`` for every shard this worker runs (durable, bound with the shard id as
  a decimal string, as the Go gateway did; publishers may also use the default exchange with
  the queue name): bare packets for that shard.
- Manual acks, prefetch ``amqp.prefetch``; ``ack()`` is idempotent and a no-op after the
  channel went away (RabbitMQ then redelivers the command).
- Each delivery is taken inside its own boundary: a body over 64 KiB is dropped before parsing
  (``gateway_input_dropped_total{source="amqp",reason="too_large"}``); anything that raises
  while a delivery is taken is logged with its reason and traceback, counted
  (``reason="internal_error"``) and the delivery acked, and consuming goes on. (Without it, an
  exception escaping pika's consumer callback tears the connection down; the delivery comes
  back while the next connection is set up and does it again, and again: no command taken and
  no event published, for good.) The worker parses the body, and logs, counts and acks every
  malformed command in its own boundary.

Forwarding (:class:`Forwarder`): a packet for a shard of another worker is published to
``<group>:<shard>`` through the default exchange (the compact JSON, persistent when configured),
after that queue was declared (durable) and bound, once per connection, on a channel of its own
so that a refusal cannot stop the events. The command is acked once RabbitMQ confirmed the copy.
A queue that cannot be declared drops its commands with a warning (``reason="forward_failed"``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .. import metrics
from .amqp_confirms import ConfirmTracker, Message
from .amqp_link import AmqpLink, ChannelGone, CommandQueue, QueueRefused
from .base import Ack
from .wire import MAX_COMMAND_BODY

__all__ = ["CommandIntake", "Forwarder"]

log = logging.getLogger(__name__)

SOURCE = "amqp"

#: Takes a command: (body, ack, shard id or None for a ``SEND`` body).
Deliver = Callable[[bytes, Ack, int | None], None]


class CommandIntake:
    """The consumers of ``<group>:SEND`` and ``<group>:<shard>``: each delivery is handed to
    ``deliver`` or dropped (and acked) inside its own boundary.

    ``owns(channel)`` tells whether a delivery's channel is still the open command channel:
    an ack on any other one would be refused (RabbitMQ redelivers those deliveries anyway).
    """

    def __init__(self, group: str, deliver: Deliver, owns: Callable[[Any], bool]) -> None:
        self.group = group
        self.deliver = deliver
        self.owns = owns

    def queues(self, shard_ids: tuple[int, ...]) -> list[CommandQueue]:
        """``<group>:SEND`` and the queue of each shard in ``shard_ids``, with their consumers."""
        out = [CommandQueue(f"{self.group}:SEND", "SEND", self._consumer(None))]
        out += [CommandQueue(f"{self.group}:{i}", str(i), self._consumer(i)) for i in shard_ids]
        return out

    def _consumer(self, shard_id: int | None) -> Callable[[Any, Any, Any, bytes], None]:
        queue = f"{self.group}:{'SEND' if shard_id is None else shard_id}"

        def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            ack = self._acker(channel, method.delivery_tag)
            try:
                self._take(queue, shard_id, body, ack)
            except Exception:  # a bug of ours: one delivery must not stop the intake
                log.exception("rejected a command: internal_error while taking it from %s", queue)
                metrics.input_dropped.labels(SOURCE, "internal_error").inc()
                ack()

        return on_message

    def _take(self, queue: str, shard_id: int | None, body: bytes, ack: Ack) -> None:
        if len(body) > MAX_COMMAND_BODY:
            log.warning("rejected a command: too_large: a body of %d bytes in %s", len(body), queue)
            metrics.input_dropped.labels(SOURCE, "too_large").inc()
            ack()
            return
        self.deliver(body, ack, shard_id)

    def _acker(self, channel: Any, tag: int) -> Ack:
        done = False
        owns = self.owns

        def ack() -> None:
            nonlocal done
            if done:
                return
            done = True
            if owns(channel):
                channel.basic_ack(tag)

        return ack


class Forwarder:
    """Holds the packets for other workers' shards until ``<group>:<shard>`` is declared on the
    current connection, then releases them into ``tracker``'s queue; ``progressed()`` is called
    after each release or refusal (the broker writes, and reports what changed)."""

    def __init__(
        self,
        group: str,
        link: AmqpLink,
        tracker: ConfirmTracker,
        progressed: Callable[[], None],
    ) -> None:
        self.group = group
        self.link = link
        self.tracker = tracker
        self.progressed = progressed
        self._declared: set[int] = set()
        self._waiting: dict[int, list[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def route(self, shard_id: int) -> str:
        return f"{self.group}:{shard_id}"

    def declared(self, shard_id: int) -> bool:
        """``<group>:<shard>`` exists on this connection: its messages may go now."""
        return shard_id in self._declared

    def hold(self, shard_id: int, msg: Message) -> None:
        """Keep ``msg`` (not queued in the tracker) until its queue is declared."""
        waiting = self._waiting.setdefault(shard_id, [])
        waiting.append(msg)
        if len(waiting) == 1 and self.link.ready:
            self._start(shard_id)

    def held(self) -> list[Message]:
        return [msg for waiting in self._waiting.values() for msg in waiting]

    def link_up(self) -> None:
        for shard_id in list(self._waiting):
            self._start(shard_id)

    def link_down(self) -> None:
        self._declared.clear()

    def _start(self, shard_id: int) -> None:
        task = asyncio.get_running_loop().create_task(self._declare(shard_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _declare(self, shard_id: int) -> None:
        queue = self.route(shard_id)
        try:
            await self.link.declare_queue(queue, str(shard_id))
        except QueueRefused as exc:
            # The queue cannot be declared as we need it: drop these commands, loudly.
            tracker = self.tracker
            for msg in self._waiting.pop(shard_id, []):
                log.warning(
                    "rejected a command for shard %d: cannot declare %s (%s)", shard_id, queue, exc
                )
                metrics.input_dropped.labels(SOURCE, "forward_failed").inc()
                tracker.unconfirmed -= 1
                if msg.ack is not None:
                    msg.ack()
            self.progressed()
            return
        except ChannelGone:
            return  # the connection is gone: link_up() declares again
        self._declared.add(shard_id)
        self.tracker.pending.extend(self._waiting.pop(shard_id, []))
        self.progressed()
