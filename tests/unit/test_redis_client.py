"""The Redis client's settings and the breaker that keeps a Redis outage off the request path."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError

from runtime.redis_client import Breaker, describe, redis_from_environ


def test_no_url_no_client():
    assert redis_from_environ({}) is None
    assert redis_from_environ({"REDIS_URL": "  "}) is None


def test_client_fails_fast():
    client = redis_from_environ({"REDIS_URL": "redis://cache.internal:6380/3"})
    settings = client.connection_pool.connection_kwargs
    assert settings["host"] == "cache.internal" and settings["port"] == 6380 and settings["db"] == 3
    assert settings["socket_timeout"] == settings["socket_connect_timeout"] == 1.0
    assert settings["retry"].get_retries() == 1


def test_describe_never_shows_the_password():
    assert (
        describe({"REDIS_URL": "rediss://user:hunter2@cache.internal:6380/2"})
        == "rediss://cache.internal:6380/2"
    )
    assert describe({"REDIS_URL": "redis://cache.internal"}) == "redis://cache.internal:6379/0"


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_skips_redis_for_the_cooldown_and_logs_once_per_outage(caplog):
    clock = Clock()
    breaker = Breaker("key cache", cooldown=5, clock=clock)
    assert not breaker.skip()
    breaker.failed(RedisConnectionError("refused"))
    assert breaker.skip()
    clock.now = 104.9
    assert breaker.skip()
    clock.now = 105.0
    assert not breaker.skip()  # time to try again
    breaker.failed(RedisConnectionError("refused"))
    assert breaker.skip()
    assert caplog.text.count("Redis failed") == 1
    clock.now = 111.0
    breaker.succeeded()
    assert not breaker.skip()
    assert "Redis answers again" in caplog.text
