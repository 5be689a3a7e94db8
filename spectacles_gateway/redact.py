"""Keep secrets (the bot token, broker and Redis passwords) out of logs and printed config.

- :func:`redact_url` masks the password of one URL (``amqp://user:***@host/``).
- :class:`Redactor` masks a set of known secret strings, plus the password of any URL with
  credentials, in arbitrary text.
- :class:`RedactingFilter` applies a :class:`Redactor` to every log record: message, arguments,
  exception text and stack. Attach it to the *handlers* (a filter on a logger does not see
  records propagated from its children)::

      redactor = Redactor(settings.secrets())
      for handler in logging.getLogger().handlers:
          handler.addFilter(RedactingFilter(redactor))
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote

__all__ = ["MASK", "RedactingFilter", "Redactor", "redact_url", "url_password"]

MASK = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# ``scheme://user:password@`` anywhere in a text; the password stops at whitespace or quotes.
_URL_CREDENTIALS = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"<>]*:)(?P<password>[^\s@'\"<>]+)(?=@)"
)


def _split_password(url: str) -> tuple[str, str, str] | None:
    """``(before, password, after)`` for a URL with a non-empty password, else None.

    The user-info ends at the *last* ``@``, so a password with an unescaped ``@`` or ``/`` is
    still masked whole; an ``@`` later in the URL can only make the mask cover too much.
    """
    match = _SCHEME.match(url)
    start = match.end() if match else 0
    at = url.rfind("@", start)
    if at < 0:
        return None
    colon = url.find(":", start, at)
    if colon < 0 or colon + 1 == at:
        return None
    return url[: colon + 1], url[colon + 1 : at], url[at:]


def redact_url(url: str) -> str:
    """Replace the password (and only it) of ``url`` with ``***``.

    ``amqp://user:pass@host/`` -> ``amqp://user:***@host/``; ``redis://:pass@host`` ->
    ``redis://:***@host``; a URL without a password is returned unchanged.
    """
    parts = _split_password(url)
    if parts is None:
        return url
    before, _, after = parts
    return f"{before}{MASK}{after}"


def url_password(url: str) -> str | None:
    """The password of ``url`` as written (still percent-encoded), or None."""
    parts = _split_password(url)
    return None if parts is None else parts[1]


class Redactor:
    """Replaces known secrets, and passwords of URLs with credentials, with ``***``.

    Secrets are added once at start-up; :meth:`redact` may be called from any thread.
    A percent-encoded secret is also masked in its decoded form.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.add(*secrets)

    @property
    def secrets(self) -> frozenset[str]:
        return self._secrets

    def add(self, *secrets: str) -> None:
        """Add secrets (empty strings are ignored)."""
        new = set(self._secrets)
        for secret in secrets:
            if secret:
                new.add(secret)
                decoded = unquote(secret)
                if decoded:
                    new.add(decoded)
        if new == self._secrets:
            return
        # Longest first, so that a secret containing another is masked whole.
        ordered = sorted(new, key=lambda s: (-len(s), s))
        # Assign the pattern before the set: a concurrent reader sees either old or new state.
        self._pattern = re.compile("|".join(re.escape(s) for s in ordered))
        self._secrets = frozenset(new)

    def redact(self, text: str) -> str:
        """``text`` with every known secret and URL password replaced by ``***``."""
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        return _URL_CREDENTIALS.sub(rf"\g<head>{MASK}", text)


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record it sees; it never drops a record.

    The message is formatted here (``msg % args``), redacted, and stored back with empty
    ``args``; exception and stack text are rendered and redacted too, so the handler's
    formatter only ever sees redacted text.
    """

    def __init__(self, redactor: Redactor, name: str = "") -> None:
        super().__init__(name)
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor.redact
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep its pieces, redacted
            message = f"{record.msg!s} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
