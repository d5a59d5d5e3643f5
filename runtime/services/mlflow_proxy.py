"""The API service's `/mlflow` reverse proxy to the MLflow tracking server (seed 002 §2, seed 004).

A pure ASGI app, mounted with `Mount("/mlflow", app=mlflow_proxy_app(upstream, client))`:
every method goes to `{upstream}{base path}{path below the mount}` with the query string
byte-for-byte, less the `api_key` parameter. Bodies stream both ways in the chunks they
arrive in, so a multi-GB artifact never sits in memory.

Only the path can vary (an outside review found an SSRF: `self.base + path` let
`/mlflow%2F@10.0.0.9:6379/x` put `@10.0.0.9:6379` into the upstream's authority). The
upstream URL is built from components, `upstream.copy_with(raw_path=...)`, never by parsing a
string, and is checked to keep the configured scheme, host, port and base path. A path is
refused (400) if decoding it could change what it means to anyone after us: it must start
with `/` below the mount as sent (`/mlfl%6Fw/...` is not below it), match the server's decoded
`path`, hold no `.`/`..` or empty segments, no encoded `/` or backslash (`%2F`, `%5C`), no
backslash, `@`, `#`, `?`, control character or NUL (raw or decoded), no malformed escape, and
be encoded only once (`%252F` is refused). The raw form is forwarded: `caf%C3%A9` stays as sent.

The `api_key` query parameter (the name `runtime.auth.api_keys.extract_api_key` reads, in any
percent-encoding) is the credential this service consumed: it is dropped, so it never reaches
MLflow or its access log; every other parameter is kept as sent.

Headers (seed 004: the proxy must forward authentication): everything is forwarded, including
`Authorization`, except `Host` (set for the upstream), the hop-by-hop headers of RFC 9110 §7.6.1
plus any that `Connection` names, `Expect` (answered at this hop by our own server), and the
identity headers an outer proxy would set (`x-forwarded-client-cert`, `x-amzn-mtls-*`), which a
caller must not be able to smuggle in. `X-Request-ID` is kept (or created), sent upstream and
returned; `X-Forwarded-For` gets this hop's socket peer appended; `X-Forwarded-Proto` and
`X-Forwarded-Host` describe the request as this server received it. Upstream `Date`/`Server` are
dropped because our server writes its own (as nginx does). Redirects are passed back, never followed.

A pooled connection MLflow has just closed (uvicorn closes one after an app error, e.g. a 500
from FastAPI's error middleware, racing our next request) fails with no response byte. An
idempotent request (GET, HEAD, OPTIONS, PUT, DELETE) without a body is then sent once more, on
a new connection: only when httpcore's trace shows it went out on a reused connection and no
response header came back. A POST, or anything with a body (a consumed stream cannot be
replayed), is never retried.

The client is passed in (see `runtime.clients.adaptive_client`): over mTLS the upstream sees *the API
service's* certificate on every proxied request, whoever the caller was, so the API must
authenticate `/mlflow` callers itself before this app runs. `serve-api` gives it a pool of as
many kept-alive connections as the API holds downstream ones, so concurrent proxied calls reuse
their mTLS connections; each upstream read (up to 64 KiB, all that has arrived) goes down in
one ASGI message, so a response costs one relay step per read, not per TLS record.

The proxy's own errors are in MLflow's shape (`runtime.serving.http_headers.send_mlflow_error`), so
MLflow's client reports their code and message, plus `upstream`, `reason` and `request_id`;
they name the upstream host and nothing secret: 400 BAD_REQUEST refused path, 503
TEMPORARILY_UNAVAILABLE can't connect (refused, DNS), 504 DEADLINE_EXCEEDED timeout, 502
TEMPORARILY_UNAVAILABLE TLS refused either way or a broken response.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from urllib.parse import quote, unquote

import anyio
import httpx

from runtime.auth.api_keys import without_query_key
from runtime.auth.proxy_certificate import is_forwarding_header
from runtime.serving.http_headers import REQUEST_ID, masked_headers, request_id_of, send_mlflow_error

log = logging.getLogger("hokusai_mtls")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",  # not in the RFC, but some clients still send it
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_FORWARDED = frozenset({b"host", b"expect"})
_NOT_RETURNED = frozenset({b"date", b"server"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""RFC 9110 §9.2.2: may be sent again after a connection failed; only these are retried, once."""

Headers = list[tuple[bytes, bytes]]


class _ClientGone(Exception):
    """The downstream client disconnected (during its upload or our response)."""


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The header names a `Connection` header declares hop-by-hop."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]], *, also: Iterable[bytes] = ()) -> Headers:
    """`headers` without the hop-by-hop set, the names `Connection` lists, and `also`; names lowercased."""
    headers = [(name.lower(), value) for name, value in headers]
    dropped = HOP_BY_HOP | connection_tokens(headers) | frozenset(also)
    return [(name, value) for name, value in headers if name not in dropped]


def _header(headers: Headers, name: bytes) -> bytes | None:
    values = [value for key, value in headers if key == name]
    return b", ".join(values) if values else None


def upstream_request_headers(scope: dict, request_id: bytes) -> Headers:
    """What the upstream receives, from the ASGI scope of the incoming request."""
    incoming = [(name.lower(), value) for name, value in scope.get("headers", [])]
    forwarded_for = _header(incoming, b"x-forwarded-for")
    host = _header(incoming, b"host")
    drop = _NOT_FORWARDED | {REQUEST_ID, b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
    headers = [
        (name, value)
        for name, value in strip_hop_by_hop(incoming, also=drop)
        if not is_forwarding_header(name)  # client-certificate headers: never ours to pass on
    ]
    peer = (scope.get("client") or (None,))[0]
    if peer:
        hop = peer.encode("latin-1")
        forwarded_for = forwarded_for + b", " + hop if forwarded_for else hop
    if forwarded_for:
        headers.append((b"x-forwarded-for", forwarded_for))
    headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")))
    if host:
        headers.append((b"x-forwarded-host", host))
    headers.append((REQUEST_ID, request_id))
    return headers


def downstream_response_headers(headers: Iterable[tuple[bytes, bytes]], request_id: bytes) -> Headers:
    kept = strip_hop_by_hop(headers, also=_NOT_RETURNED | {REQUEST_ID})
    return [*kept, (REQUEST_ID, request_id)]


# --- the path and query sent upstream -------------------------------------------------------------
class RefusedPath(ValueError):
    """A request target the proxy does not forward; the message is safe to return and to log."""


_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")  # anything else must come percent-encoded
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODED_SEPARATOR = re.compile(r"%(?:2f|5c)", re.IGNORECASE)
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\@#?]")
_FORBIDDEN_NAMES = {"\\": "a backslash", "@": "an '@'", "#": "a '#'", "?": "a '?'"}


def check_path(raw: str) -> None:
    """Raise `RefusedPath` unless `raw` (the path below the mount, as sent) is safe to forward.

    Checked on the raw form and once decoded, because whoever comes after us (httpx, MLflow,
    a proxy in between, a log reader) may look at either.
    """
    if not raw.startswith("/"):
        raise RefusedPath("the path below the mount must start with '/'")
    if not _VISIBLE_ASCII.fullmatch(raw):
        raise RefusedPath("the path holds a character that must be percent-encoded")
    if _MALFORMED_ESCAPE.search(raw):
        raise RefusedPath("the path holds a malformed percent-escape")
    if _ENCODED_SEPARATOR.search(raw):
        raise RefusedPath("the path holds an encoded '/' or '\\' (%2F, %5C)")
    decoded = unquote(raw)
    if _ESCAPE.search(decoded):
        raise RefusedPath("the path is percent-encoded more than once")
    for form in (raw, decoded):
        if found := _FORBIDDEN.search(form):
            character = found.group()
            raise RefusedPath(f"the path holds {_FORBIDDEN_NAMES.get(character, 'a control character')}")
        segments = form.split("/")
        if any(segment.split(";", 1)[0] in (".", "..") for segment in segments):
            raise RefusedPath("the path holds a '.' or '..' segment")
        if "" in segments[1:-1]:
            raise RefusedPath("the path holds an empty segment ('//')")


def route_path(scope: dict) -> str:
    """The path below the mount point, percent-encoded as the client sent it (`caf%C3%A9` stays).

    Raises `RefusedPath` when it is not below the mount as sent, when `raw_path` and `path`
    disagree, or when `check_path` refuses it.
    """
    root = scope.get("root_path", "")
    path = scope["path"]
    raw = scope.get("raw_path")
    if raw is None:  # ASGI allows it: rebuild the encoded form (a backslash, `?`, `#`, `%` get escaped)
        full = quote(path, safe="/:@!$&'()*+,;=-._~")
    else:
        try:
            full = raw.decode("ascii")
        except UnicodeDecodeError:
            raise RefusedPath("the path holds a character that must be percent-encoded") from None
        if unquote(full) != path:
            raise RefusedPath("the request path and its raw form disagree")
    if not full.startswith(root):
        raise RefusedPath("the path is not below the mount as sent")
    below = full[len(root) :] or "/"
    check_path(below)
    return below


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify(exc: httpx.HTTPError) -> tuple[int, str, str]:
    """(status, detail, reason) for an upstream failure; the reason holds no secrets (no URL, no headers)."""
    if isinstance(exc, httpx.TimeoutException):  # before TLS: a timed-out read chains SSLWantReadError
        return 504, "MLflow did not answer in time", type(exc).__name__
    causes = list(_causes(exc))
    tls = next((c for c in causes if isinstance(c, ssl.SSLError) and not _would_block(c)), None)
    if isinstance(tls, ssl.SSLCertVerificationError):
        why = getattr(tls, "verify_message", None) or "certificate refused"
        return 502, "MLflow TLS handshake failed", f"certificate verify failed: {why}"
    if tls is not None:
        return 502, "MLflow TLS handshake failed", getattr(tls, "reason", None) or tls.strerror or "TLS error"
    if isinstance(exc, httpx.ConnectError):
        return 503, "MLflow unavailable", _connect_reason(causes)
    return 502, "MLflow sent no valid response", type(exc).__name__


def _would_block(error: ssl.SSLError) -> bool:
    return isinstance(error, ssl.SSLWantReadError | ssl.SSLWantWriteError)


def _connect_reason(causes: list[BaseException]) -> str:
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the name: {cause.strerror}"
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)  # e.g. "Connection refused"; the OS's text names addresses
    return "cannot connect"


class _ConnectionTrace:
    """httpcore's `trace` extension for one attempt: did it dial, did a response start?"""

    def __init__(self) -> None:
        self.dialed = False
        self.answered = False

    async def __call__(self, event: str, info: dict) -> None:
        if event.startswith(("connection.connect_tcp.", "connection.connect_unix_socket.")):
            self.dialed = True
        elif event in ("http11.receive_response_headers.complete", "http2.receive_response_headers.complete"):
            self.answered = True

    def dead_pooled_connection(self, exc: httpx.HTTPError) -> bool:
        """The request went out on a reused connection that failed before any response arrived."""
        if self.dialed or self.answered or isinstance(exc, httpx.TimeoutException):
            return False
        return isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError)


def _streams_a_body(headers: Headers) -> bool:
    """A body arrives through `receive()` (so it can be sent only once): chunked or a non-zero length."""
    if any(name == b"transfer-encoding" for name, _ in headers):
        return True
    lengths = [value.strip() for name, value in headers if name == b"content-length"]
    return any(length != b"0" for length in lengths)


class MlflowProxy:
    """The ASGI app; see the module docstring. `client` is owned (and closed) by the caller."""

    def __init__(self, upstream_base_url: str, client: httpx.AsyncClient) -> None:
        upstream = httpx.URL(upstream_base_url)
        if upstream.scheme not in ("http", "https") or not upstream.host:
            raise ValueError(f"upstream_base_url must be an absolute http(s) URL, got {upstream_base_url!r}")
        if upstream.query or upstream.fragment:
            raise ValueError("upstream_base_url must not have a query or fragment")
        self.upstream = upstream.copy_with(username=None, password=None, query=None, fragment=None)
        self.base_path = self.upstream.raw_path.rstrip(b"/")  # b"" or e.g. b"/base"
        self.origin = (self.upstream.scheme, self.upstream.raw_host, self.upstream.port)
        self.upstream_host = upstream.netloc.decode("ascii")  # host:port, never userinfo
        self.client = client

    def upstream_url(self, scope: dict) -> httpx.URL:
        """The URL to send: the configured upstream with only the path below its base and the query
        replaced. Raises `RefusedPath` (see `route_path`)."""
        target = self.base_path + route_path(scope).encode("ascii")
        if query := without_query_key(scope.get("query_string", b"")):
            target += b"?" + query
        try:
            url = self.upstream.copy_with(raw_path=target)
        except (httpx.InvalidURL, UnicodeDecodeError):
            raise RefusedPath("the path or query is not a valid URL part") from None
        # Built from components, so this holds by construction; checked because it is the point.
        if (url.scheme, url.raw_host, url.port) != self.origin or not url.raw_path.startswith(
            self.base_path + b"/"
        ):
            raise RefusedPath("the request would leave the configured upstream")
        return url

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # only when run alone; a Mount never passes lifespan down
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        await self._proxy(scope, receive, send)

    async def _proxy(self, scope, receive, send) -> None:
        started = time.monotonic()
        request_id = request_id_of(scope)
        method = scope["method"]
        try:
            url = self.upstream_url(scope)
        except RefusedPath as refused:
            shown = (scope.get("raw_path") or scope["path"].encode("utf-8", "replace"))[:200]
            log.warning(
                "mlflow proxy: %s %r refused (400, %s; request %s)",
                method,
                shown,
                refused,
                request_id.decode(),
            )
            await self._error(send, 400, "MLflow path refused", str(refused), request_id)
            return
        path = url.raw_path.partition(b"?")[0].decode("ascii")  # for log lines: encoded, never the query
        headers = upstream_request_headers(scope, request_id)
        incoming = [(name.lower(), value) for name, value in scope.get("headers", [])]
        has_body = _streams_a_body(incoming)
        replayable = method in IDEMPOTENT and not has_body
        for attempt in (1, 2):
            trace = _ConnectionTrace()
            request = httpx.Request(
                method,
                url,
                headers=headers,
                content=_body(receive) if has_body else None,
                # Built directly, not with client.build_request: no client default headers, cookies
                # or params are merged into a request that is someone else's. Timeouts still apply.
                extensions={"timeout": self.client.timeout.as_dict(), "trace": trace},
            )
            try:
                response = await self.client.send(request, stream=True, follow_redirects=False)
            except _ClientGone:
                log.info("mlflow proxy: client went away during the upload (request %s)", request_id.decode())
                return
            except httpx.HTTPError as exc:
                if attempt == 1 and replayable and trace.dead_pooled_connection(exc):
                    log.info(
                        "mlflow proxy: %s %s -> %s: the pooled connection was closed before any answer "
                        "(%s); sending it once more (request %s)",
                        method,
                        path,
                        self.upstream_host,
                        type(exc).__name__,
                        request_id.decode(),
                    )
                    continue
                status, detail, reason = classify(exc)
                log.warning(
                    "mlflow proxy: %s %s -> %s failed (%d, %s; request %s, attempt %d): %r; headers %s",
                    method,
                    path,
                    self.upstream_host,
                    status,
                    reason,
                    request_id.decode(),
                    attempt,
                    exc,
                    masked_headers(scope.get("headers", [])),
                )
                await self._error(send, status, detail, reason, request_id)
                return
            break
        try:
            outcome = await _relay(response, receive, send, request_id)
        finally:
            await response.aclose()  # mid-stream, this drops the upstream connection instead of pooling it
        if isinstance(outcome, httpx.HTTPError):  # the status is sent: we can only cut the response short
            log.warning(
                "mlflow proxy: %s %s -> %s broke off mid-response (request %s): %r",
                method,
                path,
                self.upstream_host,
                request_id.decode(),
                outcome,
            )
            raise outcome
        if outcome is not None:
            log.info("mlflow proxy: client went away during the response (request %s)", request_id.decode())
            return
        log.debug(
            "mlflow proxy: %s %s -> %s %d in %.0f ms (request %s); headers %s",
            method,
            path,
            self.upstream_host,
            response.status_code,
            (time.monotonic() - started) * 1000,
            request_id.decode(),
            masked_headers(scope.get("headers", [])),
        )

    async def _error(self, send, status: int, detail: str, reason: str, request_id: bytes) -> None:
        """Our own error in MLflow's shape: `error_code` from the status, `message` = detail: reason."""
        await send_mlflow_error(
            send,
            status,
            None,
            f"{detail}: {reason}",
            [(REQUEST_ID, request_id)],
            upstream=self.upstream_host,
            reason=reason,
            request_id=request_id.decode(),
        )


async def _relay(response: httpx.Response, receive, send, request_id: bytes) -> BaseException | None:
    """Stream the upstream response down; stop as soon as the client disconnects.

    uvicorn (ASGI spec 2.3) silently drops what is sent after a disconnect, so without the
    watcher a departed client would still pull a multi-GB artifact through the proxy.
    Returns None when complete, the upstream's error, or `_ClientGone`.
    """
    outcome: BaseException | None = None
    complete = False
    async with anyio.create_task_group() as watch:

        async def cancel_on_disconnect() -> None:
            nonlocal outcome
            while (await receive())["type"] != "http.disconnect":
                pass
            # uvicorn answers `receive()` with http.disconnect as soon as the last body message is
            # sent; if the watcher runs before the cancellation below, that is no departed client.
            if not complete:
                outcome = _ClientGone()
            watch.cancel_scope.cancel()

        watch.start_soon(cancel_on_disconnect)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": downstream_response_headers(response.headers.raw, request_id),
                }
            )
            async for chunk in response.aiter_raw():  # raw: Content-Encoding passes through untouched
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
        except httpx.HTTPError as exc:
            outcome = exc
        except OSError:  # ASGI spec 2.4 servers raise it from send() after a disconnect
            outcome = _ClientGone()
        finally:
            watch.cancel_scope.cancel()
    return outcome


async def _body(receive) -> AsyncIterator[bytes]:
    """The request body as it arrives: one ASGI message at a time, never all of it."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


def mlflow_proxy_app(upstream_base_url: str, client: httpx.AsyncClient) -> MlflowProxy:
    """The `/mlflow` proxy: `Mount("/mlflow", app=mlflow_proxy_app("https://mlflow...:5000", client))`."""
    return MlflowProxy(upstream_base_url, client)
