"""The Redis streams broker against a real Redis: wire format, confirms, consumer groups,
trimming, commands in and out, outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from spectacles_gateway.brokers.redis_streams import RedisStreamsBroker
from spectacles_gateway.brokers.wire import msgpack_string
from spectacles_gateway.metrics import REGISTRY
from spectacles_gateway.redis_link import redis_client

from .gwtest import t, wait_until
from .support.brokers import Driver
from .support.redis import (
    REDIS_URL,
    PrivateRedis,
    cleanup,
    raw_client,
    settings_for,
    unique_prefix,
)


class Bound:
    """What the worker would be: records confirms, pauses and commands."""

    def __init__(self) -> None:
        self.confirms: list[tuple[int, str, int]] = []
        self.paused = 0
        self.resumed = 0
        self.commands: list[tuple[bytes, Callable[[], None]]] = []
        self.shard_commands: list[tuple[int, bytes, Callable[[], None]]] = []

    def bind(self, broker: RedisStreamsBroker, *, auto_ack: bool = True) -> None:
        def commands(body: bytes, ack: Callable[[], None]) -> None:
            self.commands.append((body, ack))
            if auto_ack:
                ack()

        def shard_commands(shard_id: int, body: bytes, ack: Callable[[], None]) -> None:
            self.shard_commands.append((shard_id, body, ack))
            if auto_ack:
                ack()

        self.driver = Driver(
            broker,
            confirm=lambda shard, session, seq: self.confirms.append((shard, session, seq)),
            pause=self._pause,
            resume=self._resume,
            commands=commands,
            shard_commands=shard_commands,
        )

    def flush(self) -> None:
        self.driver.flush()

    def _pause(self) -> None:
        self.paused += 1

    def _resume(self) -> None:
        self.resumed += 1

    def confirmed(self, shard_id: int) -> int | None:
        seqs = [seq for s, _, seq in self.confirms if s == shard_id]
        return max(seqs) if seqs else None


@contextlib.asynccontextmanager
async def open_broker(
    prefix: str,
    url: str = REDIS_URL,
    *,
    bound: Bound | None = None,
    auto_ack: bool = True,
    **kwargs: Any,
) -> AsyncIterator[tuple[RedisStreamsBroker, Bound]]:
    settings = settings_for(prefix, url=url)
    kwargs.setdefault("stream_prefix", prefix)
    kwargs.setdefault("group", "gateway")
    broker = RedisStreamsBroker(
        redis_client(settings),
        redis_client(settings, max_connections=1),
        url=url,
        **kwargs,
    )
    bound = bound or Bound()
    bound.bind(broker, auto_ack=auto_ack)
    await broker.start()
    try:
        yield broker, bound
    finally:
        await broker.aclose()


def event_data(i: int) -> bytes:
    return b'{"id":"%d","content":"hello %d","guild_id":"81384788765712384"}' % (i, i)


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def read_all(r: Redis, stream: str) -> list[dict[bytes, bytes]]:
    entries: Any = await r.xrange(stream)
    return [fields for _, fields in entries]


# ---------------------------------------------------------------------------------- output


async def test_events_go_to_one_stream_per_event_with_the_amqp_body_and_are_confirmed() -> None:
    with cleanup(unique_prefix()) as prefix:
        async with open_broker(prefix) as (broker, bound), raw_client() as r:
            assert broker.connected
            for seq in range(1, 6):
                broker.publish(0, "MESSAGE_CREATE", seq, event_data(seq), "sess-a")
            broker.publish(1, "GUILD_CREATE", 7, b'{"id":"1"}', "sess-b")
            bound.flush()
            assert await broker.drain(t(5))
            entries = await read_all(r, f"{prefix}MESSAGE_CREATE")
            assert [e[b"data"] for e in entries] == [
                msgpack_string(event_data(i)) for i in range(1, 6)
            ]
            assert entries[0] == {
                b"data": msgpack_string(event_data(1)),
                b"shard_id": b"0",
                b"seq": b"1",
                b"generation": b"0",
                b"id": b"sess-a:1",
            }
            # What @spectacles/brokers consumers do with the body: a string of JSON.
            assert json.loads(msgspec.msgpack.decode(entries[4][b"data"]))["id"] == "5"
            (guild,) = await read_all(r, f"{prefix}GUILD_CREATE")
            assert guild[b"id"] == b"sess-b:7" and guild[b"shard_id"] == b"1"
            assert bound.confirmed(0) == 5 and bound.confirmed(1) == 7
            assert (0, "sess-a", 5) in bound.confirms


async def test_json_body_format() -> None:
    with cleanup(unique_prefix()) as prefix:
        async with open_broker(prefix, body_format="json") as (broker, _), raw_client() as r:
            broker.publish(0, "MESSAGE_CREATE", 1, event_data(1), "s")
            assert await broker.drain(t(5))
            (entry,) = await read_all(r, f"{prefix}MESSAGE_CREATE")
            assert entry[b"data"] == event_data(1)


async def test_every_consumer_group_sees_every_event_once() -> None:
    with cleanup(unique_prefix()) as prefix:
        stream = f"{prefix}MESSAGE_CREATE"
        async with raw_client() as r:
            for group in ("bot", "analytics"):
                await r.xgroup_create(stream, group, id="0", mkstream=True)
            async with open_broker(prefix) as (broker, bound):
                seen: dict[str, list[bytes]] = {"bot": [], "analytics": []}
                stop = asyncio.Event()

                async def consume(group: str, consumers: list[str]) -> None:
                    # A flag, not cancel(): redis-py on 3.11 may swallow a cancellation.
                    while not stop.is_set():
                        for consumer in consumers:
                            reply: Any = await r.xreadgroup(
                                group, consumer, {stream: ">"}, count=200, block=100
                            )
                            for _, entries in reply or ():
                                seen[group] += [fields[b"id"] for _, fields in entries]
                                await r.xack(stream, group, *[i for i, _ in entries])

                readers = [
                    asyncio.create_task(consume("bot", ["bot-1", "bot-2"])),
                    asyncio.create_task(consume("analytics", ["a-1"])),
                ]
                total = 3000
                for seq in range(1, total + 1):
                    broker.publish(seq % 3, "MESSAGE_CREATE", seq, event_data(seq), "s")
                    if seq % 50 == 0:
                        bound.flush()
                        await asyncio.sleep(0.005)
                assert await broker.drain(t(10))
                try:
                    await wait_until(
                        lambda: all(len(v) >= total for v in seen.values()), 10, "the consumers"
                    )
                finally:
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*readers), t(5))
                for ids in seen.values():
                    assert len(ids) == total == len(set(ids))
                assert bound.confirmed(1) == total - 2
                assert all(p["pending"] == 0 for p in await r.xinfo_groups(stream))


async def test_streams_stay_trimmed_to_about_maxlen() -> None:
    with cleanup(unique_prefix()) as prefix:
        async with open_broker(prefix, maxlen=200) as (broker, bound), raw_client() as r:
            for seq in range(1, 5001):
                broker.publish(0, "MESSAGE_CREATE", seq, event_data(seq), "s")
                if seq % 500 == 0:
                    bound.flush()
                    assert await broker.drain(t(5))
                    # MAXLEN ~ trims whole nodes (100 entries each by default).
                    assert await r.xlen(f"{prefix}MESSAGE_CREATE") <= 200 + 100


# ---------------------------------------------------------------------------------- input


async def test_send_commands_are_acknowledged_only_once_handled() -> None:
    with cleanup(unique_prefix()) as prefix:
        send = f"{prefix}SEND"
        async with open_broker(prefix, auto_ack=False) as (broker, bound), raw_client() as r:
            body = json.dumps({"shard_id": 0, "packet": {"op": 3, "d": {}}}).encode()
            await r.xadd(send, {"data": msgpack_string(body)})
            await r.xadd(send, {"not-data": b"x"})  # malformed: dropped and acknowledged
            await wait_until(lambda: len(bound.commands) == 1, 5, "the command")
            assert bound.commands[0][0] == msgpack_string(body)
            # The malformed one, read after it, was acknowledged: the command was not.
            await wait_until(lambda: broker.commands.acked == 1, 5, "the malformed one's XACK")
            pending = await r.xpending(send, "gateway")
            assert pending["pending"] == 1  # not acknowledged before the worker says so
            bound.commands[0][1]()
            await wait_until(lambda: broker.commands.acked == 2, 5, "the command's XACK")
            assert (await r.xpending(send, "gateway"))["pending"] == 0


async def test_commands_written_before_the_first_gateway_ran_are_delivered() -> None:
    with cleanup(unique_prefix()) as prefix:
        async with raw_client() as r:
            await r.xadd(f"{prefix}SEND", {"data": b'{"packet":{"op":3,"d":{}}}'})
        async with open_broker(prefix) as (_, bound):
            await wait_until(lambda: len(bound.commands) == 1, 5, "the early command")
        # The group keeps its place: the next broker gets the next command, not the first.
        later = b'{"packet":{"op":4,"d":{}}}'
        async with open_broker(prefix) as (_, bound), raw_client() as r:
            await r.xadd(f"{prefix}SEND", {"data": later})
            await wait_until(lambda: len(bound.commands) == 1, 5, "the later command")
            assert [body for body, _ in bound.commands] == [later]


async def test_commands_left_pending_by_a_dead_worker_are_claimed() -> None:
    with cleanup(unique_prefix()) as prefix:
        send = f"{prefix}SEND"
        async with raw_client() as r:
            await r.xgroup_create(send, "gateway", id="0", mkstream=True)
            await r.xadd(send, {"data": b'{"packet":{"op":3,"d":{"n":1}}}'})
            # Another worker read it, then died before sending it.
            await r.xreadgroup("gateway", "dead-host:1", {send: ">"}, count=10)
            async with open_broker(prefix, message_timeout=0.5) as (broker, bound):
                await wait_until(lambda: len(bound.commands) == 1, 5, "the claimed command")
                await wait_until(lambda: broker.commands.acked == 1, 5, "its XACK")
                assert (await r.xpending(send, "gateway"))["pending"] == 0
                rounds = broker.commands.claim_rounds
                await wait_until(
                    lambda: broker.commands.claim_rounds >= rounds + 2, 5, "two more claim rounds"
                )
                assert len(bound.commands) == 1  # claimed once, not again and again


async def test_a_command_for_another_workers_shard_goes_to_its_stream() -> None:
    with cleanup(unique_prefix()) as prefix:
        async with (
            open_broker(prefix, shard_ids=(0, 1)) as (a, _),
            open_broker(prefix, shard_ids=(2, 3), consumer="other:2") as (_, bound_b),
            raw_client() as r,
        ):
            acked: list[bool] = []
            assert a.forward(3, b'{"op":3,"d":{}}', lambda: acked.append(True))
            await wait_until(lambda: acked == [True], 5, "the forward")
            await wait_until(lambda: len(bound_b.shard_commands) == 1, 5, "delivery on B")
            shard_id, body, _ = bound_b.shard_commands[0]
            assert (shard_id, body) == (3, b'{"op":3,"d":{}}')
            assert await r.xlen(f"{prefix}SEND:3") == 1


# ---------------------------------------------------------------------------------- outages


async def test_redis_restart_buffers_pauses_republishes_and_reads_again(
    private_redis: PrivateRedis,
) -> None:
    prefix = unique_prefix()
    url = private_redis.url
    reconnects = _sample("gateway_broker_reconnects_total", broker="redis")
    failures = _sample("gateway_publish_failures_total", reason="redis_unavailable")
    async with open_broker(prefix, url, buffer=100) as (broker, bound), raw_client(url) as r:
        assert _sample("gateway_broker_connected") == 1
        for seq in range(1, 11):
            broker.publish(0, "MESSAGE_CREATE", seq, event_data(seq), "s")
        assert await broker.drain(t(5))
        private_redis.stop(save=True)  # a restart that keeps its data
        for seq in range(11, 151):
            broker.publish(0, "MESSAGE_CREATE", seq, event_data(seq), "s")
            bound.flush()
            await asyncio.sleep(0.002)
        await wait_until(lambda: not broker.connected, 5, "the broker to notice")
        assert _sample("gateway_broker_connected") == 0
        assert bound.paused == 1  # 100 unconfirmed: the shards stop reading
        await wait_until(lambda: _sample("gateway_broker_buffered_events") >= 100, 5, "gauge")
        assert _sample("gateway_publish_failures_total", reason="redis_unavailable") > failures
        assert bound.confirmed(0) == 10
        await asyncio.sleep(0.5)
        private_redis.start()
        assert await broker.drain(t(10))
        assert broker.connected and bound.resumed == 1
        assert bound.confirmed(0) == 150
        assert _sample("gateway_broker_connected") == 1
        assert _sample("gateway_broker_buffered_events") == 0
        assert _sample("gateway_broker_reconnects_total", broker="redis") == reconnects + 1
        ids = [int(f[b"seq"]) for f in await read_all(r, f"{prefix}MESSAGE_CREATE")]
        assert set(ids) == set(range(1, 151))

        # Now a restart that loses everything, the consumer group included.
        private_redis.stop(save=False)
        private_redis.start()
        await r.xadd(f"{prefix}SEND", {"data": b'{"packet":{"op":3,"d":{}}}'})
        await wait_until(lambda: len(bound.commands) >= 1, 10, "a command after the restart")


@pytest.mark.parametrize("fmt", ["msgpack"])
async def test_a_refused_entry_is_dropped_not_retried_forever(fmt: str) -> None:
    with cleanup(unique_prefix()) as prefix:
        async with raw_client() as r:
            await r.set(f"{prefix}TYPING_START", "not a stream")
            async with open_broker(prefix, body_format=fmt) as (broker, bound):
                broker.publish(0, "TYPING_START", 1, b"{}", "s")
                broker.publish(0, "MESSAGE_CREATE", 2, event_data(2), "s")
                assert await broker.drain(t(5))
                assert bound.confirmed(0) == 2
                assert await r.xlen(f"{prefix}MESSAGE_CREATE") == 1
