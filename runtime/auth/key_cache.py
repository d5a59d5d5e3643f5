"""Where `ApiKeyValidator` remembers the auth service's answers, keyed by the key's fingerprint.

An entry is an `ApiKeyInfo` or `NEGATIVE` ("the auth service does not know this key"); a miss
is None. The cache is an optimisation, never the authority: a Redis that fails is logged and
treated as a miss (and skipped for a few seconds, `redis_client.Breaker`), so requests go to
the auth service instead of failing. With Redis, the cache uses the process's one bounded pool,
shared with the rate limiter (`runtime.auth.redis_client`), so a burst of requests waits briefly for a
connection instead of opening one per request.

Redis is trusted: whoever can write to it can put a made-up `ApiKeyInfo` under the
fingerprint of a key of their choosing. Keep it private to the API tasks, with AUTH and TLS
(`rediss://user:password@host:6379/0`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Protocol

import redis.asyncio
from redis.exceptions import RedisError

from runtime.auth import redis_client
from runtime.auth.key_info import NEGATIVE, ApiKeyInfo, Negative

__all__ = ["NEGATIVE", "KeyCache", "MemoryKeyCache", "RedisKeyCache", "cache_from_environ"]

log = logging.getLogger(__name__)

Entry = ApiKeyInfo | Negative


class KeyCache(Protocol):
    async def get(self, fingerprint: str) -> Entry | None: ...

    async def set(self, fingerprint: str, entry: Entry, ttl_seconds: int) -> None: ...


class MemoryKeyCache:
    """In-process, bounded (least recently used entries go first) and expiring."""

    def __init__(self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, fingerprint: str) -> Entry | None:
        found = self._entries.get(fingerprint)
        if found is None:
            return None
        expires, entry = found
        if expires <= self._clock():
            del self._entries[fingerprint]
            return None
        self._entries.move_to_end(fingerprint)
        return entry

    async def set(self, fingerprint: str, entry: Entry, ttl_seconds: int) -> None:
        self._entries[fingerprint] = (self._clock() + ttl_seconds, entry)
        self._entries.move_to_end(fingerprint)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


_NEGATIVE_VALUE = b"negative"


class RedisKeyCache:
    """Shared by every instance: `SET prefix+fingerprint <ApiKeyInfo JSON | negative> EX ttl`."""

    def __init__(self, redis: redis.asyncio.Redis, prefix: str = "hokusai:apikey:") -> None:
        self._redis = redis
        self._prefix = prefix
        self.breaker = redis_client.Breaker("key cache (misses go to the auth service)")

    async def get(self, fingerprint: str) -> Entry | None:
        if self.breaker.skip():
            return None
        try:
            value = await self._redis.get(self._prefix + fingerprint)
        except RedisError as exc:
            self.breaker.failed(exc)
            return None
        self.breaker.succeeded()
        if value is None:
            return None
        if isinstance(value, str):  # a client made with decode_responses=True
            value = value.encode()
        if value == _NEGATIVE_VALUE:
            return NEGATIVE
        try:
            return ApiKeyInfo.from_json(value)
        except ValueError as exc:
            log.warning("key cache: ignoring unreadable entry %s: %s", fingerprint[:12], exc)
            return None

    async def set(self, fingerprint: str, entry: Entry, ttl_seconds: int) -> None:
        if self.breaker.skip():
            return
        value = _NEGATIVE_VALUE if entry is NEGATIVE else entry.to_json().encode()
        try:
            await self._redis.set(self._prefix + fingerprint, value, ex=ttl_seconds)
        except RedisError as exc:
            self.breaker.failed(exc)
            return
        self.breaker.succeeded()


def cache_from_environ(environ: Mapping[str, str], redis: redis.asyncio.Redis | None = None) -> KeyCache:
    """`REDIS_URL` set: a RedisKeyCache shared by every instance; else an in-process MemoryKeyCache.

    `redis`: the process's one client (`redis_client.redis_from_environ`), which the rate limiter
    shares and the service closes at shutdown; without it the cache makes a pool of its own.
    """
    if not redis_client.configured(environ):
        log.info("key cache: in-process memory (no %s)", redis_client.ENV_REDIS_URL)
        return MemoryKeyCache()
    client = redis if redis is not None else redis_client.redis_from_environ(environ)
    if client is None:  # not reached: redis_from_environ returns a client once REDIS_URL is set
        raise RuntimeError(f"{redis_client.ENV_REDIS_URL} is set but no Redis client was made")
    log.info("key cache: Redis at %s", redis_client.describe(environ))
    return RedisKeyCache(client)
