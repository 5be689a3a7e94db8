"""One shard kept connected: the reconnect loop around the core (:class:`ShardRunner`).

It asks the core where and when to connect, takes the identify gate when the connection will
identify, opens a :class:`~.transport.GatewayConnection` and reports how each connection ended.
What the worker asks of a shard goes through its methods (:meth:`ShardRunner.confirm`,
:meth:`~ShardRunner.send`, :meth:`~ShardRunner.stats`, ...); nothing outside reaches into the core.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from websockets.exceptions import InvalidHandshake, InvalidURI

from .compression import make_decompressor
from .plan import DEFAULT_MAX_MESSAGE
from .protocol.closecodes import CloseAction, describe_close
from .protocol.events import CloseRequest, IdentifySent, SendData, ShardCounts, ShardStats
from .protocol.shard import Phase, ShardConfig, ShardProtocol
from .transport import EventHandler, GatewayConnection, IdentifyGateLike

if TYPE_CHECKING:
    from .protocol.state import Session

__all__ = ["ShardRunner"]

log = logging.getLogger("spectacles_gateway.transport")

_FATAL_HINTS = {
    4004: "the bot token is invalid or was reset",
    4010: "a shard id is not below the shard count",
    4011: "this bot needs more shards (raise the shard count or use 0 to ask Discord)",
    4012: "the gateway version is not supported",
    4013: "the intents contain an invalid bit",
    4014: "a privileged intent is not enabled for this bot in the developer portal",
}


def _ssl_context(url: str) -> ssl.SSLContext | None:
    if urlsplit(url).scheme == "wss":
        return ssl.create_default_context()
    return None


class ShardRunner:
    """Keeps one shard connected: the reconnect loop around the core."""

    def __init__(
        self,
        config: ShardConfig,
        handler: EventHandler,
        gate: IdentifyGateLike,
        *,
        session: Session | None = None,
        open_timeout: float = 10.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
        loop: asyncio.AbstractEventLoop | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.core = ShardProtocol(config, rand=rand, session=session)
        self.shard_id = config.shard_id
        self.handler = handler
        self.gate = gate
        self.open_timeout = open_timeout
        self.max_message_size = max_message_size
        self.loop = loop or asyncio.get_running_loop()
        self.connection: GatewayConnection | None = None
        self.paused = False
        self.task: asyncio.Task[int | None] | None = None
        self._permit: object | None = None
        self._stopping = False
        self.connects = 0
        #: Fleet: publish nothing after this time (the loop's clock); None: no lease.
        self.lease_until: float | None = None
        self.expired = False

    # ---------------------------------------------------------------- what the worker asks

    def start(self) -> asyncio.Task[int | None]:
        self.task = self.loop.create_task(self.run(), name=f"shard-{self.shard_id}")
        return self.task

    def stop(self, *, keep_session: bool) -> None:
        """Close the shard: 1000 unless ``keep_session``; :attr:`task` ends when it is closed."""
        if self._stopping:
            return
        self._stopping = True
        self.core.stop(keep_session=keep_session)
        conn = self.connection
        if conn is not None and not conn.closed.done():
            conn.pump()
        else:
            self._report()
            if self.task is not None and not self.task.done():
                self.task.cancel()

    def send(self, payload: bytes, ticket: object = None) -> None:
        """Queue a command (raises CommandRejected when it can never be sent)."""
        self.core.queue_command(payload, self.loop.time(), ticket)
        conn = self.connection
        if conn is not None:
            conn.pump()
        else:
            self._report()

    def confirm(self, session_id: str, seq: int) -> None:
        """The broker has every dispatch of ``session_id`` up to ``seq``."""
        self.core.confirm(seq, session_id)

    def stats(self) -> ShardStats:
        return self.core.stats()

    def take_counts(self) -> ShardCounts:
        return self.core.take_counts()

    def session(self) -> Session | None:
        return self.core.session()

    def expire(self) -> None:
        """The lease deadline passed: drop what arrives, close resumably (the next owner
        resumes), and tell the worker. Called by :meth:`GatewayConnection.pump`, which then
        carries out the close."""
        if self.expired:
            return
        self.expired = True
        self._stopping = True
        self.core.stop(keep_session=True)
        self.handler.lease_expired(self)

    def check_lease(self, now: float) -> None:
        """Close the shard if its lease deadline has passed (for shards that are quiet: a
        busy one notices at its next read)."""
        if self.expired or self.lease_until is None or now <= self.lease_until:
            return
        conn = self.connection
        if conn is not None and not conn.closed.done():
            conn.pump()
        else:
            self.expire()
            self._report()
            if self.task is not None and not self.task.done():
                self.task.cancel()

    def identify_sent(self, sent_at: float) -> None:
        permit, self._permit = self._permit, None
        if permit is not None:
            self.gate.release(permit, sent_at)

    def pause_reading(self) -> None:
        self.paused = True
        if self.connection is not None:
            self.connection.pause_reading()

    def resume_reading(self) -> None:
        self.paused = False
        if self.connection is not None:
            self.connection.resume_reading()

    @property
    def ready(self) -> bool:
        return self.core.phase is Phase.READY

    # ---------------------------------------------------------------- the loop

    async def run(self) -> int | None:
        """Connect, reconnect, until stopped (returns None) or a fatal close (returns its code)."""
        core = self.core
        loop = self.loop
        try:
            while True:
                plan = core.plan_connect(loop.time())
                if plan is None:
                    break
                delay = plan.at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if plan.identify:
                    self._permit = await self.gate.acquire(self.shard_id)
                try:
                    await self._connect_once(plan.url, plan.identify)
                finally:
                    permit, self._permit = self._permit, None
                    if permit is not None:
                        self.gate.release(permit, None)
                if core.phase is Phase.STOPPED:
                    break
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            conn = self.connection
            if conn is not None:
                conn.abort()
        return core.fatal_code

    async def _connect_once(self, url: str, identify: bool) -> None:
        core = self.core
        loop = self.loop
        try:
            conn = GatewayConnection(
                self,
                url,
                make_decompressor(core.config.compress, self.max_message_size),
                identify=identify,
            )
        except InvalidURI as exc:
            core.connect_failed(loop.time(), f"invalid gateway URL: {exc}")
            self._report()
            return
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        self.connects += 1
        try:
            async with asyncio.timeout(self.open_timeout):
                await loop.create_connection(
                    lambda: conn,
                    parts.hostname or "",
                    port,
                    ssl=_ssl_context(url),
                )
                await conn.opened
        except (OSError, TimeoutError, InvalidHandshake, ConnectionError) as exc:
            conn.abort()
            core.connect_failed(loop.time(), f"{type(exc).__name__}: {exc}")
            self._report()
            return
        self.connection = conn
        conn.pump()
        try:
            code = await conn.closed
        finally:
            self.connection = None
        action = core.connection_closed(loop.time(), code)
        self._report()
        if action is CloseAction.FATAL:
            log.error(
                "shard %d: Discord refused the session for good (%s): %s; not reconnecting",
                self.shard_id,
                describe_close(code),
                _FATAL_HINTS.get(code or 0, "check the configuration"),
            )

    def _report(self) -> None:
        """The core's events while no connection is open: only notices and command tickets
        can be among them (nothing to send, nothing to close)."""
        handler = self.handler
        for event in self.core.events_received():
            if type(event) not in (SendData, CloseRequest, IdentifySent):
                handler.shard_event(self, event)
        handler.end_of_batch(self.shard_id)  # the shard's state changed (closed, failed, ...)
