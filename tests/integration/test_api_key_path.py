"""The API-key path for real: the fake auth service over HTTP on the loopback, a real redis-server.

The auth service is a test double (local_stack/auth_service.py) of a service we do not own;
Redis is Debian's redis-server, started once per session by tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis.asyncio

from local_stack import auth_service
from local_stack.auth_service import (
    ACTIVE_KEY,
    EXPIRED_KEY,
    INACTIVE_KEY,
    LIMITED_KEY,
    UNKNOWN_KEY,
    FakeAuthService,
)
from runtime.auth.api_keys import ApiKeyValidator, AuthServiceClient, Validation, fingerprint
from runtime.auth.key_cache import NEGATIVE, MemoryKeyCache, RedisKeyCache
from runtime.auth.rate_limit import UNLIMITED, RedisRateLimiter
from runtime.auth.redis_client import redis_from_environ
from runtime.errors import AuthServiceUnavailable
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def anyio_backend():
    return "asyncio"  # redis.asyncio runs on asyncio only


@pytest.fixture(scope="module")
def fake_auth():
    service = FakeAuthService()
    with service.serving() as base_url:
        service.base_url = base_url
        yield service


@pytest.fixture
def fake(fake_auth):
    """The module's fake auth service, reset for this test."""
    fake_auth.keys = dict(auth_service.EXAMPLE_KEYS)
    fake_auth.calls, fake_auth.request_ids = 0, []
    fake_auth.delay, fake_auth.down, fake_auth.raw_answer = 0.0, False, None
    return fake_auth


@pytest.fixture
async def auth(fake):
    client = AuthServiceClient(fake.base_url)
    yield client
    await client.aclose()


@pytest.fixture
async def aredis(redis_url):
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


# --- the validator against the fake service ----------------------------------------------------
async def test_first_call_asks_the_service_then_the_cache_answers(fake, auth):
    validator = ApiKeyValidator(auth, MemoryKeyCache())
    first = await validator.validate(ACTIVE_KEY, request_id="req-1")
    assert first.outcome == "ok" and not first.cached
    assert first.info.api_key_id == "key-active" and first.info.scopes == ("read", "write")
    second = await validator.validate(ACTIVE_KEY, request_id="req-2")
    assert second == Validation(first.info, "ok", cached=True)
    assert fake.calls == 1 and validator.auth_service_calls == 1
    assert fake.request_ids == ["req-1"]


async def test_cache_entry_expires_after_the_ttl(fake, auth):
    validator = ApiKeyValidator(auth, MemoryKeyCache(), ttl_seconds=1)
    await validator.validate(ACTIVE_KEY, request_id="r")
    await asyncio.sleep(1.05)
    assert not (await validator.validate(ACTIVE_KEY, request_id="r")).cached
    assert fake.calls == 2


@pytest.mark.parametrize(("key", "outcome"), [(EXPIRED_KEY, "expired"), (INACTIVE_KEY, "inactive")])
async def test_expired_and_inactive_are_refused_also_when_cached(fake, auth, key, outcome):
    validator = ApiKeyValidator(auth, MemoryKeyCache())
    fresh = await validator.validate(key, request_id="r")
    cached = await validator.validate(key, request_id="r")
    assert (fresh.outcome, fresh.cached) == (outcome, False)
    assert (cached.outcome, cached.cached) == (outcome, True)
    assert fake.calls == 1


async def test_a_flood_of_one_unknown_key_costs_one_call(fake, auth):
    validator = ApiKeyValidator(auth, MemoryKeyCache())
    results = [await validator.validate(UNKNOWN_KEY, request_id=str(n)) for n in range(50)]
    results += await asyncio.gather(*(validator.validate(UNKNOWN_KEY, request_id="r") for _ in range(50)))
    assert {(result.outcome, result.info) for result in results} == {("invalid", None)}
    assert fake.calls == 1


async def test_concurrent_first_requests_share_one_call(fake, auth):
    fake.delay = 0.1
    validator = ApiKeyValidator(auth, MemoryKeyCache())
    results = await asyncio.gather(*(validator.validate(ACTIVE_KEY, request_id="r") for _ in range(30)))
    assert {result.outcome for result in results} == {"ok"}
    assert fake.calls == 1


async def test_service_answering_503_fails_closed_and_is_not_cached(fake, auth):
    fake.down = True
    validator = ApiKeyValidator(auth, MemoryKeyCache())
    with pytest.raises(AuthServiceUnavailable, match="HTTP 503") as caught:
        await validator.validate(ACTIVE_KEY, request_id="r")
    assert fake.base_url in str(caught.value) and ACTIVE_KEY not in str(caught.value)
    fake.down = False
    assert (await validator.validate(ACTIVE_KEY, request_id="r")).outcome == "ok"


async def test_slow_service_times_out(fake):
    fake.delay = 1.0
    client = AuthServiceClient(fake.base_url, timeout=httpx.Timeout(0.2))
    validator = ApiKeyValidator(client, MemoryKeyCache())
    started = time.monotonic()
    with pytest.raises(AuthServiceUnavailable, match="timed out") as caught:
        await validator.validate(ACTIVE_KEY, request_id="r")
    assert time.monotonic() - started < 0.9
    assert isinstance(caught.value.__cause__, httpx.TimeoutException)
    await client.aclose()


async def test_stopped_service_refuses_connections():
    service = FakeAuthService()
    base_url = service.start()
    service.stop()
    client = AuthServiceClient(base_url)
    with pytest.raises(AuthServiceUnavailable, match="ConnectError") as caught:
        await ApiKeyValidator(client, MemoryKeyCache()).validate(ACTIVE_KEY, request_id="r")
    assert base_url in str(caught.value) and ACTIVE_KEY not in str(caught.value)
    await client.aclose()


@pytest.mark.parametrize(
    ("status", "body", "cause"),
    [
        (200, b"{not json", "malformed answer"),
        (200, b'{"key_id": "k"}', "malformed answer"),
        (200, b'{"key_id": "k", "user_id": "u", "scopes": "all", "is_active": true}', "scopes"),
        (500, b'{"detail": "internal"}', "HTTP 500"),
        (429, b"{}", "HTTP 429"),
    ],
)
async def test_malformed_or_unexpected_answers_fail_closed(fake, auth, status, body, cause):
    fake.raw_answer = (status, body)
    with pytest.raises(AuthServiceUnavailable, match=cause):
        await ApiKeyValidator(auth, MemoryKeyCache()).validate(ACTIVE_KEY, request_id="r")


# --- Redis as the shared cache ------------------------------------------------------------------------
async def test_redis_cache_is_shared_by_two_validators(fake, auth, aredis):
    first = ApiKeyValidator(auth, RedisKeyCache(aredis))
    second = ApiKeyValidator(auth, RedisKeyCache(aredis))
    assert (await first.validate(ACTIVE_KEY, request_id="r")).outcome == "ok"
    assert (await first.validate(UNKNOWN_KEY, request_id="r")).outcome == "invalid"
    on_second = await second.validate(ACTIVE_KEY, request_id="r")
    assert on_second.outcome == "ok" and on_second.cached
    assert (await second.validate(UNKNOWN_KEY, request_id="r")) == Validation(None, "invalid", cached=True)
    assert second.auth_service_calls == 0 and first.auth_service_calls == 2 and fake.calls == 2


async def test_redis_entries_are_keyed_by_fingerprint_with_ttls(fake, auth, aredis):
    validator = ApiKeyValidator(auth, RedisKeyCache(aredis))
    await validator.validate(ACTIVE_KEY, request_id="r")
    await validator.validate(UNKNOWN_KEY, request_id="r")
    keys = sorted(key.decode() for key in await aredis.keys("*"))
    assert keys == sorted(f"hokusai:apikey:{fingerprint(k)}" for k in (ACTIVE_KEY, UNKNOWN_KEY))
    assert 295 <= await aredis.ttl(f"hokusai:apikey:{fingerprint(ACTIVE_KEY)}") <= 300
    assert 25 <= await aredis.ttl(f"hokusai:apikey:{fingerprint(UNKNOWN_KEY)}") <= 30
    for key in keys:
        value = await aredis.get(key)
        assert ACTIVE_KEY.encode() not in value and UNKNOWN_KEY.encode() not in value


async def test_redis_cache_reads_back_what_it_wrote(aredis):
    cache = RedisKeyCache(aredis, prefix="t:")
    validation = await ApiKeyValidator(_FixedAuth(), MemoryKeyCache()).validate("k", request_id="r")
    await cache.set("f1", validation.info, 60)
    await cache.set("f2", NEGATIVE, 60)
    await aredis.set("t:f3", b"garbage")
    assert await cache.get("f1") == validation.info
    assert await cache.get("f2") is NEGATIVE
    assert await cache.get("f3") is None  # unreadable: a miss, not an error
    assert await cache.get("f4") is None


async def test_redis_down_the_cache_misses_and_the_service_answers(fake, auth, caplog):
    dead = _dead_redis()
    validator = ApiKeyValidator(auth, RedisKeyCache(dead))
    started = time.monotonic()
    for _ in range(3):
        assert (await validator.validate(ACTIVE_KEY, request_id="r")).outcome == "ok"
    assert time.monotonic() - started < 1  # one quick failure, then Redis is skipped
    assert fake.calls == 3
    assert caplog.text.count("key cache (misses go to the auth service): Redis failed") == 1
    await dead.aclose()


# --- Redis rate limiting -------------------------------------------------------------------------------
async def test_redis_remaining_counts_then_refusal_with_retry_after(aredis):
    limiter = RedisRateLimiter(aredis)
    started = time.time()
    remaining = [(await limiter.hit("key-1", 5)).remaining for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    refused = await limiter.hit("key-1", 5)
    assert not refused.allowed and refused.remaining == 0
    assert 3590 < refused.retry_after <= 3600
    assert started + 3599 <= refused.reset_at <= time.time() + 3601
    assert dict(refused.headers())[b"retry-after"] == str(refused.retry_after).encode()
    assert 3590 < await aredis.ttl("hokusai:ratelimit:key-1") <= 3600


async def test_redis_window_slides(aredis):
    limiter = RedisRateLimiter(aredis, window_seconds=1.0)
    assert (await limiter.hit("k", 2)).allowed
    await asyncio.sleep(0.5)
    assert (await limiter.hit("k", 2)).allowed
    refused = await limiter.hit("k", 2)
    assert not refused.allowed and refused.retry_after == 1
    await asyncio.sleep(0.6)  # the first hit has left the window, the second has not
    decision = await limiter.hit("k", 2)
    assert decision.allowed and decision.remaining == 0
    assert not (await limiter.hit("k", 2)).allowed


async def test_two_limiters_on_one_redis_share_the_budget(redis_url):
    one = redis.asyncio.Redis.from_url(redis_url)
    two = redis.asyncio.Redis.from_url(redis_url)
    first, second = RedisRateLimiter(one), RedisRateLimiter(two)
    decisions = [await (first if n % 2 else second).hit("shared", 4) for n in range(6)]
    assert [d.allowed for d in decisions] == [True] * 4 + [False] * 2
    assert [d.remaining for d in decisions] == [3, 2, 1, 0, 0, 0]
    assert (await first.hit("other", 4)).remaining == 3
    await one.aclose()
    await two.aclose()


async def test_fifty_concurrent_hits_at_limit_twenty_allow_exactly_twenty(redis_url):
    clients = [redis.asyncio.Redis.from_url(redis_url) for _ in range(2)]
    limiters = [RedisRateLimiter(client) for client in clients]
    decisions = await asyncio.gather(*(limiters[n % 2].hit("burst", 20) for n in range(50)))
    assert sum(d.allowed for d in decisions) == 20
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(20))
    assert all(d.retry_after > 0 for d in decisions if not d.allowed)
    assert await clients[0].zcard("hokusai:ratelimit:burst") == 20
    for client in clients:
        await client.aclose()


async def test_unlimited_keys_never_touch_redis(aredis):
    assert await RedisRateLimiter(aredis).hit("k", None) == UNLIMITED
    assert await aredis.keys("*") == []


async def test_redis_down_the_limiter_lets_requests_through_without_headers(caplog):
    dead = _dead_redis()
    limiter = RedisRateLimiter(dead)
    for _ in range(3):
        assert await limiter.hit("k", 1) == UNLIMITED
    assert caplog.text.count("letting requests through unlimited): Redis failed") == 1
    await dead.aclose()


async def test_the_limited_example_key_end_to_end(fake, auth, aredis):
    """The path the middleware takes: validate, then hit with the key's own limit (5 per hour)."""
    validator = ApiKeyValidator(auth, RedisKeyCache(aredis))
    limiter = RedisRateLimiter(aredis)
    allowed = []
    for _ in range(7):
        info = (await validator.validate(LIMITED_KEY, request_id="r")).info
        allowed.append((await limiter.hit(info.api_key_id, info.rate_limit_per_hour)).allowed)
    assert allowed == [True] * 5 + [False] * 2
    assert fake.calls == 1


# --- helpers ---------------------------------------------------------------------------------------------
class _FixedAuth:
    async def validate(self, api_key, *, request_id):
        from runtime.auth.api_keys import ApiKeyInfo

        return ApiKeyInfo("k-1", "u-1", "svc", ("a",), 10, None, True)


def _dead_redis() -> redis.asyncio.Redis:
    """A client made as production makes it (runtime.auth.redis_client), for a port nothing listens on."""
    return redis_from_environ({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
