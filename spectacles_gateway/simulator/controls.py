"""The control endpoints of a running simulator, under ``/control/`` on its port.

Parameters go in the query string; every answer is JSON. ``spectacles-simulator --control
URL ...`` calls them from a shell.

=======  =========================================  ==========================================
method   path                                       does
=======  =========================================  ==========================================
GET      ``/control/stats``                         :meth:`Simulator.stats`
POST     ``/control/rate?rate=R``                   :meth:`Simulator.set_rate`
POST     ``/control/recommended_shards?shards=N``   :meth:`Simulator.set_recommended_shards`
POST     ``/control/guilds?add=N``                  :meth:`Simulator.add_guilds`
POST     ``/control/guild_rate?rate=R``             :meth:`Simulator.set_guild_rate`
POST     ``/control/session_start_limit?remaining=N&total=N&reset_after=MS``
                                                    :meth:`Simulator.set_session_start_limit`
=======  =========================================  ==========================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spectacles_gateway.simulator.rest import Control

if TYPE_CHECKING:
    from spectacles_gateway.simulator.server import Simulator


def _optional_int(query: dict[str, str], name: str) -> int | None:
    return int(query[name]) if name in query else None


def endpoints(sim: Simulator) -> dict[tuple[str, str], Control]:
    """``(method, name) -> handler`` for :attr:`Rest.controls`."""

    def rate(query: dict[str, str]) -> Any:
        sim.set_rate(float(query["rate"]))
        return {"rate": float(query["rate"])}

    def recommended(query: dict[str, str]) -> Any:
        sim.set_recommended_shards(int(query["shards"]))
        return {"recommended_shards": sim.recommended_shards}

    def guilds(query: dict[str, str]) -> Any:
        try:
            added = sim.add_guilds(int(query["add"]))
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
        return {"added": [str(g) for g in added], "guilds": len(sim.guild_ids)}

    def guild_rate(query: dict[str, str]) -> Any:
        sim.set_guild_rate(float(query["rate"]))
        return {"guild_rate": float(query["rate"])}

    def session_start_limit(query: dict[str, str]) -> Any:
        return sim.set_session_start_limit(
            remaining=_optional_int(query, "remaining"),
            total=_optional_int(query, "total"),
            reset_after_ms=_optional_int(query, "reset_after"),
        )

    return {
        ("GET", "stats"): lambda _: sim.stats(),
        ("POST", "rate"): rate,
        ("POST", "recommended_shards"): recommended,
        ("POST", "guilds"): guilds,
        ("POST", "guild_rate"): guild_rate,
        ("POST", "session_start_limit"): session_start_limit,
    }
