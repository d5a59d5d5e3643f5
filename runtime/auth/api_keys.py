"""The API-key path: find the key in a request, ask the auth service about it, cache the answer.

The auth service is an external service we do not own. Its contract, as we use it:

    POST {base_url}/api/v1/keys/validate
    X-Request-ID: <the request's id>
    Content-Type: application/json
    {"api_key": "<the key>"}

    200  {"key_id": str, "user_id": str, "service_id": str | null, "scopes": [str, ...],
          "rate_limit_per_hour": int | null, "expires_at": ISO-8601 | null, "is_active": bool}
         (an `expires_at` without a UTC offset is read as UTC)
    401, 403, 404   the key is unknown: the request is refused (401)
    anything else, a timeout, a refused connection or an answer that does not fit the
    shape above: `AuthServiceUnavailable`, and the request fails closed (503).

The key itself never leaves this module except in that request body: caches and logs see
only its `fingerprint`, and errors name the service's URL and the cause, never the key.

>>> from runtime.auth.key_cache import MemoryKeyCache
>>> validator = ApiKeyValidator(AuthServiceClient("http://auth:8080"), MemoryKeyCache())
>>> validation = await validator.validate(extract_api_key(scope), request_id="r-1")
>>> validation.outcome, validation.info.user_id
('ok', 'user-1')
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol
from urllib.parse import parse_qsl, unquote_plus

import httpx

from runtime import json_input
from runtime.auth.key_cache import KeyCache
from runtime.auth.key_changes import KeyChanges
from runtime.auth.key_info import NEGATIVE, ApiKeyInfo, fingerprint, info_from_fields
from runtime.clients.adaptive_client import pool_limits
from runtime.errors import AuthServiceUnavailable

log = logging.getLogger(__name__)

VALIDATE_PATH = "/api/v1/keys/validate"
QUERY_PARAMETER = "api_key"
DEFAULT_TIMEOUT = httpx.Timeout(2.0, connect=1.0)
UNKNOWN_KEY_STATUSES = frozenset({401, 403, 404})
CACHE_TTL_SECONDS = 300
"""How long a valid key's answer is cached (never past its expiry); revocations reach every instance
sooner through `runtime.auth.key_changes`."""
NEGATIVE_TTL_SECONDS = 30
"""How long an unknown, expired or inactive key is remembered: a flood of bad keys costs one
auth-service call per key per 30 s, and a key activated or renewed meanwhile works within 30 s."""

# Final: the type checker reads each as its Literal, the type `Validation.outcome` takes.
OUTCOME_OK: Final = "ok"
OUTCOME_INVALID: Final = "invalid"
OUTCOME_EXPIRED: Final = "expired"
OUTCOME_INACTIVE: Final = "inactive"


# --- the request side ---------------------------------------------------------------------
def extract_api_key(scope) -> str | None:
    """The key from an ASGI http scope: `Authorization: Bearer`, else `X-API-Key`, else `?api_key=`.

    The first place that holds a non-empty key wins; an `Authorization` header of another
    scheme (Basic, ...) is not a key and is skipped.
    """
    headers: dict[bytes, str] = {}
    for name, value in scope.get("headers", ()):
        headers.setdefault(name.lower(), value.decode("latin-1"))
    scheme, _, token = headers.get(b"authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if key := headers.get(b"x-api-key", "").strip():
        return key
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=False):
        if name == QUERY_PARAMETER and value.strip():
            return value.strip()
    return None


def _is_key_parameter(pair: bytes) -> bool:
    name = pair.partition(b"=")[0]
    return unquote_plus(name.decode("latin-1")) == QUERY_PARAMETER


def without_query_key(query_string: bytes) -> bytes:
    """`query_string` without any `api_key` piece (`api%5Fkey` too, as `parse_qsl` decodes names);
    every other byte stays as sent."""
    if b"&" not in query_string and not _is_key_parameter(query_string):
        return query_string
    return b"&".join(p for p in query_string.split(b"&") if not (p and _is_key_parameter(p)))


def without_api_key(scope: dict) -> dict:
    """A copy of `scope` without every place `extract_api_key` reads a key from.

    A credential consumed at this hop never travels on: not to the app, not through the
    `/mlflow` proxy into MLflow's logs. `Authorization` of another scheme (Basic) stays.
    """
    headers = []
    for name, value in scope.get("headers", ()):
        lowered = name.lower()
        if lowered == b"x-api-key":
            continue
        if lowered == b"authorization" and value.strip()[:7].lower() == b"bearer ":
            continue
        headers.append((name, value))
    return {**scope, "headers": headers, "query_string": without_query_key(scope.get("query_string", b""))}


# --- the auth service ------------------------------------------------------------------------
class AuthServiceClient:
    """Asks the external auth service about one key; see the module docstring for the contract.

    `client` is used as given (and left open by `aclose`); without one the client makes its own,
    whose connections are all kept alive when idle (`adaptive_client.pool_limits`: httpx's default
    keeps 20 of 100, so every lookup above 20 concurrent ones paid a new connection).
    `timeout` applies to every call, also through a given client.
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self.url = base_url.rstrip("/") + VALIDATE_PATH
        self._timeout = timeout
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(limits=pool_limits())

    async def validate(self, api_key: str, *, request_id: str | bytes) -> ApiKeyInfo | None:
        """The key's info, None if the service does not know it; AuthServiceUnavailable otherwise."""
        if isinstance(request_id, bytes):
            request_id = request_id.decode("latin-1")
        try:
            response = await self._client.post(
                self.url,
                json={"api_key": api_key},
                headers={"X-Request-ID": request_id},
                timeout=self._timeout,
                follow_redirects=False,
            )
        except httpx.TimeoutException as exc:
            raise AuthServiceUnavailable(self.url, f"timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise AuthServiceUnavailable(self.url, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code in UNKNOWN_KEY_STATUSES:
            return None
        if response.status_code != 200:
            raise AuthServiceUnavailable(self.url, f"answered HTTP {response.status_code}")
        try:
            return info_from_fields(json_input.loads(response.content), id_field="key_id")
        except ValueError as exc:  # every JSON failure, nesting included, is a ValueError here
            raise AuthServiceUnavailable(self.url, f"malformed answer: {exc}") from exc

    changes: KeyChanges | None = None  # the service's cache is its own concern: its TTL bounds staleness
    usage: UsageSink | None = None

    def background(self) -> list:
        return []

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


# --- validation -----------------------------------------------------------------------------
class UsageSink(Protocol):
    """Where the middleware reports each request made with a known key (`runtime.keys.usage`)."""

    def record(self, key_id: str, endpoint: str, status_code: int, seconds: float) -> None: ...

    def counts(self) -> dict[str, int]: ...


class KeyBackend(Protocol):
    """Who knows the keys: `AuthServiceClient`, or our store (`runtime.auth.key_store_backend`), which
    also follows revocations (`changes`) and records usage (`usage`); the service runs its `background()`."""

    @property
    def changes(self) -> KeyChanges | None: ...

    @property
    def usage(self) -> UsageSink | None: ...

    async def validate(self, api_key: str, *, request_id: str | bytes) -> ApiKeyInfo | None: ...

    def background(self) -> list: ...

    async def aclose(self) -> None: ...


Outcome = Literal["ok", "invalid", "expired", "inactive"]


@dataclass(frozen=True)
class Validation:
    """`info` is None only for `invalid`; `cached` tells whether the auth service was spared."""

    info: ApiKeyInfo | None
    outcome: Outcome
    cached: bool


class ApiKeyValidator:
    """Validates keys through the auth service and a cache keyed by the key's fingerprint.

    A valid key is cached `ttl_seconds` but never past its `expires_at`; an unknown, expired or
    inactive key `negative_ttl_seconds`. Expiry and `is_active` are judged on every request,
    cached or not, with `clock` (epoch seconds). Concurrent misses for one key share one
    auth-service call. `auth_service_calls` counts the calls made. With `changes`
    (`runtime.auth.key_changes`), a cached answer about a key revoked or rotated since is asked again.
    """

    def __init__(
        self,
        auth: KeyBackend,
        cache: KeyCache,
        *,
        ttl_seconds: int = CACHE_TTL_SECONDS,
        negative_ttl_seconds: int = NEGATIVE_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
        changes: KeyChanges | None = None,
    ) -> None:
        if ttl_seconds < 1 or negative_ttl_seconds < 1:
            raise ValueError(
                f"ttl_seconds ({ttl_seconds}) and negative_ttl_seconds ({negative_ttl_seconds}) must be >= 1"
            )
        self._auth = auth
        self._cache = cache
        self._ttl = ttl_seconds
        self._negative_ttl = negative_ttl_seconds
        self._clock = clock
        self._changes = changes
        self._in_flight: dict[str, asyncio.Future[ApiKeyInfo | None]] = {}
        self.auth_service_calls = 0

    async def validate(self, api_key: str, *, request_id: str | bytes) -> Validation:
        key_fingerprint = fingerprint(api_key)
        entry = await self._cache.get(key_fingerprint)
        if entry is NEGATIVE:
            return Validation(None, OUTCOME_INVALID, cached=True)
        if entry is not None:
            if self._changes is None or not self._changes.is_stale(entry.api_key_id):
                return self._judge(entry, cached=True)
            asked = self._changes.now()  # revoked or rotated since it was cached: ask again
            # A call already on its way may have read the store before the change: its answer is not
            # fresh for `asked`; whoever began that call vouches for it with its own time.
            joined = key_fingerprint in self._in_flight
            info = await self._fetch_once(api_key, key_fingerprint, request_id)
            if not joined:
                self._changes.refreshed(entry.api_key_id, asked)
        else:
            info = await self._fetch_once(api_key, key_fingerprint, request_id)
        return Validation(None, OUTCOME_INVALID, cached=False) if info is None else self._judge(info, False)

    def _judge(self, info: ApiKeyInfo, cached: bool) -> Validation:
        if not info.is_active:
            return Validation(info, OUTCOME_INACTIVE, cached)
        if info.is_expired(self._clock()):
            return Validation(info, OUTCOME_EXPIRED, cached)
        return Validation(info, OUTCOME_OK, cached)

    async def _fetch_once(
        self, api_key: str, key_fingerprint: str, request_id: str | bytes
    ) -> ApiKeyInfo | None:
        """One auth-service call per key at a time: a burst of misses waits for the first one."""
        future = self._in_flight.get(key_fingerprint)
        if future is None:
            future = asyncio.ensure_future(self._fetch(api_key, key_fingerprint, request_id))
            self._in_flight[key_fingerprint] = future
            future.add_done_callback(lambda done: self._settle(key_fingerprint, done))
        # shield: one caller giving up (client gone) must not cancel the call the others wait for.
        return await asyncio.shield(future)

    def _settle(self, key_fingerprint: str, future: asyncio.Future) -> None:
        self._in_flight.pop(key_fingerprint, None)
        if not future.cancelled():
            future.exception()  # retrieved: no "never retrieved" warning when every waiter left

    async def _fetch(self, api_key: str, key_fingerprint: str, request_id: str | bytes) -> ApiKeyInfo | None:
        self.auth_service_calls += 1
        info = await self._auth.validate(api_key, request_id=request_id)
        if info is None:
            await self._cache.set(key_fingerprint, NEGATIVE, self._negative_ttl)
        else:
            await self._cache.set(key_fingerprint, info, self._ttl_for(info))
        return info

    def _ttl_for(self, info: ApiKeyInfo) -> int:
        now = self._clock()
        if not info.is_active or info.is_expired(now):
            return self._negative_ttl
        if info.expires_at is None:
            return self._ttl
        return max(1, min(self._ttl, math.ceil(info.expires_at.timestamp() - now)))
