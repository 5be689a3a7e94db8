"""Gateway URL building (discord.md §1): the query goes on the gateway and the resume URL."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["build_gateway_url", "tls_kept"]


def build_gateway_url(
    base: str, *, version: int, encoding: str = "json", compress: str | None = None
) -> str:
    """Return ``base`` with ``v``, ``encoding`` and ``compress`` set in its query.

    ``base`` may come bare (``wss://gateway.discord.gg``, as ``resume_gateway_url`` does), with a
    trailing slash, or already carrying a query; an empty path becomes ``/`` and existing query
    parameters other than ours are kept. ``compress=None`` (or ``"none"``) removes ``compress``.

    >>> build_gateway_url("wss://gateway-us-east1-b.discord.gg", version=10, compress="zstd-stream")
    'wss://gateway-us-east1-b.discord.gg/?v=10&encoding=json&compress=zstd-stream'
    """
    parts = urlsplit(base)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"gateway URL must use ws:// or wss://, got {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise ValueError("gateway URL has no host")
    ours = {"v", "encoding", "compress"}
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ours]
    query[:0] = [("v", str(version)), ("encoding", encoding)]
    if compress and compress != "none":
        query.insert(2, ("compress", compress))
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", urlencode(query), ""))


def tls_kept(url: str, configured: str) -> bool:
    """May we connect to ``url``, a URL Discord sent us (a resume URL, ``/gateway/bot``'s)?
    Only over TLS, unless what we were configured with is plain too (a local simulator): the
    token must never go out in clear text because an answer said so."""
    return url.startswith("wss://") or (
        url.startswith("ws://") and configured.startswith(("ws://", "http://"))
    )
