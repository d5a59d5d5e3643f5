"""No credential in any log line: the redaction of `runtime.observability.log_redaction`, on text and on records.

The review found httpx's INFO line `HTTP Request: GET https://mlflow...?api_key=KEY` in the API's
log. The property tests put a credential into every form a library prints (query strings, wire
headers, dict and tuple reprs, JSON, escaped JSON in a bytes repr, PEM) between arbitrary text.
"""

from __future__ import annotations

import io
import logging
import string
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import cli
from runtime.observability import log_redaction
from runtime.observability.log_redaction import PEM_MASK, RedactingFilter, redact

# A credential always starts with "QZ" and the surrounding text never holds a "Q" or a "Z", so
# finding the credential in the output can only mean it leaked.
SECRET_TAIL = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=6, max_size=40)
SECRETS = SECRET_TAIL.map(lambda tail: "QZ" + tail)
URL_SAFE_SECRETS = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~+/", min_size=6, max_size=40
).map(lambda tail: "QZ" + tail)
WORDS = st.sampled_from(
    ["GET", "/mlflow/api/2.0/x", "status", "200", "in 3 ms", "request", "abc123", "->", "127.0.0.1:5000", ""]
)
SEPARATORS = st.sampled_from([" ", "; ", ", ", "\n", " | ", "\t", "(", ") ", "[", "] ", "{", "} ", "<", "> "])
SURROUNDING = st.lists(st.tuples(WORDS, SEPARATORS), max_size=4).map(lambda p: "".join(a + b for a, b in p))

TEMPLATES = [
    "api_key={s}",
    "https://mlflow.hokusai-staging.local:5000/api/2.0/mlflow/runs/search?a=1&api_key={s}&b=2",
    'HTTP Request: GET https://mlflow:5000/x?api_key={s} "HTTP/1.1 200 OK"',
    "?API_KEY={s}",
    "?api%5Fkey={s}",
    "api-key: {s}",
    "apikey={s}",
    "Authorization: Bearer {s}",
    "authorization: bearer {s}",
    "Authorization: Basic {s}",
    "Proxy-Authorization: Basic {s}",
    "X-API-Key: {s}",
    "x-api-key:{s}",
    "Cookie: session={s}; theme=dark",
    "Set-Cookie: session={s}; Path=/; HttpOnly",
    "MLflow-Tracking-Token: {s}",
    "{{'authorization': 'Bearer {s}', 'host': 'x'}}",
    "{{'x-api-key': '{s}'}}",
    "[(b'authorization', b'Bearer {s}'), (b'host', b'mlflow')]",
    "[(b'x-api-key', b'{s}')]",
    '{{"api_key": "{s}"}}',
    '{{"password": "{s}", "user": "u"}}',
    '{{"client_secret":"{s}"}}',
    'b\'{{"SecretString": "{{\\\\"private_key\\\\": \\\\"{s}\\\\"}}"}}\'',
    "password={s}",
    "db_password = {s}",
    "token: {s}",
    "access_token={s}&expires=3600",
    "aws_secret_access_key = {s}",
    "X-Amz-Signature={s}&X-Amz-Date=20261201",
    "X-Amz-Security-Token={s}",
    "Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/2026, Signature={s}",
    "hk_live_{s}",
    "hk_test_{s}",
    "/mlflow/api/2.0/mlflow/hk_live_{s}/x",
    "redis://user:{s}@cache.internal:6380/2",
    "postgresql://mlflow:{s}@db:5432/mlflow",
    "Bearer {s}",
]
PEM_TEMPLATES = [
    "-----BEGIN PRIVATE KEY-----\n{s}\n{s}\n-----END PRIVATE KEY-----\n",
    "-----BEGIN EC PRIVATE KEY-----\n{s}\n-----END EC PRIVATE KEY-----",
    "-----BEGIN RSA PRIVATE KEY-----\\n{s}\\n-----END RSA PRIVATE KEY-----\\n",  # escaped, in JSON
    "-----BEGIN ENCRYPTED PRIVATE KEY-----\\\\n{s}\\\\n-----END ENCRYPTED PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----\n{s}",  # cut off: no END line
]


@given(template=st.sampled_from(TEMPLATES), secret=SECRETS, before=SURROUNDING, after=SURROUNDING)
def test_no_credential_survives_in_any_position(template, secret, before, after):
    text = before + template.format(s=secret) + after
    assert secret not in redact(text), text


@given(
    template=st.sampled_from([t for t in TEMPLATES if "{s}@" not in t and "'" not in t and '"' not in t]),
    secret=URL_SAFE_SECRETS,
    before=SURROUNDING,
)
def test_token_characters_do_not_cut_the_redaction_short(template, secret, before):
    assert secret not in redact(before + template.format(s=secret)), template


@given(template=st.sampled_from(PEM_TEMPLATES), secret=SECRETS, before=SURROUNDING, after=SURROUNDING)
def test_private_keys_go_whole(template, secret, before, after):
    redacted = redact(before + template.format(s=secret) + after)
    assert secret not in redacted
    assert PEM_MASK in redacted


@given(
    secrets=st.lists(SECRETS, min_size=2, max_size=4),
    templates=st.lists(st.sampled_from(TEMPLATES), min_size=2, max_size=4),
)
def test_several_credentials_in_one_line(secrets, templates):
    text = " ".join(t.format(s=s) for t, s in zip(templates, secrets, strict=False))
    redacted = redact(text)
    assert not any(s in redacted for s in secrets), text


@given(words=st.lists(st.tuples(WORDS, SEPARATORS), max_size=8))
def test_lines_without_credentials_are_left_alone(words):
    text = "".join(a + b for a, b in words)
    assert redact(text) == text


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            'HTTP Request: GET https://mlflow:5000/api?x=1&api_key=hk_live_ABC&y=2 "HTTP/1.1 200 OK"',
            'HTTP Request: GET https://mlflow:5000/api?x=1&api_key=***&y=2 "HTTP/1.1 200 OK"',
        ),
        (
            "headers {'authorization': 'Bearer hk_live_ABC', 'accept': '*/*'}",
            "headers {'authorization': 'Bearer ***', 'accept': '*/*'}",
        ),
        ("Authorization: Basic dXNlcjpw\r\nHost: x", "Authorization: Basic ***\r\nHost: x"),
        ("redis://user:hunter2@cache:6379/0", "redis://user:***@cache:6379/0"),
        ("key id AKIAABCDEFGHIJKLMNOP", "key id AKIA***"),
        ('{"password": 1234, "name": "x"}', '{"password": ***, "name": "x"}'),
        ("headers {'authorization': '***'}", "headers {'authorization': '***'}"),  # masked_headers' output
        (
            "secret hokusai/staging/mlflow/ca-cert: 3 versions",
            "secret hokusai/staging/mlflow/ca-cert: 3 versions",
        ),
        ("SecretId=hokusai/staging/api-identity", "SecretId=hokusai/staging/api-identity"),
        ("MLflow unavailable: Connection refused", "MLflow unavailable: Connection refused"),
        (  # the audit line names the auth path; a JSON value followed by a comma is no pair
            '{"event":"auth","auth_path":"api_key","identity":null,"key":"6c0cba5c77c4fd87"}',
            '{"event":"auth","auth_path":"api_key","identity":null,"key":"6c0cba5c77c4fd87"}',
        ),
        (
            '"ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:hokusai/staging/x"',
            '"ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:hokusai/staging/x"',
        ),
        ("Signature:\nb43128aedf7e75491a70dbfb621a2856\nnext", "Signature:\n***\nnext"),  # botocore.auth
    ],
)
def test_examples(text, redacted):
    assert redact(text) == redacted


# --- on records --------------------------------------------------------------------------------------
@pytest.fixture
def installed():
    log_redaction.install()
    try:
        yield
    finally:
        log_redaction.uninstall()


@pytest.fixture
def output():
    """A handler of its own on a logger that does not propagate, as MLflow configures its loggers."""
    stream = io.StringIO()
    logger = logging.getLogger("tests.redaction")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.DEBUG
    try:
        yield logger, stream
    finally:
        logger.handlers, logger.propagate = [], True


def test_arguments_exceptions_and_stacks_are_redacted(installed, output):
    logger, stream = output
    logger.debug("GET %s -> %d", "https://m/x?api_key=hk_live_ARG1", 200)
    try:
        raise ValueError("bad header Authorization: Bearer hk_live_EXC1")
    except ValueError:
        logger.exception("failed with %r", {"x-api-key": "hk_live_ARG2"})
    logger.warning("where from", stack_info=True, extra={"unused": "hk_live_EXTRA"})
    text = stream.getvalue()
    assert "hk_live_ARG1" not in text and "hk_live_ARG2" not in text and "hk_live_EXC1" not in text
    assert "Traceback" in text and "ValueError: bad header Authorization: Bearer ***" in text
    assert "Stack (most recent call last)" in text


def test_a_handler_made_after_install_is_covered(installed):
    """MLflow adds its own non-propagating handler when it is imported, after our set-up."""
    stream = io.StringIO()
    logger = logging.getLogger("tests.redaction.late")
    logger.handlers, logger.propagate = [logging.StreamHandler(stream)], False
    try:
        logger.error("token=%s", "hk_test_LATE")
    finally:
        logger.handlers, logger.propagate = [], True
    assert "hk_test_LATE" not in stream.getvalue() and "token=***" in stream.getvalue()


def test_arguments_that_do_not_fit_the_format_are_redacted_not_printed(installed, output, capsys):
    logger, stream = output
    logger.info("key %s and %s", "hk_live_BROKEN")
    assert "hk_live_BROKEN" not in stream.getvalue() + capsys.readouterr().err
    assert "arguments that did not fit" in stream.getvalue()


def test_the_filter_alone_redacts_a_record_made_without_the_factory():
    record = logging.makeLogRecord({"msg": "url %s", "args": ("https://m/?api_key=hk_live_MADE",)})
    assert RedactingFilter().filter(record) is True
    assert record.getMessage() == "url https://m/?api_key=***"


def test_install_is_idempotent(installed):
    factory = logging.getLogRecordFactory()
    log_redaction.install()
    assert logging.getLogRecordFactory() is factory
    for handler in logging.getLogger().handlers:
        assert handler.filters.count(log_redaction._FILTER) == 1


def test_the_cli_set_up_redacts_and_quiets_the_http_clients(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "uvicorn.error")}
    logging.getLogger("uvicorn.error").setLevel(
        logging.NOTSET
    )  # an earlier in-process uvicorn may have set it
    stream = io.StringIO()
    root.handlers = []
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv(cli.ENV_LOG_LEVEL, "debug")
    try:
        cli.configure_logging()
        assert root.level == logging.DEBUG
        logging.getLogger("httpx").info(
            'HTTP Request: GET https://m/?api_key=hk_live_HTTPX "HTTP/1.1 200 OK"'
        )
        logging.getLogger("httpcore.http11").debug("send_request_headers.started")
        # a library logger that propagates to root, as uvicorn's do (a fresh name: earlier tests in
        # this process may have configured uvicorn's own loggers)
        logging.getLogger("tests.a_library").debug("Authorization: Bearer hk_live_LIBRARY")
        logging.getLogger("botocore.parsers").debug('Response body: b\'{"SecretString": "hk_test_BOTO"}\'')
    finally:
        root.handlers, root.level = saved
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        log_redaction.uninstall()
    text = stream.getvalue()
    assert "HTTPX" not in text and "send_request_headers" not in text  # httpx/httpcore: WARNING and up
    assert "tests.a_library Authorization: Bearer ***" in text
    assert "hk_test_BOTO" not in text and '"SecretString": "***"' in text


def test_an_unknown_level_falls_back_to_info(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv(cli.ENV_LOG_LEVEL, "chatty")
    try:
        cli.configure_logging()
        assert root.level == logging.INFO
    finally:
        root.handlers, root.level = saved
        log_redaction.uninstall()
    assert "HOKUSAI_MTLS_LOG_LEVEL='CHATTY' is not one of" in stream.getvalue()
