"""Redaction of secrets in URLs, text and log records."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from spectacles_gateway.redact import (
    MASK,
    RedactingFilter,
    Redactor,
    SecretStr,
    redact_url,
    url_password,
    url_secrets,
)


@pytest.mark.parametrize(
    ("url", "redacted", "password"),
    [
        ("amqp://user:pass@host/", "amqp://user:***@host/", "pass"),
        ("amqp://guest:guest@localhost:5672/%2F", "amqp://guest:***@localhost:5672/%2F", "guest"),
        ("redis://:pass@host", "redis://:***@host", "pass"),
        ("redis://:pass@host:6379/0", "redis://:***@host:6379/0", "pass"),
        ("rediss://default:s3cr%40t@h:1/2", "rediss://default:***@h:1/2", "s3cr%40t"),
        ("amqps://u:p@ss@host/vh", "amqps://u:***@host/vh", "p@ss"),  # unescaped @
        ("amqp://u:pa/ss@host/vh", "amqp://u:***@host/vh", "pa/ss"),  # unescaped /
        ("amqp://u:p:w@host", "amqp://u:***@host", "p:w"),
        ("user:pass@host:5672", "user:***@host:5672", "pass"),  # no scheme
        # no password: unchanged
        ("amqp://localhost", "amqp://localhost", None),
        ("amqp://user@host/", "amqp://user@host/", None),
        ("redis://:@host", "redis://:@host", None),
        ("localhost:6379", "localhost:6379", None),
        ("redis://host:6379/0", "redis://host:6379/0", None),
        ("", "", None),
    ],
)
def test_redact_url(url: str, redacted: str, password: str | None) -> None:
    assert redact_url(url) == redacted
    assert url_password(url) == password
    if password:
        assert ":***@" in redact_url(url)
        assert url_password(redact_url(url)) == MASK


def test_redactor_masks_known_secrets() -> None:
    redactor = Redactor(["t0k3n.abc.def", "", "pw"])
    assert redactor.secrets == frozenset({"t0k3n.abc.def", "pw"})
    text = 'identify {"token": "t0k3n.abc.def"} and pw twice: pw'
    assert redactor.redact(text) == 'identify {"token": "***"} and *** twice: ***'


def test_redactor_longest_secret_first() -> None:
    redactor = Redactor(["abc", "abcdef"])
    assert redactor.redact("xabcdefx abc") == "x***x ***"


def test_redactor_masks_decoded_form_of_percent_encoded_secret() -> None:
    redactor = Redactor(["p%40ss%2Fword"])
    assert "p@ss/word" in redactor.secrets
    assert redactor.redact("pw p@ss/word or p%40ss%2Fword") == "pw *** or ***"


def test_redactor_masks_any_url_password() -> None:
    redactor = Redactor()
    text = "connecting to amqp://user:hunter22@rabbit:5672/ and 'redis://:x1@r:6379'"
    assert redactor.redact(text) == (
        "connecting to amqp://user:***@rabbit:5672/ and 'redis://:***@r:6379'"
    )
    assert redactor.redact("no secrets at http://host:80/path") == (
        "no secrets at http://host:80/path"
    )


def test_redactor_special_characters_are_literal() -> None:
    redactor = Redactor(["a.b*c(d"])
    assert redactor.redact("a.b*c(d aXbbc(d") == "*** aXbbc(d"


def test_redactor_add_later() -> None:
    redactor = Redactor()
    assert redactor.redact("secret") == "secret"
    redactor.add("secret")
    assert redactor.redact("secret") == MASK


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(Redactor(["TOKEN123", "hunter2"])))
    logger = logging.getLogger("test_redact.capture")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_filter_redacts_message_and_args(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.info("token=%s url=%s", "TOKEN123", "amqp://u:hunter2@h/")
    logger.debug("payload %r", {"token": "TOKEN123"})
    logger.warning("TOKEN123 in the format string itself")
    out = stream.getvalue()
    assert "TOKEN123" not in out
    assert "hunter2" not in out
    assert out.splitlines() == [
        "INFO token=*** url=amqp://u:***@h/",
        "DEBUG payload {'token': '***'}",
        "WARNING *** in the format string itself",
    ]


def test_filter_redacts_exception_text(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    try:
        raise ConnectionError("cannot connect to amqp://u:hunter2@h/ with TOKEN123")
    except ConnectionError:
        logger.exception("broker failed")
    out = stream.getvalue()
    assert "Traceback" in out
    assert "ConnectionError: cannot connect to amqp://u:***@h/ with ***" in out
    assert "TOKEN123" not in out
    assert "hunter2" not in out


def test_filter_redacts_stack_info(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    TOKEN123 = 1  # noqa: N806 - the name shows up in the stack text
    logger.info("here", stack_info=True)
    assert TOKEN123
    assert "TOKEN123" not in stream.getvalue()
    assert "Stack (most recent call last)" in stream.getvalue()


def test_filter_survives_a_broken_format(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    # One argument missing: logging's own error report would print the raw arguments.
    logger.error("two args %s %s", "TOKEN123")  # noqa: PLE1206
    out = stream.getvalue()
    assert "TOKEN123" not in out
    assert "two args" in out


def test_filter_never_drops_and_is_idempotent() -> None:
    redactor = Redactor(["TOKEN123"])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a %s", ("TOKEN123",), None)
    assert RedactingFilter(redactor).filter(record) is True
    assert RedactingFilter(redactor).filter(record) is True  # a second handler's filter
    assert record.getMessage() == "a ***"
    assert record.args is None


def test_filter_on_non_string_message() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, ValueError("TOKEN123"), None, None)
    RedactingFilter(Redactor(["TOKEN123"])).filter(record)
    assert record.getMessage() == "***"


# --------------------------------------------------------------------------------------------
# Password-like query parameters, the whole user-info, and the secrets of a URL


@pytest.mark.parametrize(
    ("url", "redacted", "secrets"),
    [
        (
            "redis://h:6379/0?password=pw1&ssl_cert_reqs=none",
            "redis://h:6379/0?password=***&ssl_cert_reqs=none",
            ("pw1",),
        ),
        ("redis://h/0?db=1&PassWord=pw2#frag", "redis://h/0?db=1&PassWord=***#frag", ("pw2",)),
        (
            "amqp://h/?pass=a&secret=b;auth=c",
            "amqp://h/?pass=***&secret=***;auth=***",
            ("a", "b", "c"),
        ),
        (
            "wss://gw.example/?v=10&access_token=t1&api_key=k1&sig=s1",
            "wss://gw.example/?v=10&access_token=***&api_key=***&sig=***",
            ("t1", "k1", "s1"),
        ),
        (
            "amqp://u:pw3@h/?x_credentials=c2",
            "amqp://u:***@h/?x_credentials=***",
            ("pw3", "c2"),
        ),
        # not secrets, or nothing to mask: unchanged
        ("redis://h/0?password=", "redis://h/0?password=", ()),
        ("redis://h/0?timeout=5&db=2", "redis://h/0?timeout=5&db=2", ()),
        (
            "wss://gateway.discord.gg/?v=10&encoding=json",
            "wss://gateway.discord.gg/?v=10&encoding=json",
            (),
        ),
    ],
)
def test_query_parameters_that_hold_secrets(
    url: str, redacted: str, secrets: tuple[str, ...]
) -> None:
    assert redact_url(url) == redacted
    assert url_secrets(url) == secrets
    assert url_secrets(redacted) == ()  # masked once, nothing is left to find
    text = f"connecting to {url} now"
    assert Redactor().redact(text) == f"connecting to {redacted} now"


@pytest.mark.parametrize(
    ("url", "redacted", "secrets"),
    [
        ("wss://user:pw4@gw.example/", "wss://***@gw.example/", ("pw4",)),
        ("wss://a-long-proxy-token@gw.example", "wss://***@gw.example", ("a-long-proxy-token",)),
        # a short user name is masked in the URL, but not every "bot" in every log line
        ("ws://bot@127.0.0.1:1/", "ws://***@127.0.0.1:1/", ()),
        ("wss://gw.example/?token=t2", "wss://gw.example/?token=***", ("t2",)),
        ("wss://gw.example/", "wss://gw.example/", ()),
    ],
)
def test_whole_userinfo(url: str, redacted: str, secrets: tuple[str, ...]) -> None:
    assert redact_url(url, whole_userinfo=True) == redacted
    assert url_secrets(url, whole_userinfo=True) == secrets


def test_secret_str_never_shows_its_value() -> None:
    secret = SecretStr("tok-123-abc")
    assert secret.get_secret_value() == "tok-123-abc"
    for text in (repr(secret), str(secret), f"{secret}", repr([secret]), "%s" % secret):  # noqa: UP031
        assert "tok-123-abc" not in text
    assert str(secret) == MASK
    assert secret == SecretStr("tok-123-abc")
    assert secret != SecretStr("other")
    assert secret != "tok-123-abc"
    assert hash(secret) == hash(SecretStr("tok-123-abc"))
    assert secret
    assert not SecretStr("")
