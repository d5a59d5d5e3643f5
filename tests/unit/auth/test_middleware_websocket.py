"""The middleware on a WebSocket scope: an mTLS caller identified and subject to the route policy, the
rest refused before the accept, and no per-request latency for a (long-lived) session."""

from __future__ import annotations

import asyncio

from runtime.auth.route_policy import parse_policy
from tests.support.asgi import http_scope, tls_extension

POLICY = {"mode": "enforce", "rules": [{"identities": ["api"], "methods": ["GET"], "paths": ["/stream"]}]}


async def accepting_app(scope, receive, send):
    await receive()
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": repr(scope["state"].get("service_id"))})
    await send({"type": "websocket.close", "code": 1000})


def session(middleware, scope) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return sent


def ws_scope(path="/stream", extensions=None):
    scope = {**http_scope(path=path, extensions=extensions), "type": "websocket", "scheme": "wss"}
    del scope["method"]  # a WebSocket scope has none: the policy sees the handshake's GET
    return scope


def test_an_mtls_websocket_caller_is_identified(middleware, ca):
    api = ca.issue_client("development", "api")
    built = middleware(app=accepting_app, route_policy=parse_policy(POLICY))
    sent = session(built, ws_scope(extensions=tls_extension(api.certificate)))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "'api'"
    assert not built.metrics._latency_ms  # no latency recorded for a WebSocket session


def test_the_route_policy_applies_to_a_websocket(middleware, ca):
    worker = ca.issue_client("development", "worker")
    built = middleware(app=accepting_app, route_policy=parse_policy(POLICY))
    sent = session(built, ws_scope(extensions=tls_extension(worker.certificate)))
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": sent[0]["reason"]}]
    assert "route policy" in sent[0]["reason"]


def test_an_unverified_websocket_caller_is_refused_before_accept(middleware):
    built = middleware(app=accepting_app)
    sent = session(built, ws_scope())
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "API key required"}]


def test_an_http_request_still_records_its_latency(middleware, ca):
    api = ca.issue_client("development", "api")
    built = middleware()
    scope = http_scope(path="/stream", extensions=tls_extension(api.certificate))

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        pass

    asyncio.run(built(scope, receive, send))
    assert built.metrics._latency_ms
