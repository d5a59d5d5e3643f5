"""Who the API-key path asks about a key: our key store, the external auth service, or no one.

Kept apart from `runtime.auth.key_store_backend` so a process without a store (a worker image, the
API without `HOKUSAI_MTLS_KEY_STORE_URL`) never imports SQLAlchemy or Alembic.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio

from runtime import names
from runtime.auth.api_keys import ApiKeyValidator, AuthServiceClient, KeyBackend, UsageSink
from runtime.auth.key_cache import cache_from_environ
from runtime.auth.key_info import ApiKeyInfo
from runtime.keys import key_format
from runtime.serving.server import Background

log = logging.getLogger("hokusai_mtls")


def backend_from_environ(environ: Mapping[str, str] = os.environ) -> KeyBackend | None:
    """Our key store if `HOKUSAI_MTLS_KEY_STORE_URL` is set, the auth service of `AUTH_SERVICE_URL`, both
    (`MigratingBackend`) when both are, else None (no API-key path). The store must have been migrated
    (`hokusai-mtls auth migrate`): `KeyStoreError` otherwise, or when its secret is missing
    (`runtime.keys.opening`)."""
    url = environ.get(names.ENV_KEY_STORE_URL, "").strip()
    auth_url = environ.get(names.ENV_AUTH_SERVICE_URL, "").strip()
    if not url:
        return AuthServiceClient(auth_url) if auth_url else None
    try:
        from runtime.auth.key_store_backend import store_backend
    except ImportError as exc:  # an image built without the `keys` extra
        raise ValueError(
            f"{names.ENV_KEY_STORE_URL} is set but this installation has no key store support "
            f"(pip install 'hokusai-mtls[keys]'): {exc}"
        ) from None
    ours = store_backend(environ)
    if not auth_url:
        return ours
    log.warning(
        "API keys: migration mode: keys in our format are checked in our key store, every other key "
        "is asked of %s; unset %s when every client has moved",
        auth_url,
        names.ENV_AUTH_SERVICE_URL,
    )
    return MigratingBackend(ours, AuthServiceClient(auth_url))


class MigratingBackend:
    """Moving from the external auth service to our store without a flag day: a key in our format
    (`key_format.is_ours`: prefix, length, checksum) is ours to judge, and only ours (an unknown one is
    not asked of the old service); any other key is the old service's. Revocations are followed and
    usage recorded for our keys; the old service's keys keep its cache TTL, as before."""

    def __init__(self, ours: KeyBackend, external: AuthServiceClient) -> None:
        self.ours = ours
        self.external = external
        self.changes = ours.changes
        self.usage = ours.usage
        self.store = getattr(ours, "store", None)

    async def validate(self, api_key: str, *, request_id: str | bytes) -> ApiKeyInfo | None:
        if key_format.is_ours(api_key):
            return await self.ours.validate(api_key, request_id=request_id)
        return await self.external.validate(api_key, request_id=request_id)

    def background(self) -> list[Background]:
        return self.ours.background()

    async def aclose(self) -> None:
        try:
            await self.ours.aclose()
        finally:
            await self.external.aclose()


def migrate_store(environ: Mapping[str, str]) -> None:
    """With a key store configured: bring its tables to this version (`hokusai-mtls auth migrate`), once
    per task, before any process opens it; tasks starting together take turns (`runtime.keys.migrate`).
    `KeyStoreError` naming the store's failure; nothing without a store."""
    if not environ.get(names.ENV_KEY_STORE_URL, "").strip():
        return
    from runtime.keys import commands  # SQLAlchemy and Alembic: only with a store

    done = commands.migrate_store(environ)
    if done["from"] != done["to"]:
        log.info("API keys: the key store migrated from revision %s to %s", done["from"], done["to"])


@dataclass
class ApiKeyPath:
    """One process's API-key path: who knows the keys, the validator caching their answers (in Redis
    when configured), and the jobs the service runs beside its listeners. `backend` None: no
    API-key path (every caller must present a certificate)."""

    backend: KeyBackend | None
    validator: ApiKeyValidator | None

    @property
    def store(self):
        """Our key store (`runtime.keys.store.KeyStore`) when the backend is it, else None."""
        return getattr(self.backend, "store", None)

    @property
    def usage(self) -> UsageSink | None:
        return self.backend.usage if self.backend is not None else None

    def describe(self) -> dict | None:
        """For /health: whether revocations are followed, and the usage writer's counts (our store only)."""
        if self.store is None or self.backend is None:
            return None
        usage = self.backend.usage
        changes = self.backend.changes
        return {
            "backend": "key store",
            "revocations_followed": bool(changes is not None and changes.following),
            "usage": usage.counts() if usage is not None else None,
        }

    def background(self) -> list[Background]:
        """The backend's jobs (our store: following revocations, writing usage), then its closing."""
        if self.backend is None:
            return []
        return [*self.backend.background(), Background("API-key backend", at_exit=self.backend.aclose)]


def api_key_path(environ: Mapping[str, str], redis: redis.asyncio.Redis | None) -> ApiKeyPath:
    backend = backend_from_environ(environ)
    if backend is None:
        return ApiKeyPath(None, None)
    validator = ApiKeyValidator(backend, cache_from_environ(environ, redis), changes=backend.changes)
    return ApiKeyPath(backend, validator)
