"""An operator's reshard request to a fleet (``spectacles-supervise reshard`` with
``FLEET_NAME``): written to Redis and announced; whichever member takes the reshard lock runs
it (:mod:`.agent`).

``python -m spectacles_gateway.fleet.request reshard [--to N] [settings arguments]``: the
supervisor's command runs this in a child process, so the Redis client is never loaded by the
``supervisor`` package. Prints the answer line; exit 0, or 1 when Redis did not answer.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .keys import FleetKeys

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["REQUEST_TTL", "ask_fleet", "main"]

#: An operator's request nobody took is forgotten after this long (seconds).
REQUEST_TTL = 3600


def ask_fleet(settings: Settings, to: int | None) -> str:
    """Leave the request for the fleet's members; the answer line for the operator."""
    from ..redis_link import redis_client

    keys = FleetKeys(settings.shard_store.prefix, settings.fleet.name)
    value = json.dumps({"to": to, "at": round(time.time(), 3)})

    async def ask() -> int:
        client = redis_client(settings, max_connections=1, name="spectacles-reshard")
        try:
            await client.set(keys.reshard_ask, value, ex=REQUEST_TTL)
            return int(await client.publish(keys.reshard_ask, value))
        finally:
            await client.aclose()

    listening = asyncio.run(ask())
    target = f"to {to} shards" if to is not None else "to Discord's recommended count"
    return f"asked fleet {settings.fleet.name} to reshard {target} ({listening} members listening)"


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from ..config import ReshardCommand, load
    from ..redis_link import REDIS_ERRORS, describe_error

    loaded = load(list(sys.argv[1:] if argv is None else argv), os.environ)
    command = loaded.cli.command
    to = command.to if isinstance(command, ReshardCommand) else None
    try:
        print(ask_fleet(loaded.settings, to))
    except REDIS_ERRORS as exc:
        print(f"Redis did not take the request: {describe_error(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
