"""Keep secrets (the bot token, broker and Redis passwords) out of logs and printed config.

- :class:`SecretStr` holds the token: its ``repr``/``str`` are ``***``, and only
  :meth:`SecretStr.get_secret_value` gives the value.
- :func:`redact_url` masks the secrets of one URL: the password of its user-info
  (``amqp://user:***@host/``), or the whole user-info on request, and the values of
  password-like query parameters (``?password=***``, see :data:`SECRET_PARAM_WORDS`).
  :func:`url_secrets` lists those secrets, for a :class:`Redactor`.
- :class:`Redactor` masks a set of known secret strings, plus the password and the
  password-like query parameters of any URL, in arbitrary text.
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

__all__ = [
    "MASK",
    "SECRET_PARAM_WORDS",
    "RedactingFilter",
    "Redactor",
    "SecretStr",
    "redact_url",
    "url_password",
    "url_secrets",
]

MASK = "***"

#: A query parameter whose name contains one of these (case-insensitively) holds a secret:
#: ``password``, ``pass``, ``passwd``, ``pwd``, ``secret``, ``token``, ``access_token``,
#: ``auth``, ``api_key``, ``credentials``, ``sig``... Masking a harmless one costs nothing.
SECRET_PARAM_WORDS = ("pass", "pwd", "secret", "token", "auth", "key", "credential", "sig")
# ``?name=value`` or ``&name=value`` (also ``;``) anywhere in a text, for a secret-like name.
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;][A-Za-z0-9_.\-]*(?:"
    + "|".join(SECRET_PARAM_WORDS)
    + r")[A-Za-z0-9_.\-]*=)(?P<value>[^&;#\s'\"<>]+)",
    re.IGNORECASE,
)
#: A user name masked as a whole (``whole_userinfo``) is a secret for a :class:`Redactor` only
#: from this length on: masking every "u" or "bot" in every log line would help no one.
_MIN_NAME_SECRET = 8


class SecretStr:
    """A string that never shows itself: ``repr()`` and ``str()`` give ``***``.

    ``get_secret_value()`` is the only way to the value. Equal when the values are equal,
    so settings that hold one still compare by value.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"SecretStr({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretStr):
            return NotImplemented
        return self._value == other._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# ``scheme://user:password@`` anywhere in a text; the password stops at whitespace or quotes.
_URL_CREDENTIALS = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"<>]*:)(?P<password>[^\s@'\"<>]+)(?=@)"
)


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """``(scheme://, user-info, @rest)`` for a URL with a non-empty user-info, else None."""
    match = _SCHEME.match(url)
    start = match.end() if match else 0
    at = url.rfind("@", start)
    if at <= start:
        return None
    return url[:start], url[start:at], url[at:]


def _split_password(url: str) -> tuple[str, str, str] | None:
    """``(before, password, after)`` for a URL with a non-empty password, else None.

    The user-info ends at the *last* ``@``, so a password with an unescaped ``@`` or ``/`` is
    still masked whole; an ``@`` later in the URL can only make the mask cover too much.
    """
    parts = _split_userinfo(url)
    if parts is None:
        return None
    head, userinfo, rest = parts
    user, colon, password = userinfo.partition(":")
    if not colon or not password:
        return None
    return f"{head}{user}:", password, rest


def redact_url(url: str, *, whole_userinfo: bool = False) -> str:
    """``url`` with its secrets replaced by ``***``.

    The password of the user-info (``amqp://user:pass@host/`` -> ``amqp://user:***@host/``,
    ``redis://:pass@host`` -> ``redis://:***@host``), or with ``whole_userinfo`` the user-info
    as a whole (``wss://name:pass@host`` -> ``wss://***@host``), and the value of every
    password-like query parameter (``redis://host/0?password=pw`` ->
    ``redis://host/0?password=***``). A URL without secrets is returned unchanged.
    """
    if whole_userinfo:
        userinfo = _split_userinfo(url)
        if userinfo is not None:
            url = f"{userinfo[0]}{MASK}{userinfo[2]}"
    else:
        parts = _split_password(url)
        if parts is not None:
            url = f"{parts[0]}{MASK}{parts[2]}"
    return _QUERY_SECRET.sub(rf"\g<head>{MASK}", url)


def url_password(url: str) -> str | None:
    """The password of ``url`` as written (still percent-encoded), or None."""
    parts = _split_password(url)
    return None if parts is None else parts[1]


def url_secrets(url: str, *, whole_userinfo: bool = False) -> tuple[str, ...]:
    """The secrets :func:`redact_url` masks in ``url``, as written (a :class:`Redactor` also
    masks their percent-decoded forms). With ``whole_userinfo`` the user name counts too,
    when it is long enough to be a credential rather than a word."""
    found: list[str] = []
    password = url_password(url)
    if password:
        found.append(password)
    if whole_userinfo:
        userinfo = _split_userinfo(url)
        name = "" if userinfo is None else userinfo[1].partition(":")[0]
        if len(name) >= _MIN_NAME_SECRET:
            found.append(name)
    found += [m.group("value") for m in _QUERY_SECRET.finditer(url)]
    return tuple(dict.fromkeys(s for s in found if s != MASK))


class Redactor:
    """Replaces known secrets, the passwords of URLs with credentials and the values of
    password-like query parameters with ``***``.

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
        """``text`` with every known secret and URL secret replaced by ``***``."""
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        text = _URL_CREDENTIALS.sub(rf"\g<head>{MASK}", text)
        return _QUERY_SECRET.sub(rf"\g<head>{MASK}", text)


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
