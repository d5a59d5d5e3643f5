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
import datetime as dt
import logging
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from runtime.auth.api_keys import CACHE_TTL_SECONDS
from runtime.auth.key_changes import POLL_SECONDS, KeyChanges
from runtime.auth.key_info import ApiKeyInfo
from runtime.errors import AuthServiceUnavailable
from runtime.keys.opening import first_line, open_store
from runtime.keys.store import CHANGES_LIMIT, KeyChange, KeyRecord, KeyStore
from runtime.keys.usage import UsageRecorder, retention_from_environ, usage_enabled
from runtime.serving.server import Background, periodic

log = logging.getLogger("hokusai_mtls")

MAX_LOOKUP_THREADS = 8
LOOKUP_TIMEOUT_SECONDS = 2.0
"""As long as the auth service's call may take (`api_keys.DEFAULT_TIMEOUT`)."""
STORE_NAME = "key store"
CHANGES_OVERLAP = dt.timedelta(seconds=5)
"""How far back each poll looks again: a change whose transaction committed after a later one (its audit
time is earlier) is still seen; changes already seen are skipped by their audit id."""
CHANGES_LOOKBACK = dt.timedelta(seconds=CACHE_TTL_SECONDS + 60)
"""What an instance reads at start: every change after which another instance may still hold a shared
(Redis) cache entry, which lives `CACHE_TTL_SECONDS` at most."""
MAX_PAGES_PER_POLL = 10


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


class ChangePoller:
    """Reads the store's revocations and rotations into `changes` (`runtime.auth.key_changes`); `poll`
    is blocking, run every `POLL_SECONDS` in a thread. A store that cannot answer is logged once per
    outage; the next poll reads from where the last good one stopped, so nothing is skipped."""

    def __init__(self, store: KeyStore, changes: KeyChanges, *, lookback: dt.timedelta = CHANGES_LOOKBACK):
        self.store = store
        self.changes = changes
        self._after = dt.datetime.now(dt.UTC) - lookback
        self._seen: dict[uuid.UUID, dt.datetime] = {}
        self._failing = False

    def poll(self) -> int:
        """Note what changed since the last poll; the number of changes new to this instance."""
        try:
            found = self._read()
        except sa.exc.SQLAlchemyError as exc:
            if not self._failing:
                log.warning(
                    "API keys: the key store cannot say which keys were revoked (cached answers stay up "
                    "to %d s meanwhile): %s",
                    CACHE_TTL_SECONDS,
                    first_line(exc),
                )
            self._failing = True
            self.changes.following = False
            return 0
        if self._failing:
            log.info("API keys: the key store answers again; revocations are followed")
            self._failing = False
        self.changes.following = True
        return found

    def _read(self) -> int:
        new: list[KeyChange] = []
        start = self._after - CHANGES_OVERLAP
        for _ in range(MAX_PAGES_PER_POLL):
            page = self.store.changes_since(start)
            new.extend(change for change in page if change.audit_id not in self._seen)
            for change in page:
                self._seen[change.audit_id] = change.at
                self._after = max(self._after, change.at)
            if len(page) < CHANGES_LIMIT or page[-1].at <= start:
                break
            start = page[-1].at  # a burst of changes: read on, page by page
        self.changes.note(str(change.key_id) for change in new)  # none new: still marks it current
        horizon = self._after - 2 * CHANGES_OVERLAP
        for audit_id in [a for a, at in self._seen.items() if at < horizon]:
            del self._seen[audit_id]
        return len(new)


class KeyStoreBackend:
    """`validate` for `ApiKeyValidator`, from the store; its `changes` poller and `usage` recorder run as
    `background()` jobs of the service; `aclose` stops its threads and its pool."""

    def __init__(
        self,
        store: KeyStore,
        *,
        usage: UsageRecorder | None = None,
        threads: int = MAX_LOOKUP_THREADS,
        timeout: float = LOOKUP_TIMEOUT_SECONDS,
    ):
        self.store = store
        self.timeout = timeout
        self.usage = usage
        self.changes = KeyChanges(window_seconds=CHANGES_LOOKBACK.total_seconds())
        self.poller = ChangePoller(store, self.changes)
        self.poller.poll()  # before the first request: what was revoked while a shared cache kept it
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hokusai-mtls key store")
        self._threads = asyncio.Semaphore(threads)  # waiting for a thread is part of the deadline

    def background(self) -> list[Background]:
        jobs = [periodic("API-key changes", POLL_SECONDS, self.poller.poll)]
        if self.usage is not None:
            jobs.append(Background("API-key usage writer", run=self._write_usage, at_exit=self.usage.stop))
        return jobs

    async def _write_usage(self) -> None:
        assert self.usage is not None  # noqa: S101 - only scheduled with a recorder
        self.usage.start()
        await asyncio.Event().wait()  # until the service stops; `stop` then writes what is queued

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
    """A backend on the store of `HOKUSAI_MTLS_KEY_STORE_URL` (`runtime.keys.opening.open_store`), with
    usage recorded unless `HOKUSAI_MTLS_KEY_USAGE=off` (`last_used_at` is kept either way)."""
    rows = usage_enabled(environ)
    retention = retention_from_environ(environ)
    store = open_store(environ)
    log.info(
        "API keys: validated against our key store (%s), usage %s",
        store.engine.url.render_as_string(hide_password=True),
        f"recorded for {retention.days} days" if rows else "not recorded (last use only)",
    )
    return KeyStoreBackend(store, usage=UsageRecorder(store.engine, rows=rows, retention=retention))
