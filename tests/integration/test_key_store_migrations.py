"""The key store's Alembic migrations, up and down, on SQLite (a file) and on a real PostgreSQL.

After `upgrade` the database holds exactly what `runtime.keys.schema` declares (Alembic's own
comparison finds no difference: columns, types, nullability, indexes), rows go in and come back with
their types; `downgrade` removes every table and a second `upgrade` starts again from nothing. The
version table is the store's own, so the store can share a database with MLflow's.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import Session

from runtime.keys import migrate
from runtime.keys.schema import ApiKey, ApiKeyAudit, ApiKeyUsage, Base

pytestmark = pytest.mark.integration

TABLES = {"api_keys", "api_key_usage", "api_key_audit"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/keys.db"
    else:
        server = request.getfixturevalue("postgres_server")
        url = server.create_database(f"keys_{uuid.uuid4().hex[:8]}")
    engine = migrate.engine(url)
    yield engine
    engine.dispose()


def tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_creates_exactly_the_declared_schema(store):
    assert migrate.current(store) is None
    migrate.upgrade(store)
    assert migrate.current(store) == migrate.head()
    assert tables(store) >= TABLES
    assert "alembic_version" not in tables(store)  # MLflow's name stays free for MLflow
    with store.connect() as connection:
        differences = compare_metadata(
            MigrationContext.configure(connection, opts={"version_table": migrate.VERSION_TABLE}),
            Base.metadata,
        )
    assert differences == []
    indexes = {index["name"] for index in sa.inspect(store).get_indexes("api_key_usage")}
    assert {"ix_api_key_usage_key_time", "ix_api_key_usage_time"} <= indexes
    unique = [i for i in sa.inspect(store).get_indexes("api_keys") if i["name"] == "ix_api_keys_key_hash"]
    assert unique and unique[0]["unique"]


def test_rows_round_trip_and_a_duplicate_hash_is_refused(store):
    migrate.upgrade(store)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    key_id = uuid.uuid4()
    with Session(store) as session, session.begin():
        session.add(
            ApiKey(
                id=key_id,
                key_hash="a" * 64,
                key_prefix="hk_test_abcd",
                user_id="alice",
                name="ci",
                scopes=["mlflow:read"],
                allowed_ips=["10.0.0.0/8"],
                rate_limit_per_hour=100,
            )
        )
        session.flush()
        session.add(
            ApiKeyUsage(
                api_key_id=key_id, endpoint="/api/x", timestamp=now, response_time_ms=7, status_code=200
            )
        )
        session.add(ApiKeyAudit(api_key_id=key_id, action="created", actor="alice", detail={"name": "ci"}))
    with Session(store) as session:
        row = session.get(ApiKey, key_id)
        assert row is not None
        assert (row.scopes, row.allowed_ips, row.is_active, row.rate_limit_per_hour) == (
            ["mlflow:read"],
            ["10.0.0.0/8"],
            True,
            100,
        )
        assert row.created_at is not None and row.expires_at is None
        usage = session.scalars(sa.select(ApiKeyUsage)).one()
        assert usage.timestamp.replace(tzinfo=dt.UTC) == now
    with pytest.raises(sa.exc.IntegrityError), Session(store) as session, session.begin():
        session.add(ApiKey(key_hash="a" * 64, key_prefix="hk_test_efgh", user_id="bob", name="dup"))


def test_downgrade_removes_everything_and_upgrade_starts_again(store):
    migrate.upgrade(store)
    migrate.downgrade(store)
    assert migrate.current(store) is None
    assert not TABLES & tables(store)
    migrate.upgrade(store)
    assert tables(store) >= TABLES
