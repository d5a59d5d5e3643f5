"""What `hokusai-mtls auth ...` does (seed 002 §5: create-key, list-keys, revoke-key, rotate-key), and
`auth migrate`: the operator's path to the store, first admin key included.

Each command opens the store from `--url` or `HOKUSAI_MTLS_KEY_STORE_URL` with the hashing secret of
`HOKUSAI_MTLS_KEY_HASH_SECRET` and returns a JSON-able document; `runtime.cli` prints it (text or
`--json`). A created or rotated key is in that document once, under `key`, and nowhere else: not in a
log line, not in the audit, not in any later command's output. The audit names the operator as
`cli:<login>`.
"""

from __future__ import annotations

import datetime as dt
import getpass
import uuid
from collections.abc import Mapping, Sequence

import sqlalchemy as sa

from runtime.errors import KeyStoreError
from runtime.keys import migrate
from runtime.keys.opening import first_line, open_store, store_url, unknown_revision
from runtime.keys.store import CreatedKey, KeyRecord
from runtime.keys.usage_summary import summarize

MAX_USAGE_DAYS = 3650


def operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def describe(record: KeyRecord) -> dict:
    """A key's record as the commands show it (never the key)."""

    def when(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": str(record.id),
        "key_prefix": record.key_prefix,
        "user_id": record.user_id,
        "name": record.name,
        "scopes": list(record.scopes),
        "created_at": when(record.created_at),
        "expires_at": when(record.expires_at),
        "last_used_at": when(record.last_used_at),
        "revoked_at": when(record.revoked_at),
        "is_active": record.is_active,
        "rate_limit_per_hour": record.rate_limit_per_hour,
        "allowed_ips": list(record.allowed_ips) if record.allowed_ips is not None else None,
        "rotated_from": str(record.rotated_from) if record.rotated_from else None,
    }


def _created(created: CreatedKey) -> dict:
    return {"key": created.key, **describe(created.record)}


def key_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ValueError(f"key id {text!r}: expected a UUID (see list-keys)") from None


# --- the commands ----------------------------------------------------------------------------------
def migrate_store(environ: Mapping[str, str], url: str | None = None) -> dict:
    engine = migrate.engine(store_url(environ, url))
    try:
        before = migrate.current(engine)
        if not migrate.known(before):
            raise unknown_revision(before)
        migrate.upgrade(engine)
        return {"from": before, "to": migrate.current(engine)}
    except sa.exc.SQLAlchemyError as exc:
        raise KeyStoreError(f"the key store cannot be migrated: {first_line(exc)}") from None
    finally:
        engine.dispose()


def create_key(
    environ: Mapping[str, str],
    *,
    user: str,
    name: str,
    scopes: Sequence[str] = (),
    expires_days: float | None = None,
    rate_limit: int | None = None,
    allowed_ips: Sequence[str] | None = None,
    url: str | None = None,
) -> dict:
    if expires_days is not None and not expires_days > 0:
        raise ValueError("--expires-days: expected a number of days above 0")
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_days) if expires_days else None
    store = open_store(environ, url)
    try:
        created = store.create(
            user,
            name,
            actor=operator(),
            scopes=list(scopes),
            expires_at=expires_at,
            rate_limit_per_hour=rate_limit,
            allowed_ips=allowed_ips,
        )
    finally:
        store.engine.dispose()
    return _created(created)


def list_keys(environ: Mapping[str, str], *, user: str | None = None, url: str | None = None) -> list[dict]:
    store = open_store(environ, url)
    try:
        return [describe(record) for record in store.list_keys(owner=user, actor=operator())]
    finally:
        store.engine.dispose()


def revoke_key(environ: Mapping[str, str], identifier: str, *, url: str | None = None) -> dict:
    store = open_store(environ, url)
    try:
        return describe(store.revoke(key_id(identifier), actor=operator()))
    finally:
        store.engine.dispose()


def rotate_key(
    environ: Mapping[str, str], identifier: str, *, grace_hours: float = 24, url: str | None = None
) -> dict:
    if grace_hours < 0:
        raise ValueError("--grace-hours: expected 0 or more")
    store = open_store(environ, url)
    try:
        created = store.rotate(key_id(identifier), actor=operator(), grace=dt.timedelta(hours=grace_hours))
    finally:
        store.engine.dispose()
    return _created(created)


def key_usage(
    environ: Mapping[str, str],
    identifier: str,
    *,
    days: float = 7,
    period: str = "day",
    url: str | None = None,
) -> dict:
    if not 0 < days <= MAX_USAGE_DAYS:
        raise ValueError(f"--days: expected more than 0 and at most {MAX_USAGE_DAYS}")
    store = open_store(environ, url)
    try:
        record = store.get(key_id(identifier))
        until = dt.datetime.now(dt.UTC)
        return summarize(
            store.engine, record.id, since=until - dt.timedelta(days=days), until=until, period=period
        )
    finally:
        store.engine.dispose()
