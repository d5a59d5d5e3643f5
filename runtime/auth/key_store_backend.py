"""The API-key path against our own key store (`runtime.keys.store`) instead of an auth service.

`ApiKeyValidator` asks a backend `validate(api_key, request_id=...)` for a key's `ApiKeyInfo` (None:
unknown). `AuthServiceClient` asks the external service over HTTP; `KeyStoreBackend` looks the key
up in the store, on a bounded thread pool (the store's driver blocks; `MAX_LOOKUP_THREADS` lookups
at once, the rest wait their turn) with a deadline (`LOOKUP_TIMEOUT_SECONDS`), and answers exactly
what the auth service would: so the cache, the rate limit and the judgement of expiry and revocation
stay the validator's, the same for both. A store that cannot answer (down, too slow, a failed query)
raises `AuthServiceUnavailable`, and the middleware fails closed with 503.

Configured by `HOKUSAI_MTLS_KEY_STORE_URL` (the database; in ECS from a secret) and
`HOKUSAI_MTLS_KEY_HASH_SECRET` (at least 32 bytes, base64 or text; from Secrets Manager), see
`runtime.auth.key_backend`; without the store URL the external `AUTH_SERVICE_URL` is used as before.
This module needs SQLAlchemy and Alembic (the `keys` extra): only a process with a store imports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from runtime.auth.key_info import ApiKeyInfo
from runtime.errors import AuthServiceUnavailable
from runtime.keys.opening import first_line, open_store
from runtime.keys.store import KeyRecord, KeyStore

log = logging.getLogger("hokusai_mtls")

MAX_LOOKUP_THREADS = 8
LOOKUP_TIMEOUT_SECONDS = 2.0
"""As long as the auth service's call may take (`api_keys.DEFAULT_TIMEOUT`)."""
STORE_NAME = "key store"


def info_of(record: KeyRecord) -> ApiKeyInfo:
    """What the auth service would say about the key."""
    return ApiKeyInfo(
        api_key_id=str(record.id),
        user_id=record.user_id,
        service_id=None,
        scopes=record.scopes,
        rate_limit_per_hour=record.rate_limit_per_hour,
        expires_at=record.expires_at,
        is_active=record.is_active,
        allowed_ips=record.allowed_ips,
    )


class KeyStoreBackend:
    """`validate` for `ApiKeyValidator`, from the store; `aclose` stops its threads and its pool."""

    def __init__(
        self, store: KeyStore, *, threads: int = MAX_LOOKUP_THREADS, timeout: float = LOOKUP_TIMEOUT_SECONDS
    ):
        self.store = store
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hokusai-mtls key store")
        self._threads = asyncio.Semaphore(threads)  # waiting for a thread is part of the deadline

    async def validate(self, api_key: str, *, request_id: str | bytes) -> ApiKeyInfo | None:
        del request_id  # the store has no log of its own to correlate
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                async with self._threads:
                    record = await loop.run_in_executor(self._pool, self.store.lookup, api_key)
        except TimeoutError:
            raise AuthServiceUnavailable(STORE_NAME, f"no answer within {self.timeout:g} s") from None
        except sa.exc.SQLAlchemyError as exc:
            raise AuthServiceUnavailable(STORE_NAME, f"{type(exc).__name__}: {first_line(exc)}") from None
        return info_of(record) if record is not None else None

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.engine.dispose()


__all__ = ["KeyStoreBackend", "info_of", "store_backend"]


def store_backend(environ: Mapping[str, str]) -> KeyStoreBackend:
    """A backend on the store of `HOKUSAI_MTLS_KEY_STORE_URL` (`runtime.keys.opening.open_store`)."""
    store = open_store(environ)
    log.info(
        "API keys: validated against our key store (%s)",
        store.engine.url.render_as_string(hide_password=True),
    )
    return KeyStoreBackend(store)
