"""The ``spectacles-supervise`` command: :func:`supervisor.cli.main` in a process that leaves
``typing_extensions`` unloaded.

msgspec imports ``typing_extensions`` whenever it is installed (for its ``get_type_hints``, which
our types do not need), and ``typing_extensions`` loads ``inspect``, ``ast`` and ``dis``: about
1.2 MiB of a supervisor of about 20, for nothing. None of our run-time dependencies needs it, but
many environments have it (installed for test tools, aiohttp, pydantic, ...). The workers are
interpreters of their own (``python -m spectacles_gateway.workerproc``) and are not affected.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> int:
    # None in sys.modules makes `import typing_extensions` raise ImportError, which msgspec
    # handles (it falls back on `typing`). Set before msgspec is imported, by the import below.
    sys.modules.setdefault("typing_extensions", None)  # type: ignore[arg-type]
    from .cli import main as run

    return run()
