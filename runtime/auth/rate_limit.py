"""Per-key rate limits: a sliding-window log over the last hour, in memory or shared in Redis.

Each allowed hit is logged with its time; a hit is allowed while fewer than `limit` hits lie in
the last `window_seconds`. Refused hits are not logged, so a client that keeps retrying gets
through as soon as its oldest hit leaves the window (`Retry-After`). `X-RateLimit-Reset` is
that moment too: when the oldest counted hit leaves the window and `remaining` grows again.
A limit of None means unlimited; a limit of 0 refuses everything. In Redis, the limiter shares
the process's one bounded pool with the key cache (`runtime.auth.redis_client`).

>>> limiter = MemoryRateLimiter()
>>> decision = await limiter.hit("key-1", 1000)
>>> decision.allowed, decision.remaining
(True, 999)
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio
from redis.exceptions import RedisError

from runtime.auth import redis_client

log = logging.getLogger(__name__)

WINDOW_SECONDS = 3600


@dataclass(frozen=True)
class RateDecision:
    """`reset_at` is epoch seconds; `retry_after` seconds, > 0 only when refused."""

    allowed: bool
    limit: int | None
    remaining: int | None
    reset_at: int
    retry_after: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers (ASGI: lower-case names); none for an unlimited key."""
        if self.limit is None:
            return []
        headers = [
            (b"x-ratelimit-limit", str(self.limit).encode()),
            (b"x-ratelimit-remaining", str(self.remaining or 0).encode()),
            (b"x-ratelimit-reset", str(self.reset_at).encode()),
        ]
        if not self.allowed:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers


UNLIMITED = RateDecision(allowed=True, limit=None, remaining=None, reset_at=0, retry_after=0)


def _decide(limit: int, count: int, allowed: bool, now: float, oldest: float, window: float) -> RateDecision:
    """`count` hits in the window after this one; `oldest` the time of the oldest of them."""
    frees_at = oldest + window
    return RateDecision(
        allowed=allowed,
        limit=limit,
        remaining=max(0, limit - count),
        reset_at=math.ceil(frees_at),
        retry_after=0 if allowed else max(1, math.ceil(frees_at - now)),
    )


class RateLimiter(Protocol):
    async def hit(self, api_key_id: str, limit_per_hour: int | None) -> RateDecision: ...


class MemoryRateLimiter:
    """In-process: correct for one process only (N instances allow N times the limit)."""

    def __init__(
        self, *, window_seconds: float = WINDOW_SECONDS, clock: Callable[[], float] = time.time
    ) -> None:
        self._window = window_seconds
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._since_sweep = 0

    async def hit(self, api_key_id: str, limit_per_hour: int | None) -> RateDecision:
        if limit_per_hour is None:
            return UNLIMITED
        now = self._clock()
        self._sweep(now)
        hits = self._hits.setdefault(api_key_id, deque())
        while hits and hits[0] <= now - self._window:
            hits.popleft()
        allowed = len(hits) < limit_per_hour
        if allowed:
            hits.append(now)
        oldest = hits[0] if hits else now
        return _decide(limit_per_hour, len(hits), allowed, now, oldest, self._window)

    def _sweep(self, now: float) -> None:
        """Now and then, forget keys with no hit in the window, so memory follows the active keys."""
        self._since_sweep += 1
        if self._since_sweep < 10_000:
            return
        self._since_sweep = 0
        for key in [key for key, hits in self._hits.items() if not hits or hits[-1] <= now - self._window]:
            del self._hits[key]


# One round trip, atomic: every instance sees the same log, and concurrent hits cannot both take
# the last slot. Time is Redis's (TIME), so instances with skewed clocks still agree.
# KEYS[1] the key's sorted set; ARGV: limit, window in ms, a unique member for this hit.
# Returns {allowed (0/1), hits in the window, now (ms), oldest hit in the window (ms)}.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  count = count + 1
  allowed = 1
end
local oldest = now
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then oldest = tonumber(first[2]) end
if count > 0 then redis.call('PEXPIRE', KEYS[1], window) end
return {allowed, count, now, oldest}
"""


class RedisRateLimiter:
    """Shared by every instance: one sorted set per key id, updated by one Lua script.

    If Redis fails, hits are let through without rate-limit headers (logged once per outage;
    Redis is skipped for a few seconds, `redis_client.Breaker`): the key was already
    authenticated, and a Redis outage should not become an outage of the whole API.
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        *,
        prefix: str = "hokusai:ratelimit:",
        window_seconds: float = WINDOW_SECONDS,
    ) -> None:
        self._prefix = prefix
        self._window_ms = round(window_seconds * 1000)
        self._script = redis.register_script(_SLIDING_WINDOW)
        self.breaker = redis_client.Breaker("rate limit (letting requests through unlimited)")

    async def hit(self, api_key_id: str, limit_per_hour: int | None) -> RateDecision:
        if limit_per_hour is None or self.breaker.skip():
            return UNLIMITED
        try:
            allowed, count, now_ms, oldest_ms = await self._script(
                keys=[self._prefix + api_key_id],
                args=[limit_per_hour, self._window_ms, uuid.uuid4().hex],
            )
        except RedisError as exc:
            self.breaker.failed(exc)
            return UNLIMITED
        self.breaker.succeeded()
        return _decide(
            limit_per_hour, count, bool(allowed), now_ms / 1000, oldest_ms / 1000, self._window_ms / 1000
        )


def limiter_from_environ(environ: Mapping[str, str], redis: redis.asyncio.Redis | None = None) -> RateLimiter:
    """`REDIS_URL` set: a RedisRateLimiter shared by every instance; else a MemoryRateLimiter.

    `redis`: the process's one client (`redis_client.redis_from_environ`), which the key cache
    shares and the service closes at shutdown; without it the limiter makes a pool of its own.
    """
    if not redis_client.configured(environ):
        log.warning(
            "rate limit: in-process memory (no %s): limits are per process, not per deployment",
            redis_client.ENV_REDIS_URL,
        )
        return MemoryRateLimiter()
    client = redis if redis is not None else redis_client.redis_from_environ(environ)
    if client is None:  # not reached: redis_from_environ returns a client once REDIS_URL is set
        raise RuntimeError(f"{redis_client.ENV_REDIS_URL} is set but no Redis client was made")
    log.info(
        "rate limit: Redis at %s (%s)", redis_client.describe(environ), redis_client.describe_pool(client)
    )
    return RedisRateLimiter(client)
