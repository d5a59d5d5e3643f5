"""The proxy's upstream URL, without servers: only the path below the mount can vary.

An outside review made the proxy dial any host in the VPC with `/mlflow%2F@10.0.0.9:6379/x`
(the URL was `self.base + path`). Here every generated target either is refused or gives a
URL with the configured scheme, host and port whose path starts with the upstream's base
path; and the request httpx would send has that origin and that Host.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, quote, unquote

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from runtime.auth.api_keys import without_query_key
from runtime.services.mlflow_proxy import (
    IDEMPOTENT,
    MlflowProxy,
    RefusedPath,
    _streams_a_body,
    route_path,
    upstream_request_headers,
)
from runtime.serving.http_headers import MLFLOW_ERROR_CODES, mlflow_error, send_mlflow_error
from tests.support.path_pieces import URL_PIECES

UPSTREAM = "https://mlflow.hokusai-staging.local:5000"


def scope_for(raw_target: bytes, *, root: str = "/mlflow", query: bytes = b"") -> dict:
    """What uvicorn makes of a request line's target (h11: `path = unquote(raw_path)`)."""
    return {
        "type": "http",
        "method": "GET",
        "path": unquote(raw_target.decode("latin-1")),
        "raw_path": raw_target,
        "root_path": root,
        "query_string": query,
        "headers": [(b"host", b"api.example:8080")],
    }


@pytest.fixture(scope="module")
def proxies():
    client = httpx.AsyncClient()
    return {base: MlflowProxy(UPSTREAM + base, client) for base in ("", "/", "/base", "/base/", "/a%20b/c")}


# --- what is forwarded ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (b"/mlflow/api/2.0/mlflow/runs/search", "/api/2.0/mlflow/runs/search"),
        (b"/mlflow/", "/"),
        (b"/mlflow", "/"),
        (b"/mlflow/artifacts/caf%C3%A9/model%20v1.pkl", "/artifacts/caf%C3%A9/model%20v1.pkl"),
        (b"/mlflow/a/b/", "/a/b/"),
        (b"/mlflow/a:b/c=d;e,f+g!h~i*j(k)l$m'n&o", "/a:b/c=d;e,f+g!h~i*j(k)l$m'n&o"),
        (b"/mlflow/100%25.txt", "/100%25.txt"),  # a literal '%', encoded once
        (b"/mlflow/a.b/..c/.d", "/a.b/..c/.d"),
    ],
)
def test_paths_below_the_mount_are_forwarded_as_sent(target, forwarded):
    assert route_path(scope_for(target)) == forwarded


@pytest.mark.parametrize(
    "target",
    [
        b"/mlflow%2F@10.0.0.9:6379/x",
        b"/mlflow%2f@10.0.0.9:6379/x",
        b"/mlflow/%2F@evil:80/",
        b"/mlflow/a%2Fb",
        b"/mlflow/a%5Cb",
        b"/mlflow/a%5cb",
        b"/mlflow/a%252Fb",
        b"/mlflow/a%2541",
        b"/mlflow/a\\b",
        b"/mlflow/@evil:80/x",
        b"/mlflow/a%40b",
        b"/mlflow//evil/x",
        b"/mlflow/a//b",
        b"/mlflow/..",
        b"/mlflow/../x",
        b"/mlflow/x/..",
        b"/mlflow/./x",
        b"/mlflow/%2e%2e/x",
        b"/mlflow/%2E./x",
        b"/mlflow/..;a/x",
        b"/mlflow/a%0D%0AHost:evil",
        b"/mlflow/a%00",
        b"/mlflow/a%7F",
        b"/mlflow/a%09",
        b"/mlflow/a#b",
        b"/mlflow/a%23b",
        b"/mlflow/a%3Fb",
        b"/mlflow/a%zz",
        b"/mlflow/a%",
        b"/mlflow/caf\xc3\xa9",  # non-ASCII on the wire
        b"/mlfl%6Fw/x",  # below the mount only once decoded
        b"http://evil/mlflow/x",
        b"/other/x",
    ],
)
def test_paths_that_decoding_could_change_are_refused(target):
    with pytest.raises(RefusedPath):
        route_path(scope_for(target))


def test_a_raw_path_that_differs_from_the_path_is_refused():
    scope = {**scope_for(b"/mlflow/api/2.0/x"), "raw_path": b"/mlflow/api/2.0/y"}
    with pytest.raises(RefusedPath, match="disagree"):
        route_path(scope)


def test_without_a_raw_path_the_path_is_encoded_and_checked():
    scope = scope_for(b"/mlflow/x")
    del scope["raw_path"]
    assert route_path({**scope, "path": "/mlflow/a b/café"}) == "/a%20b/caf%C3%A9"
    for path in ("/mlflow/a?b", "/mlflow/a#b", "/mlflow/a\\b", "/mlflow/../x", "/mlflow/@evil"):
        with pytest.raises(RefusedPath):
            route_path({**scope, "path": path})


@pytest.mark.parametrize("base", ["", "/", "/base", "/base/", "/a%20b/c"])
def test_the_base_path_is_the_prefix(proxies, base):
    url = proxies[base].upstream_url(scope_for(b"/mlflow/api/2.0/x", query=b"a=1"))
    prefix = base.rstrip("/")
    assert str(url) == f"{UPSTREAM}{prefix}/api/2.0/x?a=1"


def test_the_configured_userinfo_is_never_sent():
    proxy = MlflowProxy("https://svc:pa55word@mlflow.local:5000/base", httpx.AsyncClient())
    url = proxy.upstream_url(scope_for(b"/mlflow/x"))
    assert str(url) == "https://mlflow.local:5000/base/x"
    assert proxy.upstream_host == "mlflow.local:5000"


# --- properties -------------------------------------------------------------------------------------
PIECES = st.sampled_from(
    [*URL_PIECES, "\x00", "\r\n", " ", "\t", "é", "\u2215"]
)  # U+2215 DIVISION SLASH, a slash look-alike
QUERIES = st.lists(
    st.tuples(
        st.sampled_from(["a", "api_key", "api%5Fkey", "api%5fkey", "API_KEY", "x", "api_key2", "%61pi_key"]),
        st.sampled_from(["", "1", "hk_live_SECRET", "%2F", "@evil:80", "a+b", "%26"]),
        st.booleans(),
    ),
    max_size=5,
)


@given(
    pieces=st.lists(PIECES, max_size=12),
    slash=st.booleans(),
    base=st.sampled_from(["", "/", "/base", "/base/", "/a%20b/c"]),
    query=QUERIES,
)
@example(pieces=["%2F", "@", "10.0.0.9", ":", "6379", "/", "a"], slash=False, base="", query=[])
@example(pieces=["%2F", "@", "evil", ":", "80", "/"], slash=True, base="/base", query=[])
def test_only_the_path_below_the_base_can_vary(proxies, pieces, slash, base, query):
    proxy = proxies[base]
    raw = ("/mlflow" + ("/" if slash else "") + "".join(pieces)).encode("utf-8")
    query_string = "&".join(f"{name}={value}" if has_value else name for name, value, has_value in query)
    scope = scope_for(raw, query=query_string.encode())
    try:
        url = proxy.upstream_url(scope)
    except RefusedPath:
        return
    configured = httpx.URL(UPSTREAM)
    assert (url.scheme, url.host, url.port) == (configured.scheme, configured.host, configured.port)
    assert url.userinfo == b""
    assert url.raw_path.startswith(base.rstrip("/").encode() + b"/")
    assert url.fragment == ""
    # What httpx would put on the wire: the same origin, and Host for the configured upstream.
    request = httpx.Request("GET", url, headers=upstream_request_headers(scope, b"rid"))
    assert (request.url.raw_scheme, request.url.raw_host, request.url.port) == (
        b"https",
        configured.raw_host,
        5000,
    )
    assert request.headers["host"] == "mlflow.hokusai-staging.local:5000"
    # The upstream decodes the same path below the base that our server decoded below the mount.
    below = url.raw_path.partition(b"?")[0][len(base.rstrip("/")) :].decode("ascii")
    assert unquote(below) == scope["path"][len("/mlflow") :] or unquote(below) == "/"
    assert "api_key" not in dict(parse_qsl(url.query.decode(), keep_blank_values=True))


@given(
    pairs=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "a",
                    "b",
                    "api_key",
                    "api%5Fkey",
                    "api%5fkey",
                    "%61%70%69%5F%6B%65%79",
                    "API_KEY",
                    "api+key",
                    "",
                ]
            ),
            st.one_of(st.none(), st.sampled_from(["", "1", "hk_live_X", "%2F", "a+b", "%3D", "=="])),
        ),
        max_size=8,
    )
)
def test_the_query_key_is_removed_and_everything_else_kept_as_sent(pairs):
    pieces = [name if value is None else f"{name}={value}" for name, value in pairs]
    query = "&".join(pieces).encode()
    kept = [p for p, (name, _) in zip(pieces, pairs, strict=True) if not (p and unquote(name) == "api_key")]
    assert without_query_key(query) == "&".join(kept).encode()
    assert "api_key" not in dict(parse_qsl(without_query_key(query).decode(), keep_blank_values=True))


def test_a_query_without_the_key_is_returned_untouched():
    for query in (b"", b"a=1", b"a=1&&b=%2F+c&", b"api_keys=1&my_api_key=2"):
        assert without_query_key(query) == query


# --- retry and body rules ----------------------------------------------------------------------------
def test_only_idempotent_methods_are_retried():
    assert frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"}) == IDEMPOTENT
    assert "POST" not in IDEMPOTENT and "PATCH" not in IDEMPOTENT


@pytest.mark.parametrize(
    ("headers", "streamed"),
    [
        ([], False),
        ([(b"content-length", b"0")], False),
        ([(b"content-length", b"12")], True),
        ([(b"transfer-encoding", b"chunked")], True),
    ],
)
def test_a_body_makes_a_request_unrepeatable(headers, streamed):
    assert _streams_a_body(headers) is streamed


# --- MLflow's error shape ----------------------------------------------------------------------------
def test_every_error_code_is_one_mlflows_client_knows():
    from mlflow.exceptions import ERROR_CODE_TO_HTTP_STATUS, RestException
    from mlflow.protos.databricks_pb2 import ErrorCode

    for status, code in MLFLOW_ERROR_CODES.items():
        assert code in ErrorCode.keys()  # noqa: SIM118 - a protobuf enum, not a dict
        exception = RestException(mlflow_error(status, "why", request_id="r"))
        assert exception.error_code == code
        assert exception.message == f"{code}: why"
        assert ERROR_CODE_TO_HTTP_STATUS[code] == (503 if status == 502 else status)


@pytest.mark.anyio
async def test_send_mlflow_error_writes_mlflows_shape_with_our_fields():
    sent = []

    async def send(message):
        sent.append(message)

    await send_mlflow_error(send, 429, None, "slow down", [(b"retry-after", b"7")], request_id="r-1")
    start, body = sent
    assert start["status"] == 429
    assert (b"retry-after", b"7") in start["headers"]
    assert json.loads(body["body"]) == {
        "error_code": "REQUEST_LIMIT_EXCEEDED",
        "message": "slow down",
        "request_id": "r-1",
    }
    await send_mlflow_error(send, 400, "INVALID_PARAMETER_VALUE", "bad")
    assert json.loads(sent[-1]["body"])["error_code"] == "INVALID_PARAMETER_VALUE"


def test_quote_agrees_with_route_path_for_plain_names():
    for name in ("model.pkl", "a b", "ünï"):
        assert route_path(scope_for(("/mlflow/" + quote(name)).encode())) == "/" + quote(name)
