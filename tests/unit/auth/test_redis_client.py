"""The Redis client's settings and the breaker that keeps a Redis outage off the request path."""

from __future__ import annotations

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from runtime import names
from runtime.auth.redis_client import (
    DEFAULT_MAX_CONNECTIONS,
    POOL_TIMEOUT_SECONDS,
    Breaker,
    describe,
    max_connections,
    redis_from_environ,
)


def test_no_url_no_client():
    assert redis_from_environ({}) is None
    assert redis_from_environ({"REDIS_URL": "  "}) is None


def test_client_fails_fast():
    client = redis_from_environ({"REDIS_URL": "redis://cache.internal:6380/3"})
    settings = client.connection_pool.connection_kwargs
    assert settings["host"] == "cache.internal" and settings["port"] == 6380 and settings["db"] == 3
    assert settings["socket_timeout"] == settings["socket_connect_timeout"] == 1.0
    assert settings["retry"].get_retries() == 1


def test_one_bounded_pool_that_waits_briefly_for_a_connection():
    client = redis_from_environ({"REDIS_URL": "redis://cache.internal:6380/3"})
    pool = client.connection_pool
    assert isinstance(pool, redis.asyncio.BlockingConnectionPool)
    assert pool.max_connections == DEFAULT_MAX_CONNECTIONS
    assert pool.timeout == POOL_TIMEOUT_SECONDS
    assert client.auto_close_connection_pool  # aclose() at shutdown disconnects the pool
    bounded = redis_from_environ({"REDIS_URL": "redis://c:6379/0", names.ENV_REDIS_MAX_CONNECTIONS: " 5 "})
    assert bounded.connection_pool.max_connections == 5


@pytest.mark.parametrize("value", ["0", "-1", "many", "2.5", "10001"])
def test_a_bad_bound_is_refused_naming_the_variable(value):
    with pytest.raises(
        ValueError, match=f"{names.ENV_REDIS_MAX_CONNECTIONS}='{value}': expected a whole number"
    ):
        max_connections({names.ENV_REDIS_MAX_CONNECTIONS: value})
    assert (
        max_connections({})
        == max_connections({names.ENV_REDIS_MAX_CONNECTIONS: ""})
        == DEFAULT_MAX_CONNECTIONS
    )


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
