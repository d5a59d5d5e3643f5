"""Redis for the key cache and the rate limiter: a client from `REDIS_URL`, and a breaker.

Redis is an optimisation on the API-key path, not a dependency it may wait on: the client
gets short timeouts and one immediate retry (redis-py's default retries with back-off would
add seconds to every request during an outage), and after a failure `Breaker` skips Redis
for a few seconds. Options in the URL's query string (`?socket_timeout=...`) override ours.
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

from runtime import names

log = logging.getLogger(__name__)

ENV_REDIS_URL = names.ENV_REDIS_URL
"""`redis://[:password@]host:port/db` (or `rediss://`); unset: in-process cache and rate limits."""
SOCKET_TIMEOUT_SECONDS = 1.0
COOLDOWN_SECONDS = 5.0


def redis_from_environ(environ: Mapping[str, str]) -> redis.asyncio.Redis | None:
    url = environ.get(ENV_REDIS_URL, "").strip()
    if not url:
        return None
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), retries=1),
    )


def describe(environ: Mapping[str, str]) -> str:
    """`REDIS_URL` fit for a log line: scheme, host, port and database, never the password."""
    parts = urlsplit(environ.get(ENV_REDIS_URL, "").strip())
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


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
