"""Exit codes, part of the command-line interface (product.md "Command line").

Both the supervisor and its workers use them; ``systemd``'s ``RestartPreventExitStatus=78`` and
orchestrators rely on 78 meaning "do not restart: the configuration or Discord said no for good".
"""

from __future__ import annotations

__all__ = ["EX_CONFIG", "EX_IOERR", "EX_OK", "EX_UNAVAILABLE"]

EX_OK = 0
#: Discord's API could not be reached at start-up (retrying may help).
EX_UNAVAILABLE = 1
#: The stdio broker's output (stdout) went away: nothing can be delivered any more.
EX_IOERR = 74
#: Bad configuration at start-up, or a final refusal by Discord (4004, 4010-4014, HTTP 401).
#: Never used for a runtime error: a bad record at run time is dropped and counted instead.
EX_CONFIG = 78
