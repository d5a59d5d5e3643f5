"""What the middleware tells the usage recorder: each request made with a key the backend knows, once."""

from __future__ import annotations

import asyncio

import pytest

from runtime.auth.api_keys import ApiKeyInfo, AuthServiceUnavailable, Validation
from tests.support.asgi import build_middleware, call, http_scope, tls_extension

GOOD = ApiKeyInfo("key-1", "alice", None, ("mlflow:read",), None, None, True)
KEYS = {
    "good-key": Validation(GOOD, "ok", False),
    "office-key": Validation(
        ApiKeyInfo("key-2", "alice", None, (), None, None, True, ("10.0.0.0/8",)), "ok", False
    ),
    "slow-key": Validation(ApiKeyInfo("key-3", "alice", None, (), 1, None, True), "ok", False),
    "old-key": Validation(ApiKeyInfo("key-4", "alice", None, (), None, None, True), "expired", False),
    "gone-key": Validation(ApiKeyInfo("key-5", "alice", None, (), None, None, False), "inactive", False),
}


class Validator:
    def __init__(self) -> None:
        self.down = False

    async def validate(self, api_key, *, request_id):
        if self.down:
            raise AuthServiceUnavailable("key store", "down (test)")
        return KEYS.get(api_key, Validation(None, "invalid", False))


class Sink:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, int, float]] = []

    def record(self, key_id, endpoint, status_code, seconds) -> None:
        self.records.append((key_id, endpoint, status_code, seconds))


def answering(status: int, *, wait: float = 0.0):
    async def app(scope, receive, send):
        if wait:
            await asyncio.sleep(wait)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


async def failing(scope, receive, send):
    raise RuntimeError("the app broke")


def with_key(key: str, **scope) -> dict:
    return http_scope(headers=[("X-API-Key", key)], **scope)


@pytest.fixture
def sink():
    return Sink()


@pytest.fixture
def validator():
    return Validator()


def test_a_request_with_a_valid_key_is_reported_once_with_the_apps_status(validator, sink):
    middleware = build_middleware(validator, usage=sink, app=answering(201))
    status, _, _ = call(middleware, with_key("good-key", method="POST", path="/api/v1/models"))
    assert status == 201
    assert len(sink.records) == 1
    key_id, endpoint, reported, seconds = sink.records[0]
    assert (key_id, endpoint, reported) == ("key-1", "POST /api/v1/models", 201)
    assert seconds >= 0


def test_the_reported_time_covers_the_apps_answer(validator, sink):
    middleware = build_middleware(validator, usage=sink, app=answering(200, wait=0.05))
    call(middleware, with_key("good-key"))
    (record,) = sink.records
    assert 0.05 <= record[3] < 5


def test_the_endpoint_never_carries_the_query_string_or_the_key(validator, sink):
    middleware = build_middleware(validator, usage=sink, app=answering(200))
    call(middleware, http_scope(path="/api/x", query=b"api_key=good-key&q=secret"))
    (record,) = sink.records
    assert record[1] == "GET /api/x"
    assert "good-key" not in repr(record) and "secret" not in repr(record)


@pytest.mark.parametrize("status", [200, 404, 500])
def test_whatever_the_app_answers_is_reported(validator, sink, status):
    call(build_middleware(validator, usage=sink, app=answering(status)), with_key("good-key"))
    assert [r[2] for r in sink.records] == [status]


def test_a_refusal_for_the_address_is_reported_as_403(validator, sink):
    middleware = build_middleware(validator, usage=sink, app=answering(200))
    status, _, _ = call(middleware, with_key("office-key", peer="203.0.113.9"))
    assert status == 403
    assert [(r[0], r[1], r[2]) for r in sink.records] == [("key-2", "GET /api/x", 403)]
    status, _, _ = call(middleware, with_key("office-key", peer="10.1.2.3"))
    assert status == 200
    assert [r[2] for r in sink.records] == [403, 200]


def test_a_refusal_for_the_rate_limit_is_reported_as_429(validator, sink):
    middleware = build_middleware(validator, usage=sink, app=answering(200))
    assert call(middleware, with_key("slow-key"))[0] == 200
    assert call(middleware, with_key("slow-key"))[0] == 429
    assert [(r[0], r[2]) for r in sink.records] == [("key-3", 200), ("key-3", 429)]


@pytest.mark.parametrize("key", ["unknown-key", "old-key", "gone-key"])
def test_a_key_that_is_refused_as_invalid_is_not_reported(validator, sink, key):
    status, _, _ = call(build_middleware(validator, usage=sink, app=answering(200)), with_key(key))
    assert status == 401
    assert sink.records == []


def test_a_request_without_a_key_or_with_the_backend_down_is_not_reported(validator, sink):
    middleware = build_middleware(validator, usage=sink, app=answering(200))
    assert call(middleware, http_scope())[0] == 401
    validator.down = True
    assert call(middleware, with_key("good-key"))[0] == 503
    assert sink.records == []


def test_an_mtls_caller_is_not_reported(validator, sink, ca):
    api = ca.issue_client("development", "api")
    middleware = build_middleware(validator, usage=sink, app=answering(200))
    status, _, _ = call(middleware, http_scope(extensions=tls_extension(api.certificate)))
    assert status == 200
    assert sink.records == []


def test_an_excluded_path_is_not_reported(validator, sink):
    middleware = build_middleware(validator, usage=sink, app=answering(200))
    assert call(middleware, with_key("good-key", path="/health"))[0] == 200
    assert sink.records == []


def test_an_app_that_raises_is_reported_as_500(validator, sink):
    middleware = build_middleware(validator, usage=sink, app=failing)

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        pass

    with pytest.raises(RuntimeError, match="the app broke"):
        asyncio.run(middleware(with_key("good-key", path="/api/boom"), receive, send))
    assert [(r[0], r[1], r[2]) for r in sink.records] == [("key-1", "GET /api/boom", 500)]


def websocket(app, validator, sink) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    scope = {**with_key("good-key", path="/ws"), "type": "websocket"}
    del scope["method"]
    asyncio.run(build_middleware(validator, usage=sink, app=app)(scope, receive, send))
    return sent


def test_an_accepted_websocket_is_reported_as_switching_protocols_not_as_a_failure(validator, sink):
    async def accepting(scope, receive, send):
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})

    assert [m["type"] for m in websocket(accepting, validator, sink)] == [
        "websocket.accept",
        "websocket.close",
    ]
    assert [(r[0], r[1], r[2]) for r in sink.records] == [("key-1", "WEBSOCKET /ws", 101)]


def test_a_websocket_the_app_refuses_is_reported_as_403(validator, sink):
    async def refusing(scope, receive, send):
        await send({"type": "websocket.close", "code": 1008})  # before accepting: the server answers 403

    websocket(refusing, validator, sink)
    assert [r[2] for r in sink.records] == [403]


def test_without_a_sink_requests_are_served_as_before(validator):
    assert call(build_middleware(validator, app=answering(200)), with_key("good-key"))[0] == 200
