"""The ``presence`` key: the Update Presence object sent with identify, as a TOML table or the
JSON text of ``DISCORD_PRESENCE``; the seed's single ``[presence.game]`` is still accepted."""

from __future__ import annotations

import json
from typing import Any

from . import converters as c

__all__ = ["MAX_PRESENCE_BYTES", "PRESENCE_STATUSES", "presence"]

#: Identify payloads are limited to 4096 bytes; the presence is only part of one.
MAX_PRESENCE_BYTES = 3072
PRESENCE_STATUSES = ("online", "dnd", "idle", "invisible", "offline")

_PRESENCE_KEYS = ("since", "activities", "status", "afk", "game")


def _activity(value: object, where: str) -> dict[str, Any]:
    allowed = 'an activity table such as { name = "x", type = 0 } (type 0 to 5)'
    if not isinstance(value, dict):
        raise c.Bad(allowed, subkey=where, value=value)
    activity = dict(value)
    name = activity.get("name")
    if not isinstance(name, str) or not name:
        raise c.Bad(allowed, subkey=f"{where}.name", value=name)
    kind = activity.setdefault("type", 0)
    if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind <= 5:
        raise c.Bad(allowed, subkey=f"{where}.type", value=kind)
    return activity


def _presence_item(presence: dict[str, Any], name: str, item: object) -> None:
    """Check and store one of ``since``, ``status``, ``afk`` or ``activities``."""
    if name == "since":
        if item is not None and (isinstance(item, bool) or not isinstance(item, int) or item < 0):
            raise c.Bad("a Unix time in milliseconds, or null", subkey="since", value=item)
    elif name == "status":
        if not isinstance(item, str) or item.lower() not in PRESENCE_STATUSES:
            raise c.Bad("one of " + ", ".join(PRESENCE_STATUSES), subkey="status", value=item)
        item = item.lower()
    elif name == "afk":
        if not isinstance(item, bool):
            raise c.Bad("true or false", subkey="afk", value=item)
    elif not isinstance(item, list):
        raise c.Bad("a list of activity tables", subkey="activities", value=item)
    else:
        item = [_activity(a, f"activities[{i}]") for i, a in enumerate(item)]
    presence[name] = item


def presence(value: object, raw: c.Raw, warnings: list[str]) -> dict[str, Any] | None:
    allowed = 'a table, or a JSON object such as {"status": "online"}'
    data = value
    if isinstance(value, str):
        try:
            data = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise c.Bad(allowed, reason=f"is not valid JSON ({exc})") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise c.Bad(allowed)
    if not data:
        return None
    result: dict[str, Any] = {"since": None, "activities": [], "status": "online", "afk": False}
    game: object = None
    for key, item in data.items():
        name = str(key).lower()
        if name in ("since", "status", "afk", "activities"):
            _presence_item(result, name, item)
        elif name == "game":
            game = None if item is None else _activity(item, "game")
        else:
            import difflib  # only for a key we do not know

            close = difflib.get_close_matches(name, _PRESENCE_KEYS, n=1, cutoff=0.6)
            suggestion = [f"presence.{k}" for k in close]
            warnings.append(c.unknown_key_warning(f"presence.{key}", raw.where, suggestion))
    if game is not None:
        if any(str(k).lower() == "activities" for k in data):
            warnings.append(
                f"config key 'presence.game' in {raw.where} is ignored: "
                "'presence.activities' is set too"
            )
        else:
            result["activities"] = [game]  # the seed's (and old libraries') single game
    limit = (
        f"a presence of at most {MAX_PRESENCE_BYTES} bytes of JSON "
        "(identify payloads are limited to 4096 bytes)"
    )
    try:
        encoded = len(json.dumps(result, allow_nan=False).encode())
    except RecursionError:
        raise c.Bad(limit, reason="is not allowed (nested too deeply)") from None
    except (TypeError, ValueError):  # TOML dates and times, inf, nan: not JSON
        raise c.Bad(limit, reason="is not allowed (a value JSON cannot hold)") from None
    if encoded > MAX_PRESENCE_BYTES:
        raise c.Bad(limit, reason=f"is too large ({encoded} bytes)")
    return result
