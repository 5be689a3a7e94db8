"""The systemd example run as systemd would run it: the environment file's settings
(config/gateway.env.example: RabbitMQ and the Redis store) and the token only as the unit's
credential, ``$CREDENTIALS_DIRECTORY/discord_token`` (``LoadCredential=``). The gateway must
read the token from there, publish into RabbitMQ, keep its session in Redis, and print the token
nowhere. (The image's Docker secret is covered in tests/test_docker.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import redis

from .gwproc import SECRET, gateway
from .gwtest import simulator, wait_until
from .support.brokers import AMQP_URL, channel, delete_group, depth, unique_group
from .test_consumers import REDIS_URL
from .test_deploy import CONFIG, env_example, unit_value


async def test_the_unit_and_its_env_example_run_with_the_token_as_a_credential(
    tmp_path: Path,
) -> None:
    name, _, _source = unit_value("Service", "LoadCredential").partition(":")
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / name).write_text(SECRET)
    group = unique_group()
    settings = {
        k: v for k, (v, is_set) in env_example(CONFIG / "gateway.env.example").items() if is_set
    }
    assert settings["BROKER_TYPE"] == "amqp" and settings["SHARD_STORE_TYPE"] == "redis"
    # This machine's brokers instead of the example's hosts and passwords; a private group.
    settings.update(AMQP_URL=AMQP_URL, REDIS_URL=REDIS_URL, BROKER_GROUP=group)
    settings["SHARD_STORE_PREFIX"] = f"{group}:"
    queue = f"{group}:MESSAGE_CREATE"
    with channel() as ch:
        ch.exchange_declare(group, "direct", durable=True)
        ch.queue_declare(queue, durable=True)
        ch.queue_bind(queue, group, "MESSAGE_CREATE")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        async with simulator(token=SECRET, rate=40) as sim:
            host = sim.http_base.split("://", 1)[1].split("/", 1)[0]
            env = {
                "PATH": os.environ.get("PATH", ""),
                "CREDENTIALS_DIRECTORY": str(credentials),
                "DISCORD_API_PROTOCOL": "http",
                "DISCORD_API_HOST": host,
                "DISCORD_EVENTS": "MESSAGE_CREATE",
                **{k: v for k, v in settings.items() if k != "DISCORD_EVENTS"},
            }
            assert "DISCORD_TOKEN" not in env
            async with gateway(env, "--shard-count", "1") as gw:
                await wait_until(lambda: depth(queue) >= 20, 30, "events in RabbitMQ", gw.log)
                await wait_until(
                    lambda: client.exists(f"{group}:0session") == 1,
                    15,
                    "the session in Redis",
                    gw.log,
                )
                code = await gw.stop()
            log = gw.log()
        assert code == 0, log[-3000:]
        assert sim.ledger.identifies
        assert SECRET not in log and SECRET not in b"".join(gw.lines).decode()
    finally:
        keys = list(client.scan_iter(match=f"{group}:*"))
        if keys:
            client.delete(*keys)
        client.close()
        delete_group(group, [queue], shards=1)
