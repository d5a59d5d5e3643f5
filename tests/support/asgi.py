"""Calling `APIKeyAuthMiddleware` with plain ASGI scopes, as uvicorn builds them.

The TLS extension is what `runtime.serving.asgi_tls` puts there for a verified client; the API-key
validator is a counting stub (these helpers test the dispatch; tests/integration uses the
real HTTP double of the auth service).
"""

from __future__ import annotations

import asyncio
import io

from runtime.auth.api_keys import ApiKeyInfo, AuthServiceUnavailable, Validation
from runtime.auth.client_address import AddressPolicy, parse_networks
from runtime.auth.middleware import APIKeyAuthMiddleware
from runtime.auth.peer_identity import IdentityPolicy
from runtime.auth.rate_limit import MemoryRateLimiter
from runtime.certificates import pem
from runtime.observability.metrics import Metrics

INTERNAL = parse_networks("10.0.0.0/8", "test")
PROXIES = parse_networks("10.0.100.0/24", "test")


class CountingValidator:
    """Stands in for ApiKeyValidator: one good key, counts calls, can be 'down'."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    async def validate(self, api_key, *, request_id):
        self.calls += 1
        if self.down:
            raise AuthServiceUnavailable("http://auth.test", "down (test)")
        if api_key != "good-key":
            return Validation(None, "invalid", False)
        info = ApiKeyInfo("key-1", "user-1", None, ("mlflow:read",), 100, None, True)
        return Validation(info, "ok", False)


def tls_extension(certificate) -> dict:
    return {
        "tls": {"client_cert_chain": [pem.certificate_pem(certificate).decode()], "client_cert_name": "x"}
    }


def http_scope(*, peer="203.0.113.9", headers=(), extensions=None, method="GET", path="/api/x", query=b""):
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "client": (peer, 50000),
        "server": ("10.0.1.5", 5000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "extensions": extensions or {},
        "state": {},
    }


async def echo_state(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": repr(scope["state"]).encode()})


def call(middleware, scope) -> tuple[int, dict, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


class RecordingApp:
    """The app behind the middleware: records whether anything reached it."""

    def __init__(self) -> None:
        self.scopes: list[dict] = []

    async def __call__(self, scope, receive, send):
        self.scopes.append(scope)
        await echo_state(scope, receive, send)


def build_middleware(validator, **options) -> APIKeyAuthMiddleware:
    """The middleware over `echo_state` (or `app=`), development identities, our test CIDRs."""
    return APIKeyAuthMiddleware(
        options.pop("app", echo_state),
        identities=options.pop("identities", IdentityPolicy("development")),
        addresses=AddressPolicy(INTERNAL, PROXIES),
        validator=validator,
        limiter=MemoryRateLimiter(),
        metrics=Metrics(environment="development", service="mlflow", stream=io.StringIO()),
        **options,
    )
