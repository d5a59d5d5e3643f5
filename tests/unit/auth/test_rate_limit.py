"""The in-memory sliding window with a fixed clock, and the decision's headers.

The Redis limiter (atomicity, two instances, real time) is in tests/integration/test_api_key_path.py.
"""

from __future__ import annotations

import pytest

from runtime.auth.key_cache import cache_from_environ
from runtime.auth.rate_limit import (
    UNLIMITED,
    MemoryRateLimiter,
    RateDecision,
    RedisRateLimiter,
    limiter_from_environ,
)
from runtime.auth.redis_client import redis_from_environ

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_remaining_counts_down_exactly_then_refuses_with_retry_after():
    clock = Clock()
    limiter = MemoryRateLimiter(clock=clock)
    for expected_remaining in (4, 3, 2, 1, 0):
        decision = await limiter.hit("key-1", 5)
        assert decision.allowed and decision.remaining == expected_remaining
        assert decision.reset_at == T0 + 3600 and decision.retry_after == 0
        clock.now += 1
    refused = await limiter.hit("key-1", 5)
    assert refused == RateDecision(allowed=False, limit=5, remaining=0, reset_at=T0 + 3600, retry_after=3595)


async def test_window_slides_one_hit_at_a_time():
    clock = Clock()
    limiter = MemoryRateLimiter(clock=clock)
    for offset in (0, 10, 20):
        clock.now = T0 + offset
        assert (await limiter.hit("k", 3)).allowed
    clock.now = T0 + 3599.5
    refused = await limiter.hit("k", 3)
    assert not refused.allowed and refused.retry_after == 1
    clock.now = T0 + 3600  # the first hit leaves the window
    decision = await limiter.hit("k", 3)
    assert decision.allowed and decision.remaining == 0 and decision.reset_at == T0 + 3610
    assert not (await limiter.hit("k", 3)).allowed
    clock.now = T0 + 3620  # the second and third leave too
    assert (await limiter.hit("k", 3)).remaining == 1


async def test_refused_hits_do_not_count():
    clock = Clock()
    limiter = MemoryRateLimiter(clock=clock)
    assert (await limiter.hit("k", 1)).allowed
    for _ in range(100):
        clock.now += 1
        assert not (await limiter.hit("k", 1)).allowed
    clock.now = T0 + 3600
    assert (await limiter.hit("k", 1)).allowed


async def test_keys_have_separate_budgets():
    limiter = MemoryRateLimiter(clock=Clock())
    assert (await limiter.hit("a", 1)).allowed
    assert not (await limiter.hit("a", 1)).allowed
    assert (await limiter.hit("b", 1)).allowed


async def test_no_limit_is_always_allowed_without_headers():
    limiter = MemoryRateLimiter(clock=Clock())
    for _ in range(10):
        assert await limiter.hit("k", None) == UNLIMITED
    assert UNLIMITED.headers() == []


async def test_zero_limit_refuses_everything():
    decision = await MemoryRateLimiter(clock=Clock()).hit("k", 0)
    assert not decision.allowed and decision.retry_after == 3600


async def test_custom_window():
    clock = Clock()
    limiter = MemoryRateLimiter(window_seconds=60, clock=clock)
    assert (await limiter.hit("k", 1)).allowed
    assert (await limiter.hit("k", 1)).retry_after == 60
    clock.now += 60
    assert (await limiter.hit("k", 1)).allowed


async def test_idle_keys_are_forgotten():
    clock = Clock()
    limiter = MemoryRateLimiter(clock=clock)
    await limiter.hit("idle", 10)
    clock.now += 3600
    for _ in range(10_000):
        await limiter.hit("busy", None)  # unlimited hits do not touch the log
    for _ in range(10_000):
        await limiter.hit("busy", 1_000_000)
    assert set(limiter._hits) == {"busy"}


def test_headers_when_allowed_and_when_refused():
    allowed = RateDecision(allowed=True, limit=10, remaining=7, reset_at=1_800_003_600, retry_after=0)
    assert allowed.headers() == [
        (b"x-ratelimit-limit", b"10"),
        (b"x-ratelimit-remaining", b"7"),
        (b"x-ratelimit-reset", b"1800003600"),
    ]
    refused = RateDecision(allowed=False, limit=10, remaining=0, reset_at=1_800_003_600, retry_after=12)
    assert refused.headers()[-1] == (b"retry-after", b"12")
    assert len(refused.headers()) == 4


def test_limiter_from_environ_chooses_by_redis_url(caplog):
    assert isinstance(limiter_from_environ({}), MemoryRateLimiter)
    assert "per process" in caplog.text
    assert isinstance(limiter_from_environ({"REDIS_URL": "redis://127.0.0.1:1/0"}), RedisRateLimiter)


def test_the_limiter_and_the_key_cache_share_the_processs_one_client(caplog):
    caplog.set_level("INFO", logger="runtime.auth.rate_limit")
    environ = {"REDIS_URL": "redis://127.0.0.1:1/0", "HOKUSAI_MTLS_REDIS_MAX_CONNECTIONS": "7"}
    shared = redis_from_environ(environ)
    limiter = limiter_from_environ(environ, shared)
    cache = cache_from_environ(environ, shared)
    assert limiter._script.registered_client is shared
    assert cache._redis is shared
    assert (
        "rate limit: Redis at redis://127.0.0.1:1/0 (at most 7 connections, waiting at most 0.5 s"
        in caplog.text
    )
    assert isinstance(limiter_from_environ({}, None), MemoryRateLimiter)  # no REDIS_URL: no Redis at all
