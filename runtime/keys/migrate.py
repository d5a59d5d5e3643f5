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

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "api_keys_alembic_version"


def _config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = VERSION_TABLE
    return config


def engine(url: str) -> sa.Engine:
    """An engine for the store at `url` (`sqlite:///PATH` or `postgresql://...`, psycopg 3)."""
    return sa.create_engine(url, pool_pre_ping=True)


def upgrade(store: sa.Engine, revision: str = "head") -> None:
    with store.begin() as connection:
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
