"""Create, migrate and inspect the key store's schema with Alembic, from code (no alembic.ini).

The migrations live in `runtime/keys/migrations/versions` and ship with the package, so a
container migrates its own store at start-up (`upgrade`), and `downgrade` undoes them (tests run
both ways on SQLite and PostgreSQL). The version table is `api_keys_alembic_version`, so the key
store can share a database with MLflow's, which keeps its own `alembic_version`.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "api_keys_alembic_version"


def _config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = VERSION_TABLE
    return config


POOL_SIZE = 8 + 1 + 1 + 4
"""Connections one process holds to the store at most: one for each of the lookups' threads
(`key_store_backend.MAX_LOOKUP_THREADS`, 8), the usage writer (1), the change poller (1) and the REST
API's store threads (`key_api.MAX_STORE_THREADS`, 4), so no one of them waits for another's connection."""
POOL_TIMEOUT_SECONDS = 2.0
SQLITE_BUSY_MILLISECONDS = 2000
MIGRATION_LOCK = 0x686B5F6B657973  # "hk_keys": PostgreSQL's advisory lock for the key store's migrations


def engine(url: str) -> sa.Engine:
    """An engine for the store at `url` (`sqlite:///PATH` or `postgresql://...`, psycopg 3), with a
    bounded pool (`POOL_SIZE`; a caller waits `POOL_TIMEOUT_SECONDS` for a connection, then fails).

    SQLite gets write-ahead logging, so the usage writer and the lookups of several worker processes
    do not block each other, and waits up to 2 s for another process's write instead of failing."""
    store = sa.create_engine(
        url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=0, pool_timeout=POOL_TIMEOUT_SECONDS
    )
    if store.dialect.name == "sqlite":
        sa.event.listen(store, "connect", _sqlite_settings)
    return store


def _sqlite_settings(connection, _record) -> None:
    cursor = connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MILLISECONDS}")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def upgrade(store: sa.Engine, revision: str = "head") -> None:
    """Migrate; on PostgreSQL under an advisory lock, so tasks starting together migrate one at a time
    (the second finds the work done). SQLite's write lock does the same for a file."""
    with store.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        command.upgrade(_config(connection), revision)


def downgrade(store: sa.Engine, revision: str = "base") -> None:
    with store.begin() as connection:
        command.downgrade(_config(connection), revision)


def current(store: sa.Engine) -> str | None:
    """The revision the store is at; None before the first migration."""
    with store.connect() as connection:
        return MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()


def head() -> str | None:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def known(revision: str | None) -> bool:
    """Whether this version has `revision` among its migrations (a newer version's is unknown here)."""
    if revision is None:
        return True
    try:
        return ScriptDirectory(str(MIGRATIONS)).get_revision(revision) is not None
    except CommandError:
        return False
