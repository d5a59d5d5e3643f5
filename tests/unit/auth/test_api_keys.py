"""The API-key path without a network: extraction, fingerprints, the cache format, the validator's rules.

The auth service's HTTP side (the contract, timeouts, malformed answers over a real socket)
is in tests/integration/test_api_key_path.py; here its client talks to httpx.MockTransport.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest

from local_stack.auth_service import key_record
from runtime.auth.api_keys import (
    NEGATIVE,
    ApiKeyInfo,
    ApiKeyValidator,
    AuthServiceClient,
    Validation,
    extract_api_key,
    fingerprint,
)
from runtime.auth.key_cache import MemoryKeyCache, RedisKeyCache, cache_from_environ
from runtime.errors import AuthServiceUnavailable, MtlsError

pytestmark = pytest.mark.anyio

KEY = "hk_live_s3cr3t-key-value"
NOW = 1_800_000_000.0  # 2027-01-15


@pytest.fixture
def anyio_backend():
    return "asyncio"  # redis.asyncio and httpx's asyncio transport; not trio


def http_scope(headers=(), query=b""):
    return {
        "type": "http",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers],
        "query_string": query,
    }


def info(**overrides) -> ApiKeyInfo:
    fields = {
        "api_key_id": "key-1",
        "user_id": "user-1",
        "service_id": None,
        "scopes": ("read",),
        "rate_limit_per_hour": 100,
        "expires_at": None,
        "is_active": True,
    } | overrides
    return ApiKeyInfo(**fields)


# --- extraction -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ([("Authorization", f"Bearer {KEY}")], b"", KEY),
        ([("Authorization", f"bearer   {KEY}  ")], b"", KEY),  # scheme is case-insensitive
        ([("X-API-Key", KEY)], b"", KEY),
        ([], f"api_key={KEY}".encode(), KEY),
        ([], b"other=1&api_key=a%2Bb%20c", "a+b c"),  # percent-decoded
        ([], b"", None),
        ([("Authorization", "Bearer ")], b"", None),
        ([("X-API-Key", "   ")], b"api_key=", None),
        ([("Authorization", "Basic dXNlcjpwYXNz")], b"", None),  # not a key
    ],
)
def test_extract_from_each_place(headers, query, expected):
    assert extract_api_key(http_scope(headers, query)) == expected


def test_extract_precedence_bearer_then_header_then_query():
    everywhere = [("Authorization", "Bearer from-bearer"), ("X-API-Key", "from-header")]
    query = b"api_key=from-query"
    assert extract_api_key(http_scope(everywhere, query)) == "from-bearer"
    assert extract_api_key(http_scope(everywhere[1:], query)) == "from-header"
    assert extract_api_key(http_scope([("Authorization", "Basic x"), everywhere[1]], query)) == "from-header"
    assert extract_api_key(http_scope([], query)) == "from-query"


def test_extract_takes_the_first_of_repeated_headers():
    scope = http_scope([("X-API-Key", "first"), ("X-API-Key", "second")])
    assert extract_api_key(scope) == "first"


# --- fingerprint -------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [KEY, "hk_test_" + "0" * 56, "ünïcode-key-with-spaces and more"])
def test_fingerprint_never_shows_the_key(key):
    print_ = fingerprint(key)
    assert len(print_) == 64 and int(print_, 16) >= 0
    assert print_ != key and key not in print_
    assert fingerprint(key) == print_  # stable: a cache key
    assert fingerprint(key + "x") != print_


# --- the cache format ---------------------------------------------------------------------------
def test_info_json_round_trip():
    original = info(service_id="svc", scopes=("a", "b"), expires_at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert ApiKeyInfo.from_json(original.to_json()) == original
    assert ApiKeyInfo.from_json(original.to_json().encode()) == original
    unlimited = info(rate_limit_per_hour=None)
    assert ApiKeyInfo.from_json(unlimited.to_json()) == unlimited


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"api_key_id": "k"}',
        info().to_json().replace('"is_active":true', '"is_active":"yes"'),
        info().to_json().replace('"rate_limit_per_hour":100', '"rate_limit_per_hour":true'),
    ],
)
def test_info_from_json_refuses_what_it_did_not_write(text):
    with pytest.raises(ValueError):  # noqa: PT011 - every variant has its own message
        ApiKeyInfo.from_json(text)


# --- the auth service's answers (no network: httpx.MockTransport) -------------------------------
def client_answering(status: int, body) -> AuthServiceClient:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=content))
    return AuthServiceClient("http://auth.test/", client=httpx.AsyncClient(transport=transport))


async def test_answer_is_parsed_into_info():
    record = key_record("key-9", service_id="svc", expires_at="2030-01-01T00:00:00", rate_limit_per_hour=None)
    result = await client_answering(200, record).validate(KEY, request_id="r")
    assert result == ApiKeyInfo(
        api_key_id="key-9",
        user_id="user-1",
        service_id="svc",
        scopes=("read", "write"),
        rate_limit_per_hour=None,
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),  # no offset: read as UTC
        is_active=True,
    )


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_unknown_key_statuses_mean_none(status):
    assert await client_answering(status, {"detail": "no"}).validate(KEY, request_id="r") is None


@pytest.mark.parametrize(
    ("status", "body", "cause"),
    [
        (500, {"detail": "boom"}, "HTTP 500"),
        (400, {"detail": "bad"}, "HTTP 400"),
        (302, b"", "HTTP 302"),
        (200, b"<html>", "malformed answer"),
        (200, b"\xff\xfe", "malformed answer"),
        (200, [], "malformed answer"),
        (200, key_record("k", is_active="true"), "is_active"),
        (200, key_record("k", scopes="read"), "scopes"),
        (200, key_record("k", scopes=[1]), "scopes"),
        (200, key_record("k", rate_limit_per_hour=-1), "negative"),
        (200, key_record("k", rate_limit_per_hour=1.5), "rate_limit_per_hour"),
        (200, key_record("k", expires_at="next tuesday"), "ISO-8601"),
        (200, key_record(""), "must not be empty"),
        (200, {k: v for k, v in key_record("k").items() if k != "user_id"}, "user_id"),
    ],
)
async def test_anything_else_fails_closed_naming_url_and_cause_not_the_key(status, body, cause):
    with pytest.raises(AuthServiceUnavailable, match=cause) as caught:
        await client_answering(status, body).validate(KEY, request_id="r")
    message = str(caught.value)
    assert "http://auth.test/api/v1/keys/validate" in message
    assert KEY not in message
    assert caught.value.code == "auth-service-unavailable" and isinstance(caught.value, MtlsError)


async def test_request_carries_key_in_body_and_request_id_header():
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401)

    client = AuthServiceClient(
        "http://auth.test", client=httpx.AsyncClient(transport=httpx.MockTransport(answer))
    )
    await client.validate(KEY, request_id=b"req-42")
    (request,) = seen
    assert request.method == "POST" and str(request.url) == "http://auth.test/api/v1/keys/validate"
    assert request.headers["x-request-id"] == "req-42"
    assert json.loads(request.content) == {"api_key": KEY}
    assert KEY not in str(request.url)


async def test_aclose_leaves_a_given_client_open():
    given = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(401)))
    await AuthServiceClient("http://auth.test", client=given).aclose()
    assert not given.is_closed
    own = AuthServiceClient("http://auth.test")
    await own.aclose()
    assert own._client.is_closed


# --- the validator's rules (a stub service, a memory cache, a fixed clock) ------------------------
class StubAuth:
    def __init__(self, answer: ApiKeyInfo | None) -> None:
        self.answer = answer
        self.calls = 0

    async def validate(self, api_key, *, request_id):
        self.calls += 1
        return self.answer


class RecordingCache(MemoryKeyCache):
    def __init__(self) -> None:
        super().__init__()
        self.ttls: list[int] = []

    async def set(self, fingerprint, entry, ttl_seconds):
        self.ttls.append(ttl_seconds)
        await super().set(fingerprint, entry, ttl_seconds)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


async def test_valid_key_is_cached_and_the_cache_is_keyed_by_fingerprint():
    cache = RecordingCache()
    validator = ApiKeyValidator(StubAuth(info()), cache, clock=Clock())
    assert await validator.validate(KEY, request_id="r") == Validation(info(), "ok", cached=False)
    assert await validator.validate(KEY, request_id="r") == Validation(info(), "ok", cached=True)
    assert validator.auth_service_calls == 1
    assert list(cache._entries) == [fingerprint(KEY)]
    assert cache.ttls == [300]


async def test_ttl_never_runs_past_expiry():
    cache = RecordingCache()
    validator = ApiKeyValidator(StubAuth(info(expires_at=at(NOW + 42.2))), cache, clock=Clock())
    assert (await validator.validate(KEY, request_id="r")).outcome == "ok"
    assert cache.ttls == [43]


async def test_unknown_key_is_cached_negatively():
    cache = RecordingCache()
    validator = ApiKeyValidator(StubAuth(None), cache, clock=Clock())
    assert await validator.validate(KEY, request_id="r") == Validation(None, "invalid", cached=False)
    assert await validator.validate(KEY, request_id="r") == Validation(None, "invalid", cached=True)
    assert validator.auth_service_calls == 1
    assert cache.ttls == [30]
    assert await cache.get(fingerprint(KEY)) is NEGATIVE


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [(info(is_active=False), "inactive"), (info(expires_at=at(NOW - 1)), "expired")],
)
async def test_expired_and_inactive_are_refused_and_cached_briefly(answer, outcome):
    cache = RecordingCache()
    validator = ApiKeyValidator(StubAuth(answer), cache, clock=Clock())
    assert await validator.validate(KEY, request_id="r") == Validation(answer, outcome, cached=False)
    assert await validator.validate(KEY, request_id="r") == Validation(answer, outcome, cached=True)
    assert cache.ttls == [30]


async def test_expiry_is_judged_on_every_request_even_from_the_cache():
    clock = Clock()
    validator = ApiKeyValidator(StubAuth(info(expires_at=at(NOW + 1000))), MemoryKeyCache(), clock=clock)
    assert (await validator.validate(KEY, request_id="r")).outcome == "ok"
    clock.now = NOW + 1000  # the cache (its own clock) still holds the entry
    assert (await validator.validate(KEY, request_id="r")) == Validation(
        info(expires_at=at(NOW + 1000)), "expired", cached=True
    )
    assert validator.auth_service_calls == 1


async def test_concurrent_misses_share_one_call():
    import asyncio

    class SlowAuth(StubAuth):
        async def validate(self, api_key, *, request_id):
            await asyncio.sleep(0.05)
            return await super().validate(api_key, request_id=request_id)

    auth = SlowAuth(info())
    validator = ApiKeyValidator(auth, MemoryKeyCache(), clock=Clock())
    results = await asyncio.gather(*(validator.validate(KEY, request_id=str(n)) for n in range(20)))
    assert {result.outcome for result in results} == {"ok"}
    assert auth.calls == 1 and validator.auth_service_calls == 1


async def test_auth_service_failure_propagates_and_is_not_cached():
    class DownAuth:
        url = "http://auth.test/api/v1/keys/validate"

        async def validate(self, api_key, *, request_id):
            raise AuthServiceUnavailable(self.url, "answered HTTP 503")

    cache = MemoryKeyCache()
    validator = ApiKeyValidator(DownAuth(), cache)
    for _ in range(2):
        with pytest.raises(AuthServiceUnavailable, match="503"):
            await validator.validate(KEY, request_id="r")
    assert len(cache) == 0 and validator.auth_service_calls == 2


def test_validator_refuses_zero_ttls():
    with pytest.raises(ValueError, match="ttl_seconds"):
        ApiKeyValidator(StubAuth(None), MemoryKeyCache(), ttl_seconds=0)


# --- MemoryKeyCache -------------------------------------------------------------------------------
async def test_memory_cache_expires_entries():
    clock = Clock(100.0)
    cache = MemoryKeyCache(clock=clock)
    await cache.set("f", info(), 10)
    clock.now = 109.9
    assert await cache.get("f") == info()
    clock.now = 110.0
    assert await cache.get("f") is None and len(cache) == 0


async def test_memory_cache_is_bounded_least_recently_used_first():
    cache = MemoryKeyCache(max_entries=2)
    await cache.set("a", info(), 60)
    await cache.set("b", NEGATIVE, 60)
    assert await cache.get("a") == info()  # a is now the most recently used
    await cache.set("c", info(api_key_id="c"), 60)
    assert len(cache) == 2
    assert await cache.get("b") is None
    assert await cache.get("a") == info()


def test_cache_from_environ_chooses_by_redis_url(caplog):
    caplog.set_level("INFO", logger="runtime.auth.key_cache")
    assert isinstance(cache_from_environ({}), MemoryKeyCache)
    cache = cache_from_environ({"REDIS_URL": "redis://:hunter2@cache.internal:6380/2"})
    assert isinstance(cache, RedisKeyCache)
    assert "redis://cache.internal:6380/2" in caplog.text
    assert "hunter2" not in caplog.text
