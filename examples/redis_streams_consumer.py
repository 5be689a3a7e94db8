"""A Python consumer of spectacles-gateway's Redis streams output (docs/consumers.md).

    REDIS_URL=redis://localhost:6379/0 BROKER_GROUP=bot REDIS_STREAM_PREFIX= \\
        python examples/redis_streams_consumer.py MESSAGE_CREATE

Reads the stream ``<prefix><EVENT>`` through the consumer group ``BROKER_GROUP`` (created if
missing, from the start of the stream), as consumer ``<hostname>:<pid>``: several copies of this
program share the work, and entries a dead copy left pending are claimed after
``CLAIM_AFTER_MS``. Each entry's ``data`` is a msgpack string holding the JSON of Discord's ``d``;
its ``id`` field (``<session>:<seq>``) is the same for an event and its replays after a resume,
so an id seen before is dropped. Every entry is acknowledged (``XACK``) once handled. Every
``STATUS_EVERY`` new events (default 50) a presence update goes back on the ``<prefix>SEND``
stream, routed by the event's guild. Prints one JSON line per event, duplicate and command.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import OrderedDict
from typing import Any

import msgspec
import redis


def out(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def presence(count: int) -> dict[str, Any]:
    activity = {"name": f"{count} events", "type": 3}
    return {"since": None, "activities": [activity], "status": "online", "afk": False}


def main(events: list[str]) -> None:
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    group = os.environ.get("BROKER_GROUP", "bot")
    prefix = os.environ.get("REDIS_STREAM_PREFIX", "")
    every = int(os.environ.get("STATUS_EVERY", "50"))
    claim_after = int(os.environ.get("CLAIM_AFTER_MS", "60000"))
    consumer = f"{socket.gethostname()}:{os.getpid()}"
    streams = [prefix + event for event in events]
    for stream in streams:
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    seen: OrderedDict[bytes, None] = OrderedDict()
    handled = 0
    out(type="ready")

    def handle(stream: bytes, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        nonlocal handled
        event = stream.decode()[len(prefix) :]
        message_id = fields.get(b"id", entry_id)
        if message_id in seen:
            out(type="duplicate", event=event, message_id=message_id.decode())
            return
        seen[message_id] = None
        if len(seen) > 100_000:
            seen.popitem(last=False)
        data = json.loads(msgspec.msgpack.decode(fields[b"data"]))
        handled += 1
        out(
            type="event",
            event=event,
            message_id=message_id.decode(),
            shard_id=int(fields.get(b"shard_id", b"-1")),
            id=data.get("id") if isinstance(data, dict) else None,
        )
        guild_id = data.get("guild_id") if isinstance(data, dict) else None
        if handled % every == 0 and guild_id:
            command = {"guild_id": guild_id, "packet": {"op": 3, "d": presence(handled)}}
            client.xadd(f"{prefix}SEND", {"data": json.dumps(command)})
            out(type="command", guild_id=guild_id, count=handled)

    try:
        while True:
            for stream in streams:  # what a dead consumer left behind
                _, claimed, *_ = client.xautoclaim(stream, group, consumer, claim_after, "0-0")
                for entry_id, fields in claimed:
                    handle(stream.encode(), entry_id, fields)
                    client.xack(stream, group, entry_id)
            replies = client.xreadgroup(
                group, consumer, dict.fromkeys(streams, ">"), count=100, block=1000
            )
            for stream, entries in replies or []:
                for entry_id, fields in entries:
                    handle(stream, entry_id, fields)
                    client.xack(stream, group, entry_id)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:] or ["MESSAGE_CREATE"])
