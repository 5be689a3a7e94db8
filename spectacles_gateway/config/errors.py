"""How loading the configuration ends when it gives no settings: an error, help, version."""

from __future__ import annotations

__all__ = ["ConfigError", "HelpRequested", "VersionRequested", "show"]


def show(value: object) -> str:
    """``repr(value)``, cut to 120 characters: an error message stays one readable line."""
    try:
        text = repr(value)
    except RecursionError:  # a hostile file nested thousands deep
        import reprlib

        text = reprlib.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class ConfigError(Exception):
    """Bad configuration; ``str(err)`` is one line that says what to change.

    ``key`` is the dotted key (``""`` for problems with the file or the command line as a
    whole), ``value`` the offending value (``"***"`` or a redacted URL when it is a secret),
    ``allowed`` what would have been accepted, ``env`` the key's environment name (or where
    else the value came from, e.g. ``systemd credential discord_token``).
    """

    def __init__(
        self,
        key: str,
        value: object,
        allowed: str,
        *,
        env: str | None = None,
        reason: str = "is not allowed",
        message: str | None = None,
    ) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.env = env
        self.reason = reason
        if message is None:
            if env is None:
                head = f"config key {key!r}"
            elif " " in env:
                head = f"config key {key!r} ({env})"
            else:
                head = f"config key {key!r} (env {env})"
            message = f"{head}: {show(value)} {reason}; expected {allowed}"
        self.message = " ".join(message.split())
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def with_value(self, value: object) -> ConfigError:
        """The same error showing ``value`` (the value as given rather than as converted)."""
        return ConfigError(self.key, value, self.allowed, env=self.env, reason=self.reason)


class HelpRequested(Exception):
    """``-h``/``--help`` was given; ``text`` is the usage to print (then exit 0)."""

    def __init__(self, text: str) -> None:
        super().__init__("help requested")
        self.text = text


class VersionRequested(HelpRequested):
    """``--version`` was given; ``text`` is ``spectacles-gateway <version>`` and a newline."""
