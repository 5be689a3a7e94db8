"""A shard's sending side, pure: the send limit's priority share for heartbeats, IDENTIFY and
RESUME, and consumers' commands queued until the limit allows (discord.md, "Rate limits").

A mixin of :class:`~.shard.ShardProtocol`: the state it uses is declared here and set up there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backoff import heartbeat_time
from .commands import CommandQueue, command_op
from .envelope import Opcode
from .events import CommandsDropped, CommandsSent, Event, NoticeKind, SendData
from .limiter import SendLimiter
from .state import Phase, ShardConfig

__all__ = ["Sending"]


class Sending:
    config: ShardConfig
    phase: Phase
    seq: int | None
    _out: list[Event]
    _limiter: SendLimiter
    _commands: CommandQueue
    _commands_waiting: bool
    _commands_sent: int
    _packets_sent: dict[int, int]
    _acked: bool
    _heartbeat_sent_at: float | None
    _heartbeat_interval: float
    _heartbeat_at: float | None

    if TYPE_CHECKING:  # the shard's own (only declared: never shadowed)

        def _notice(self, kind: NoticeKind, detail: str = "") -> None: ...

    def _send_priority(self, payload: bytes, now: float, op: int) -> bool:
        if self._limiter.try_acquire(now, priority=True):
            self._out.append(SendData(payload))
            sent = self._packets_sent
            sent[op] = sent.get(op, 0) + 1
            return True
        return False

    def _send_heartbeat(self, now: float) -> None:
        seq = self.seq
        payload = b'{"op":1,"d":null}' if seq is None else b'{"op":1,"d":%d}' % seq
        if self._send_priority(payload, now, Opcode.HEARTBEAT):
            self._acked = False
            self._heartbeat_sent_at = now
            if self._heartbeat_interval:
                self._heartbeat_at = heartbeat_time(
                    now, now + self._heartbeat_interval, self._heartbeat_interval
                )
        else:  # cannot happen while commands keep to their share; retry when a slot frees
            self._heartbeat_at = self._limiter.next_free(now, priority=True)

    def queue_command(self, payload: bytes, now: float, ticket: object = None) -> None:
        """Queue a command payload (``{"op": .., "d": ..}`` JSON) to send when the limit allows.

        Raises :class:`CommandRejected` for a payload that can never be sent, or when the queue
        is full. ``ticket`` comes back in a :class:`CommandsSent` (or :class:`CommandsDropped`)
        event once the payload was handed to the websocket (or given up).
        """
        self._commands.push(payload, ticket, command_op(payload), now, self.config.shard_id)
        self._flush_commands(now)

    def _flush_commands(self, now: float) -> None:
        commands = self._commands
        if not commands.items:
            return
        expired = commands.expire(now)
        if expired is not None:
            self._notice(
                NoticeKind.COMMANDS_EXPIRED,
                f"commands older than {commands.max_age:g} s were dropped unsent",
            )
            if expired:
                self._out.append(CommandsDropped(expired, "expired"))
        if self.phase is not Phase.READY:
            return
        sent = self._packets_sent
        tickets: list[object] = []
        out = self._out
        for payload, ticket, op in commands.take(now, self._limiter):
            out.append(SendData(payload))
            sent[op] = sent.get(op, 0) + 1
            self._commands_sent += 1
            if ticket is not None:
                tickets.append(ticket)
        if tickets:
            out.append(CommandsSent(tuple(tickets)))
        self._commands_waiting = bool(commands.items)
