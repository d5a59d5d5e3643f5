"""Credentials never reach a log line, whoever writes it: redact them from every record's final text.

Why here and not only at the call sites: the lines that leaked were not ours. httpx logs every
request URL at INFO (`?api_key=...` included), botocore logs Secrets Manager answers at DEBUG
(our identity secrets hold private keys), urllib3 and MLflow log URLs with signed-URL
credentials. So `install()` redacts each record once, after its arguments are merged and with
its exception text: a log-record factory (every logger, every handler, also handlers created
later such as MLflow's own, which does not propagate) and a filter on every handler that exists
at that moment (records built some other way, e.g. `logging.makeLogRecord`). Standard library only.

What goes (the value becomes `***`; the name stays so the line still says what was there):
- `name=value`, `name: value`, `"name": "value"`, `'name': 'value'`, `(b'name', b'value')` where
  the name is, or ends with, a credential word: api_key (api-key, apikey, api%5Fkey), token,
  access/refresh/id/session/security token, password, passwd, secret, client_secret, secret_key,
  private_key, aws_secret_access_key, signature, sig, x-amz-signature, x-amz-credential,
  SecretString, SecretBinary, and the credential headers Authorization, Proxy-Authorization,
  X-API-Key, Cookie, Set-Cookie, MLflow-Tracking-Token, X-Auth-Token (a scheme such as `Bearer`
  or `Basic` is kept: `Authorization: Bearer ***`);
- `Bearer <token>` anywhere;
- PEM private keys (`-----BEGIN ... PRIVATE KEY-----` to its END line, or to the end of the text
  when cut off; also inside JSON or a bytes repr, where newlines are `\\n`);
- our API keys (`hk_live_...`, `hk_test_...`) anywhere;
- AWS access key ids (`AKIA...`, `ASIA...`) and passwords in URLs (`scheme://user:***@host`).

Over-redacting a log line is cheap; a key in CloudWatch Logs is not.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

MASK = "***"
PEM_MASK = "[redacted private key]"

_HEADER_NAMES = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "cookie",
        "set-cookie",
        "mlflow-tracking-token",
        "x-auth-token",
    }
)
_SECRET_NAME = re.compile(
    r"(?:api[_-]?key|api%5fkey|token|password|passwd|pwd|secret|private[_-]?key|secret[_-]?key"
    r"|secret[_-]?access[_-]?key|secretaccesskey|signature|sig|credential|secretstring|secretbinary"
    r"|authorization|x-api-key|cookie)\Z",
    re.IGNORECASE,
)
"""A credential name: one of these words, possibly after a prefix (`db_password`, `x-amz-signature`)."""
_SCHEME = r"(?:bearer|basic|digest|token|negotiate|aws4-hmac-sha256)\s+"

# Candidates are found with plain character classes and their names tested afterwards, and
# each scan runs only when a cheap substring test says it could match: a 200-character proxy
# line with headers costs ~40 us (one regex holding the word list: ~125 us), a line without
# any hint ~2 us.
_PLAIN_NAME = re.compile(
    r"(?<![\w.%-])(?P<name>[\w.%-]+)(?P<sep>[ \t]*=[ \t]*|[ \t]*:(?:[ \t]*\r?\n|[ \t]*))"
)
"""`name=value` (query strings, forms, key=value lines), `Name: value` (headers), and botocore's
`Signature:` with the value on the next line."""
_QUOTED_NAME = re.compile(r"(?P<q>\\*[\"'])(?P<name>[\w.%-]+)(?P=q)(?P<sep>\s*[:,=]\s*b?)")
"""`"name": ...` (JSON, also escaped inside JSON or a repr), `'name': ...`, `(b'name', b'...')`."""
_PLAIN_VALUE = re.compile(rf"(?P<scheme>{_SCHEME})?(?P<value>[^\s&'\",;#<>()\[\]{{}}\\]+)", re.IGNORECASE)
_LINE_VALUE = re.compile(rf"(?P<scheme>{_SCHEME})?(?P<value>[^\r\n'\"]*[^\s'\"])", re.IGNORECASE)
"""A credential header as on the wire (`Cookie: a=1; b=2`): the value runs to the line's end."""
_QUOTED_VALUE = re.compile(
    rf"(?P<q>\\*[\"'])(?P<scheme>{_SCHEME})?(?P<value>.*?)(?<!\\)(?P=q)", re.IGNORECASE | re.DOTALL
)
_BARE_VALUE = re.compile(r"(?P<scheme>)(?P<value>[^\s\"',}\]\\]+)")
"""`"name": 1234`, `"name": null`: a quoted name with a value that is not a string."""
_BEARER = re.compile(r"(?<![\w-])(?P<scheme>bearer\s+)(?P<value>[A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)
_PEM_KEY = re.compile(
    r"-----BEGIN (?P<kind>[A-Z0-9 ]*?)PRIVATE KEY-----.*?(?:-----END (?P=kind)PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
_OUR_KEY = re.compile(r"(?<![A-Za-z0-9])(?P<prefix>hk_(?:live|test)_)[A-Za-z0-9_\-]+")
_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?P<prefix>AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
_URL_PASSWORD = re.compile(r"(?P<head>://[^/\s:@'\"]+:)[^/\s@'\"]+@")
_NAME_HINTS = ("key", "token", "secret", "pass", "pwd", "sig", "auth", "cookie", "credential")
"""Substrings every credential name holds: a line without any skips the pair scans (`in` is cheap)."""


def _mask_pairs(text: str, names: re.Pattern, value_for) -> str:
    """Mask the value after every `names` match whose name is a credential name."""
    spans: list[tuple[int, int]] = []
    for found in names.finditer(text):
        if spans and found.start() < spans[-1][1]:
            continue  # inside a value already masked
        if not _SECRET_NAME.search(found.group("name")):
            continue
        pattern = value_for(found)
        value = pattern.match(text, found.end()) if pattern is not None else None
        if value is None or value.group("value") in ("", MASK):
            continue
        spans.append(value.span("value"))
    if not spans:
        return text
    parts: list[str] = []
    last = 0
    for start, end in spans:
        parts += [text[last:start], MASK]
        last = end
    parts.append(text[last:])
    return "".join(parts)


def _plain_value(found: re.Match) -> re.Pattern | None:
    sep = found.group("sep")
    if ":" not in sep:
        return _PLAIN_VALUE
    if found.group("name").lower() in _HEADER_NAMES:
        return _LINE_VALUE
    # `password: x` is a pair; `arn:aws:secretsmanager:...:secret:NAME` and `scheme:rest` are not
    return _PLAIN_VALUE if sep[-1] in " \t\n" else None


def _quoted_value(found: re.Match) -> re.Pattern | None:
    text, start = found.string, found.start()
    if "," in found.group("sep") and not (text[start - 1 : start] == "(" or text[start - 2 : start] == "(b"):
        return None  # `(b'name', b'value')` is a pair; `"api_key", "other"` in a JSON list or object is not
    return _QUOTED_VALUE if text[found.end() : found.end() + 1] in ("'", '"', "\\") else _BARE_VALUE


def _masked(match: re.Match) -> str:
    start, end = match.span("value")
    return match.string[match.start() : start] + MASK + match.string[end : match.end()]


def redact(text: str) -> str:
    """`text` with every credential this module knows replaced (see the module docstring)."""
    if not text:
        return text
    lowered = text.lower()
    if "private key" in lowered:
        text = _PEM_KEY.sub(PEM_MASK, text)
    if any(hint in lowered for hint in _NAME_HINTS):
        text = _mask_pairs(text, _QUOTED_NAME, _quoted_value)
        text = _mask_pairs(text, _PLAIN_NAME, _plain_value)
    if "bearer" in lowered:
        text = _BEARER.sub(lambda m: m.group(0) if m.group("value") == MASK else _masked(m), text)
    if "hk_" in lowered:
        text = _OUR_KEY.sub(lambda m: m.group("prefix") + MASK, text)
    if "akia" in lowered or "asia" in lowered:
        text = _AWS_KEY_ID.sub(lambda m: m.group("prefix") + MASK, text)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + "@", text)
    return text


_DONE = "_hokusai_redacted"
_EXCEPTION_FORMATTER = logging.Formatter()


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Merge the arguments into the message, redact it and the exception and stack text, once."""
    if getattr(record, _DONE, False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # logging would print the raw arguments to stderr instead
        message = f"{record.msg!s} (arguments that did not fit the format: {record.args!r})"
    record.msg = redact(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    setattr(record, _DONE, True)
    return record


class RedactingFilter(logging.Filter):
    """A handler (or logger) filter that redacts each record it sees and lets it through."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_FILTER = RedactingFilter()


def _redacting(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make_record(*args, **kwargs) -> logging.LogRecord:
        return redact_record(factory(*args, **kwargs))

    make_record.redacting = True  # type: ignore[attr-defined]
    make_record.wrapped = factory  # type: ignore[attr-defined]
    return make_record


def _handlers() -> Iterator[logging.Handler]:
    yield from logging.getLogger().handlers
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            yield from logger.handlers


def install() -> None:
    """Redact every log record of this process from now on (idempotent; see the module docstring)."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "redacting", False):
        logging.setLogRecordFactory(_redacting(factory))
    for handler in _handlers():
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def uninstall() -> None:
    """Undo `install()` (tests)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacting", False):
        logging.setLogRecordFactory(factory.wrapped)  # type: ignore[attr-defined]
    for handler in _handlers():
        handler.removeFilter(_FILTER)


QUIET_LOGGERS = ("httpx", "httpcore")
"""Their INFO and DEBUG lines are request URLs and connection details: WARNING and up only."""


def quiet_http_clients() -> None:
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
