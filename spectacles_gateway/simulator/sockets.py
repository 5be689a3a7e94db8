"""Listening sockets and the open-file limit they need."""

from __future__ import annotations

import logging
import resource
import socket
from typing import Final

logger = logging.getLogger(__name__)

SPARE_FILES: Final = 64
"""Descriptors beyond the connections: listeners, the loop's own, logs, a TLS directory."""


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host


def bind(host: str, port: int) -> socket.socket:
    """One listening socket on exactly ``host`` (never every address a name resolves to),
    with the largest accept queue the system allows (thousands of shards connect at once)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def raise_open_files(connections: int) -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; warn when that cannot hold
    ``connections`` sockets (plus :data:`SPARE_FILES`). Returns the (soft, hard) limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
        else:
            logger.info("open-file limit raised from %d to %d", soft, hard)
            soft = hard
    needed = connections + SPARE_FILES
    if hard != resource.RLIM_INFINITY and soft < needed:
        logger.warning(
            "open-file limit %d is too low for %d connections (needs %d): raise the hard "
            "limit (ulimit -Hn, LimitNOFILE=) or expect accept() to fail with EMFILE",
            soft,
            connections,
            needed,
        )
    return soft, hard
