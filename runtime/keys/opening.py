"""Opening the key store from the environment: its URL, its hashing secret, its migration checked.

One way for every process that uses the store (serve-api and serve-mlflow through
`runtime.auth.key_store_backend`, the `hokusai-mtls auth ...` commands), so they refuse the same
things with the same words.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import sqlalchemy as sa

from runtime import names
from runtime.errors import KeyStoreError
from runtime.keys import migrate
from runtime.keys.hashing import MIN_SECRET_BYTES, KeyHasher
from runtime.keys.schema import STORE_SETTINGS
from runtime.keys.store import KeyStore


def hash_secret(raw: str) -> bytes:
    """`HOKUSAI_MTLS_KEY_HASH_SECRET` as bytes: base64 if it decodes to enough bytes, else the text."""
    raw = raw.strip()
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    secret = decoded if len(decoded) >= MIN_SECRET_BYTES else raw.encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{names.ENV_KEY_HASH_SECRET}: expected at least {MIN_SECRET_BYTES} bytes")
    return secret


SUPPORTED_DATABASES = ("sqlite", "postgresql")


def store_url(environ: Mapping[str, str], url: str | None = None) -> str:
    """The store's URL (`--url`, else the variable); `KeyStoreError` when missing or of a database we
    do not support (named, never the URL itself, which may hold a password)."""
    chosen = (url or environ.get(names.ENV_KEY_STORE_URL, "")).strip()
    if not chosen:
        raise KeyStoreError(f"no key store: pass --url or set {names.ENV_KEY_STORE_URL}")
    database = chosen.partition(":")[0].partition("+")[0].lower()
    if database not in SUPPORTED_DATABASES:
        raise KeyStoreError(
            f"{names.ENV_KEY_STORE_URL}: {database!r} is not a supported database; "
            "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB"
        )
    return chosen


def unknown_revision(at: str | None) -> KeyStoreError:
    return KeyStoreError(
        f"the key store is at revision {at}, which this version does not know: a newer hokusai-mtls "
        "migrated it. Run that version (or downgrade the store with it first)"
    )


def first_line(exc: BaseException) -> str:
    """A database error's first line: its later lines can quote the statement and its parameters."""
    text = str(exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def open_store(environ: Mapping[str, str], url: str | None = None) -> KeyStore:
    """The store, at this version's migration, with the hashing secret; `KeyStoreError` naming what is missing."""
    secret = environ.get(names.ENV_KEY_HASH_SECRET, "")
    if not secret:
        raise KeyStoreError(f"{names.ENV_KEY_HASH_SECRET} is not set: the key store needs its hashing secret")
    hasher = KeyHasher(hash_secret(secret))
    engine = migrate.engine(store_url(environ, url))
    try:
        at = migrate.current(engine)
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise KeyStoreError(f"the key store cannot be read: {first_line(exc)}") from None
    if not migrate.known(at):
        engine.dispose()
        raise unknown_revision(at)
    if at != migrate.head():
        engine.dispose()
        raise KeyStoreError(
            f"the key store is at revision {at}, this version needs {migrate.head()}: "
            "run `hokusai-mtls auth migrate` first"
        )
    try:
        _check_secret(engine, hasher)
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise KeyStoreError(f"the key store cannot be read: {first_line(exc)}") from None
    except KeyStoreError:
        engine.dispose()
        raise
    environment = names.check_environment(environ.get(names.ENV_ENVIRONMENT, "development"))
    return KeyStore(engine, hasher, environment=environment)


HASH_CHECK = "hash_check"
HASH_CHECK_TEXT = "hokusai-mtls key store: hashing secret check"


def _check_secret(engine: sa.Engine, hasher: KeyHasher) -> None:
    """The store's check value matches this hashing secret (or one of its previous ones); the first
    process to open a store writes it. `KeyStoreError` naming the variable otherwise: with another
    secret every key the store holds would be refused as invalid."""
    table = STORE_SETTINGS
    query = sa.select(table.c.value).where(table.c.name == HASH_CHECK)
    with engine.begin() as connection:
        stored = connection.scalar(query)
        if stored is None:
            try:
                with connection.begin_nested():
                    connection.execute(
                        sa.insert(table).values(name=HASH_CHECK, value=hasher.digest(HASH_CHECK_TEXT))
                    )
                return
            except sa.exc.IntegrityError:  # another process wrote it first: check against theirs
                stored = connection.scalar(query)
    if stored is not None and not hasher.matches(HASH_CHECK_TEXT, stored):
        raise KeyStoreError(
            f"{names.ENV_KEY_HASH_SECRET} is not the secret this key store's keys are hashed with: every "
            "key would be refused. Give the process the store's secret (or this one's database)"
        )
