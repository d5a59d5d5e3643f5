"""Redis for the key cache and the rate limiter: one bounded client from `REDIS_URL`, and a breaker.

Redis is an optimisation on the API-key path, not a dependency it may wait on: the client
gets short timeouts and one immediate retry (redis-py's default retries with back-off would
add seconds to every request during an outage), and after a failure `Breaker` skips Redis
for a few seconds. Options in the URL's query string (`?socket_timeout=...`) override ours.

One pool per process: `serve-api` and `serve-mlflow` build the client once (`redis_from_environ`)
and give the same one to the key cache and the rate limiter, and close it at shutdown. The pool is
a `BlockingConnectionPool` of at most `HOKUSAI_MTLS_REDIS_MAX_CONNECTIONS` connections (default
`DEFAULT_MAX_CONNECTIONS`): a burst of requests shares them instead of opening one connection per
request in flight (unbounded pools held 100 connections after 50 concurrent clients, and twice
that against a Redis that never answered). A request that finds every connection busy waits at
most `POOL_TIMEOUT_SECONDS` for one, then gets a `ConnectionError` like any other Redis failure:
the cache misses (the auth service answers), the rate limit lets it through, and the breaker
skips Redis for a while. So a Redis that is down or hung costs a request at most about
`POOL_TIMEOUT_SECONDS` + 2 x `SOCKET_TIMEOUT_SECONDS`, once per outage and cool-down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from runtime import env_numbers, names

log = logging.getLogger(__name__)

ENV_REDIS_URL = names.ENV_REDIS_URL
"""`redis://[:password@]host:port/db` (or `rediss://`); unset: in-process cache and rate limits."""
ENV_REDIS_MAX_CONNECTIONS = names.ENV_REDIS_MAX_CONNECTIONS
SOCKET_TIMEOUT_SECONDS = 1.0
COOLDOWN_SECONDS = 5.0
DEFAULT_MAX_CONNECTIONS = 32
"""Per process. A request makes two or three short Redis calls in turn, so 32 connections carry
32 requests at the same step at once; 2 API tasks and 2 MLflow tasks hold at most 128 together."""
MAX_CONNECTIONS_LIMIT = 10_000
POOL_TIMEOUT_SECONDS = 0.5
"""How long a Redis call waits for a free connection of the pool before it counts as a failure."""


def configured(environ: Mapping[str, str]) -> bool:
    """`REDIS_URL` is set (to more than blanks)."""
    return bool(environ.get(ENV_REDIS_URL, "").strip())


def max_connections(environ: Mapping[str, str]) -> int:
    """`HOKUSAI_MTLS_REDIS_MAX_CONNECTIONS`, else the default; ValueError naming the variable if bad."""
    return env_numbers.whole(
        environ, ENV_REDIS_MAX_CONNECTIONS, default=DEFAULT_MAX_CONNECTIONS, low=1, high=MAX_CONNECTIONS_LIMIT
    )


def redis_from_environ(environ: Mapping[str, str]) -> redis.asyncio.Redis | None:
    """A client on a new bounded pool, or None without `REDIS_URL`. Build it once per process and
    share it; `await client.aclose()` closes the pool's connections."""
    if not configured(environ):
        return None
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        environ[ENV_REDIS_URL].strip(),
        max_connections=max_connections(environ),
        timeout=POOL_TIMEOUT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), retries=1),
    )
    return redis.asyncio.Redis.from_pool(pool)  # the client owns the pool: aclose() disconnects it


def describe(environ: Mapping[str, str]) -> str:
    """`REDIS_URL` fit for a log line: scheme, host, port and database, never the password."""
    parts = urlsplit(environ.get(ENV_REDIS_URL, "").strip())
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


def describe_pool(client: redis.asyncio.Redis) -> str:
    """For the start-up log line: the pool's bound and how long a call waits for a connection."""
    pool = client.connection_pool
    wait = getattr(pool, "timeout", None)
    return f"at most {pool.max_connections} connections" + (
        f", waiting at most {wait:g} s for one" if wait is not None else ""
    )


class Breaker:
    """After a Redis failure, `skip()` says so for `cooldown` seconds; logs once per outage.

    >>> if not breaker.skip():
    ...     try:
    ...         value = await client.get(key)
    ...     except RedisError as exc:
    ...         breaker.failed(exc)
    ...     else:
    ...         breaker.succeeded()
    """

    def __init__(
        self, user: str, *, cooldown: float = COOLDOWN_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._user = user
        self._cooldown = cooldown
        self._clock = clock
        self._failing = False
        self._retry_at = 0.0

    def skip(self) -> bool:
        return self._failing and self._clock() < self._retry_at

    def failed(self, exc: RedisError) -> None:
        if not self._failing:
            log.warning(
                "%s: Redis failed, skipping it for %.0f s at a time: %r", self._user, self._cooldown, exc
            )
        self._failing = True
        self._retry_at = self._clock() + self._cooldown

    def succeeded(self) -> None:
        if self._failing:
            log.warning("%s: Redis answers again", self._user)
        self._failing = False
