"""Publisher-confirm bookkeeping for the AMQP broker, without I/O.

Every message gets the channel's next delivery tag when it is written. ``basic.ack``
(``multiple`` or single, in any order) settles messages; a shard's confirmed seq only advances
over the unbroken run of settled messages of that shard, in publish order, so a confirmation of
``(shard, session, seq)`` always means "everything of that shard up to ``seq`` is with RabbitMQ".
A ``basic.nack`` puts the message aside for :meth:`ConfirmTracker.retry`; a lost channel puts
everything not confirmed back in line, in publish order (:meth:`ConfirmTracker.reset`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

__all__ = ["FORWARD", "ConfirmTracker", "Message"]

#: Queued messages that are not events of a shard (forwarded commands) use this shard key.
FORWARD = -1

_PENDING, _INFLIGHT, _ACKED = 0, 1, 2


class Message:
    """One message until RabbitMQ confirmed it."""

    __slots__ = ("ack", "frames", "order", "route", "seq", "session", "shard", "state", "tag")

    def __init__(
        self, shard: int, seq: int | None, session: str, route: str, frames: bytes
    ) -> None:
        self.order = 0
        self.shard = shard
        self.seq = seq
        self.session = session
        self.route = route
        self.frames = frames
        self.state = _PENDING
        self.tag = 0
        self.ack: Callable[[], None] | None = None


class ConfirmTracker:
    """Publisher-confirm bookkeeping, without I/O: which messages are waiting, which are out
    with which delivery tag, and what each shard may confirm.

    Call :meth:`add` for each new message, :meth:`take_pending` to write what waits (it assigns
    the delivery tags), :meth:`settle` for each ``basic.ack``/``basic.nack``, :meth:`retry` to
    queue nacked messages again and :meth:`reset` when the channel is gone.
    """

    def __init__(self, confirm: Callable[[int, str, int], None]) -> None:
        self.confirm = confirm
        self.pending: deque[Message] = deque()
        self.inflight: deque[tuple[int, Message]] = deque()
        self.by_shard: dict[int, deque[Message]] = {}
        self.nacked: list[Message] = []
        self.tag = 0
        self.order = 0
        #: Messages added and not yet confirmed (waiting, out, or nacked).
        self.unconfirmed = 0
        #: Messages confirmed so far.
        self.confirmed = 0

    def add(
        self,
        shard: int,
        seq: int | None,
        session: str,
        route: str,
        frames: bytes,
        *,
        ack: Callable[[], None] | None = None,
        waiting: bool = True,
    ) -> Message:
        """A new message; ``waiting=False``: held back (the caller queues it later)."""
        self.order += 1
        msg = Message(shard, seq, session, route, frames)
        msg.order = self.order
        msg.ack = ack
        if waiting:
            self.pending.append(msg)
        if shard != FORWARD:
            queue = self.by_shard.get(shard)
            if queue is None:
                queue = self.by_shard[shard] = deque()
            queue.append(msg)
        self.unconfirmed += 1
        return msg

    def take_pending(self) -> list[bytes]:
        """The frames of every waiting message, in order; they are now out with new tags."""
        pending = self.pending
        if not pending:
            return []
        tag = self.tag
        append = self.inflight.append
        chunks = []
        for msg in pending:
            tag += 1
            msg.tag = tag
            msg.state = _INFLIGHT
            append((tag, msg))
            chunks.append(msg.frames)
        pending.clear()
        self.tag = tag
        return chunks

    def settle(self, tag: int, multiple: bool, ok: bool) -> list[Message]:
        """Apply one ``basic.ack`` (``ok``) or ``basic.nack``; confirm what each shard may
        confirm now; return the forwarded commands that were acked (their ``ack`` is due) and,
        for a nack, nothing (the nacked messages wait in :attr:`nacked` for :meth:`retry`)."""
        inflight = self.inflight
        if not inflight:
            return []
        settled: list[Message] = []
        if multiple:
            while inflight and inflight[0][0] <= tag:
                t, msg = inflight.popleft()
                if msg.tag == t and msg.state == _INFLIGHT:
                    settled.append(msg)
        else:
            index = tag - inflight[0][0]
            if 0 <= index < len(inflight):
                t, msg = inflight[index]
                if msg.tag == t and msg.state == _INFLIGHT:
                    settled.append(msg)
        if not settled:
            return []
        if not ok:
            for msg in settled:
                msg.state = _PENDING
                msg.tag = 0
            self.nacked.extend(settled)
            self._drop_settled_heads()
            return []
        shards: set[int] = set()
        forwarded: list[Message] = []
        for msg in settled:
            msg.state = _ACKED
            if msg.shard == FORWARD:
                forwarded.append(msg)
            else:
                shards.add(msg.shard)
        self._drop_settled_heads()
        done = len(forwarded)
        confirm = self.confirm
        for shard in shards:
            queue = self.by_shard[shard]
            last: Message | None = None
            while queue and queue[0].state == _ACKED:
                msg = queue.popleft()
                done += 1
                if msg.seq is not None:
                    if last is not None and last.session != msg.session:
                        confirm(shard, last.session, last.seq)  # type: ignore[arg-type]
                    last = msg
            if last is not None:
                confirm(shard, last.session, last.seq)  # type: ignore[arg-type]
            if not queue:
                del self.by_shard[shard]
        self.unconfirmed -= done
        self.confirmed += done
        return forwarded

    def _drop_settled_heads(self) -> None:
        inflight = self.inflight
        while inflight:
            t, msg = inflight[0]
            if msg.tag == t and msg.state == _INFLIGHT:
                return
            inflight.popleft()

    def retry(self) -> int:
        """Queue the nacked messages again, before anything newer; returns how many."""
        nacked = self.nacked
        if not nacked:
            return 0
        count = len(nacked)
        self._requeue(nacked)
        self.nacked = []
        return count

    def reset(self) -> int:
        """The channel is gone: every message out or nacked waits again, in publish order, and
        delivery tags start over. Returns how many messages were out."""
        out = [msg for t, msg in self.inflight if msg.tag == t and msg.state == _INFLIGHT]
        self.inflight.clear()
        self._requeue([*out, *self.nacked])
        self.nacked = []
        self.tag = 0
        return len(out)

    def _requeue(self, msgs: Iterable[Message]) -> None:
        again = list(msgs)
        for msg in again:
            msg.state = _PENDING
            msg.tag = 0
        self.pending = deque(sorted([*again, *self.pending], key=_order))

    def unsettled(self) -> list[Message]:
        """Every message not yet confirmed, in publish order (waiting, out or nacked)."""
        out = [msg for t, msg in self.inflight if msg.tag == t and msg.state == _INFLIGHT]
        return sorted([*out, *self.nacked, *self.pending], key=_order)


def _order(msg: Message) -> int:
    return msg.order
