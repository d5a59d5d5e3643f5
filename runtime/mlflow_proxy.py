"""The API service's `/mlflow` reverse proxy to the MLflow tracking server (seed 002 §2, seed 004).

A pure ASGI app, mounted with `Mount("/mlflow", app=mlflow_proxy_app(upstream, client))`:
every method goes to `{upstream}/{path}` with the query string byte-for-byte. Bodies stream
both ways in the chunks they arrive in, so a multi-GB artifact never sits in memory.

Headers (seed 004: the proxy must forward authentication): everything is forwarded, including
`Authorization`, except `Host` (set for the upstream), the hop-by-hop headers of RFC 9110 §7.6.1
plus any that `Connection` names, `Expect` (answered at this hop by our own server), and the
identity headers an outer proxy would set (`x-forwarded-client-cert`, `x-amzn-mtls-*`), which a
caller must not be able to smuggle in. `X-Request-ID` is kept (or created), sent upstream and
returned; `X-Forwarded-For` gets this hop's socket peer appended; `X-Forwarded-Proto` and
`X-Forwarded-Host` describe the request as this server received it. Upstream `Date`/`Server` are
dropped because our server writes its own (as nginx does).

The client is passed in (see `runtime.adaptive_client`): over mTLS the upstream sees *the API
service's* certificate on every proxied request, whoever the caller was, so the API must
authenticate `/mlflow` callers itself before this app runs.

Upstream failures become JSON errors that name the upstream host and nothing secret:
503 can't connect (refused, DNS), 504 timeout, 502 TLS refused either way or a broken response.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from urllib.parse import quote

import anyio
import httpx

from runtime.http_headers import REQUEST_ID, masked_headers, request_id_of, send_json

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
_NOT_FORWARDED = frozenset({b"host", b"expect", b"x-forwarded-client-cert"})
_NOT_FORWARDED_PREFIXES = (b"x-amzn-mtls-",)
_NOT_RETURNED = frozenset({b"date", b"server"})

"""A caller's id is kept if it looks like one; anything else (it goes into logs) gets replaced."""

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
        if not name.startswith(_NOT_FORWARDED_PREFIXES)
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


def _route_path(scope: dict) -> str:
    """The path below the mount point, still percent-encoded as the client sent it (`a%2Fb` stays)."""
    root = scope.get("root_path", "")
    raw = scope.get("raw_path")
    if raw is not None:
        path = raw.decode("latin-1")
        encoded_root = quote(root)
        return path[len(encoded_root) :] if root and path.startswith(encoded_root) else path
    path = scope["path"]
    return quote(path[len(root) :] if root and path.startswith(root) else path, safe="/:@!$&'()*+,;=-._~")


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


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


class MlflowProxy:
    """The ASGI app; see the module docstring. `client` is owned (and closed) by the caller."""

    def __init__(self, upstream_base_url: str, client: httpx.AsyncClient) -> None:
        upstream = httpx.URL(upstream_base_url)
        if upstream.scheme not in ("http", "https") or not upstream.host:
            raise ValueError(f"upstream_base_url must be an absolute http(s) URL, got {upstream_base_url!r}")
        if upstream.query or upstream.fragment:
            raise ValueError("upstream_base_url must not have a query or fragment")
        self.base = str(upstream.copy_with(username=None, password=None)).rstrip("/")
        self.upstream_host = upstream.netloc.decode("ascii")  # host:port, never userinfo
        self.client = client

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
        path = _route_path(scope) or "/"
        query = scope.get("query_string", b"")
        url = self.base + path + ("?" + query.decode("latin-1") if query else "")
        headers = upstream_request_headers(scope, request_id)
        incoming = {name.lower() for name, _ in scope.get("headers", [])}
        has_body = b"content-length" in incoming or b"transfer-encoding" in incoming
        request = httpx.Request(
            scope["method"],
            url,
            headers=headers,
            content=_body(receive) if has_body else None,
            # Built directly, not with client.build_request: no client default headers, cookies
            # or params are merged into a request that is someone else's. Timeouts still apply.
            extensions={"timeout": self.client.timeout.as_dict()},
        )
        try:
            response = await self.client.send(request, stream=True, follow_redirects=False)
        except _ClientGone:
            log.info("mlflow proxy: client went away during the upload (request %s)", request_id.decode())
            return
        except httpx.HTTPError as exc:
            status, detail, reason = classify(exc)
            log.warning(
                "mlflow proxy: %s %s -> %s failed (%d, %s; request %s): %r; headers %s",
                scope["method"],
                path,
                self.upstream_host,
                status,
                reason,
                request_id.decode(),
                exc,
                masked_headers(scope.get("headers", [])),
            )
            await self._error(send, status, detail, reason, request_id)
            return
        try:
            outcome = await _relay(response, receive, send, request_id)
        finally:
            await response.aclose()  # mid-stream, this drops the upstream connection instead of pooling it
        if isinstance(outcome, httpx.HTTPError):  # the status is sent: we can only cut the response short
            log.warning(
                "mlflow proxy: %s %s -> %s broke off mid-response (request %s): %r",
                scope["method"],
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
            scope["method"],
            path,
            self.upstream_host,
            response.status_code,
            (time.monotonic() - started) * 1000,
            request_id.decode(),
            masked_headers(scope.get("headers", [])),
        )

    async def _error(self, send, status: int, detail: str, reason: str, request_id: bytes) -> None:
        body = {
            "detail": detail,
            "upstream": self.upstream_host,
            "reason": reason,
            "request_id": request_id.decode(),
        }
        await send_json(send, status, body, [(REQUEST_ID, request_id)])


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
