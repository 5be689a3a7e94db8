"""A Python consumer of spectacles-gateway's RabbitMQ output, with pika (docs/consumers.md).

    AMQP_URL=amqp://guest:guest@localhost:5672/%2F BROKER_GROUP=gateway \\
        python examples/amqp_consumer.py MESSAGE_CREATE GUILD_CREATE

For each event it declares the durable queue ``<group>:<EVENT>`` bound to the exchange
``<group>`` (exactly as the Spectacles libraries do, so it shares the queue with them), decodes
the body (a msgpack string holding the JSON of Discord's ``d``), drops an event whose
``message_id`` it has already handled (a resume replays what was not yet confirmed), and acks it.
Every ``STATUS_EVERY`` new events (default 50) it sends a command back: a presence update that
says how many events it has seen, as a ``SEND`` routed by the event's guild. Prints one JSON line
per event, duplicate and command on stdout.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from typing import Any

import msgspec
import pika


class Seen:
    """The last ``size`` message ids, for dropping duplicates without growing forever."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self.ids: OrderedDict[str, None] = OrderedDict()

    def add(self, message_id: str) -> bool:
        """False if ``message_id`` was seen already."""
        if message_id in self.ids:
            return False
        self.ids[message_id] = None
        if len(self.ids) > self.size:
            self.ids.popitem(last=False)
        return True


def out(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def presence(count: int) -> dict[str, Any]:
    activity = {"name": f"{count} events", "type": 3}  # "Watching 1234 events"
    return {"since": None, "activities": [activity], "status": "online", "afk": False}


def main(events: list[str]) -> None:
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")
    group = os.environ.get("BROKER_GROUP", "gateway")
    every = int(os.environ.get("STATUS_EVERY", "50"))
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(group, "direct", durable=True)
    channel.basic_qos(prefetch_count=100)
    seen = Seen()
    handled = 0

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        nonlocal handled
        message_id = properties.message_id
        if message_id is not None and not seen.add(message_id):
            out(type="duplicate", event=method.routing_key, message_id=message_id)
            ch.basic_ack(method.delivery_tag)
            return
        data = json.loads(msgspec.msgpack.decode(body))  # msgpack string -> JSON text -> d
        headers = properties.headers or {}
        handled += 1
        out(
            type="event",
            event=method.routing_key,
            message_id=message_id,
            shard_id=headers.get("shard_id"),
            id=data.get("id") if isinstance(data, dict) else None,
        )
        guild_id = data.get("guild_id") if isinstance(data, dict) else None
        if handled % every == 0 and guild_id:
            command = {"guild_id": guild_id, "packet": {"op": 3, "d": presence(handled)}}
            # Commands are JSON; wrapping them in a msgpack string, as Spectacles bots do,
            # works too.
            ch.basic_publish(group, "SEND", json.dumps(command).encode())
            out(type="command", guild_id=guild_id, count=handled)
        ch.basic_ack(method.delivery_tag)

    for event in events:
        queue = f"{group}:{event}"
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, group, event)
        channel.basic_consume(queue, on_message)
    out(type="ready")
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        channel.stop_consuming()
    connection.close()


if __name__ == "__main__":
    main(sys.argv[1:] or ["MESSAGE_CREATE"])
