"""Usage rows and `last_used_at`, written off the request path, on a real SQLite store in tmp_path."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest
import sqlalchemy as sa

from runtime import names
from runtime.keys import migrate, usage
from runtime.keys.hashing import KeyHasher
from runtime.keys.schema import ApiKey, ApiKeyUsage
from runtime.keys.store import KeyStore
from runtime.keys.usage import UsageRecorder, retention_from_environ, usage_enabled


@pytest.fixture
def store(tmp_path) -> KeyStore:
    engine = migrate.engine(f"sqlite:///{tmp_path}/keys.db")
    migrate.upgrade(engine)
    yield KeyStore(engine, KeyHasher(b"u" * 32), environment="staging")
    engine.dispose()


@pytest.fixture
def key_id(store) -> str:
    return str(store.create("alice", "ci", actor="t").record.id)


def usage_rows(store: KeyStore) -> list:
    table = ApiKeyUsage.__table__
    with store.engine.connect() as connection:
        return connection.execute(sa.select(table).order_by(table.c.timestamp)).all()


def aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def last_used(store: KeyStore, key_id: str) -> dt.datetime | None:
    return store.get(uuid.UUID(key_id)).last_used_at


def wait_for(condition, seconds: float = 5.0) -> None:
    """For the writer thread (a real one): check until `condition()` holds, or fail."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the writer thread did not get there"
        time.sleep(0.01)


# --- recording and flushing -----------------------------------------------------------------------
def test_flush_writes_one_row_per_request_with_its_fields(store, key_id):
    recorder = UsageRecorder(store.engine)
    before = dt.datetime.now(dt.UTC)
    recorder.record(key_id, "GET /mlflow/api/2.0/mlflow/runs/get", 200, 0.0124)
    recorder.record(key_id, "POST /api/v1/predict", 503, 1.5)
    recorder.record(key_id, "GET /x", 404, 0.0126)
    after = dt.datetime.now(dt.UTC)
    assert recorder.flush() == 3
    rows = usage_rows(store)
    assert [(r.endpoint, r.status_code, r.response_time_ms) for r in rows] == [
        ("GET /mlflow/api/2.0/mlflow/runs/get", 200, 12),
        ("POST /api/v1/predict", 503, 1500),
        ("GET /x", 404, 13),  # rounded, not cut
    ]
    assert {r.api_key_id for r in rows} == {uuid.UUID(key_id)}
    assert all(before <= aware(r.timestamp) <= after for r in rows)
    assert len({r.id for r in rows}) == 3
    assert recorder.counts()["recorded"] == 3 and recorder.counts()["queued"] == 0
    assert recorder.flush() == 0  # nothing twice
    assert len(usage_rows(store)) == 3


def test_an_endpoint_is_cut_to_the_columns_length(store, key_id):
    recorder = UsageRecorder(store.engine)
    long_path = "GET /" + "a" * 600
    recorder.record(key_id, long_path, 200, 0.001)
    recorder.flush()
    (row,) = usage_rows(store)
    assert row.endpoint == long_path[:512] and len(row.endpoint) == 512
    assert usage.endpoint_of("GET", "/" + "b" * 600) == ("GET /" + "b" * 600)[:512]
    assert usage.endpoint_of("POST", "/runs") == "POST /runs"


def test_a_negative_duration_is_recorded_as_zero(store, key_id):
    recorder = UsageRecorder(store.engine)
    recorder.record(key_id, "GET /x", 200, -0.5)
    recorder.flush()
    assert usage_rows(store)[0].response_time_ms == 0


def test_events_for_several_keys_land_on_their_own_key(store, key_id):
    other = str(store.create("bob", "ci", actor="t").record.id)
    recorder = UsageRecorder(store.engine)
    for n in range(5):
        recorder.record(key_id if n % 2 else other, f"GET /{n}", 200, 0.001)
    assert recorder.flush() == 5
    by_key = {}
    for row in usage_rows(store):
        by_key.setdefault(str(row.api_key_id), []).append(row.endpoint)
    assert by_key == {key_id: ["GET /1", "GET /3"], other: ["GET /0", "GET /2", "GET /4"]}


def test_events_of_keys_the_store_does_not_hold_are_skipped_not_the_whole_batch(store, key_id):
    """In migration mode the old service's keys pass the middleware too; they have no row here."""
    recorder = UsageRecorder(store.engine)
    recorder.record(key_id, "GET /ours-1", 200, 0.001)
    recorder.record(str(uuid.uuid4()), "GET /theirs", 200, 0.001)  # a UUID, but not one of ours
    recorder.record("key-from-the-old-service", "GET /theirs-too", 200, 0.001)
    recorder.record(key_id, "GET /ours-2", 200, 0.001)
    recorder.flush()
    assert [r.endpoint for r in usage_rows(store)] == ["GET /ours-1", "GET /ours-2"]
    assert {r.api_key_id for r in usage_rows(store)} == {uuid.UUID(key_id)}
    assert recorder.counts()["failed"] == 0
    assert last_used(store, key_id) is not None


def test_a_flush_writes_at_most_one_batch(store, key_id):
    recorder = UsageRecorder(store.engine, batch_size=4)
    for n in range(10):
        recorder.record(key_id, f"GET /{n}", 200, 0.001)
    assert [recorder.flush() for _ in range(4)] == [4, 4, 2, 0]
    assert [r.endpoint for r in usage_rows(store)] == [f"GET /{n}" for n in range(10)]


# --- last_used_at -------------------------------------------------------------------------------------
def test_last_used_at_becomes_the_latest_use(store, key_id):
    recorder = UsageRecorder(store.engine)
    assert last_used(store, key_id) is None
    recorder.record(key_id, "GET /x", 200, 0.001)
    before_last = dt.datetime.now(dt.UTC)
    recorder.record(key_id, "GET /y", 200, 0.001)
    after_last = dt.datetime.now(dt.UTC)
    recorder.flush()
    assert before_last <= last_used(store, key_id) <= after_last


def test_an_older_batch_never_moves_last_used_at_back(store, key_id):
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)  # as another instance's newer batch left it
    with store.engine.begin() as connection:
        keys = ApiKey.__table__
        connection.execute(sa.update(keys).where(keys.c.id == uuid.UUID(key_id)).values(last_used_at=later))
    recorder = UsageRecorder(store.engine)
    recorder.record(key_id, "GET /x", 200, 0.001)
    recorder.flush()
    assert last_used(store, key_id) == later
    assert len(usage_rows(store)) == 1  # the row is written all the same


def test_last_used_at_is_written_once_per_key_per_flush_not_per_request(store, key_id):
    statements = []
    sa.event.listen(
        store.engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *rest: statements.append(statement),
    )
    recorder = UsageRecorder(store.engine)
    for _ in range(50):
        recorder.record(key_id, "GET /x", 200, 0.001)
    recorder.flush()
    updates = [s for s in statements if s.lstrip().upper().startswith("UPDATE")]
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len(updates) == 1 and len(inserts) <= 1  # one multi-row insert (executemany)
    assert len(usage_rows(store)) == 50


# --- a full queue, usage off ------------------------------------------------------------------------------
def test_a_full_queue_drops_and_counts_without_blocking(store, key_id):
    recorder = UsageRecorder(store.engine, queue_size=3)
    started = time.monotonic()
    for n in range(5):
        recorder.record(key_id, f"GET /{n}", 200, 0.001)
    assert time.monotonic() - started < 1.0
    assert recorder.counts()["dropped"] == 2 and recorder.counts()["queued"] == 3
    assert recorder.flush() == 3
    assert [r.endpoint for r in usage_rows(store)] == ["GET /0", "GET /1", "GET /2"]
    assert last_used(store, key_id) is not None  # the use is remembered even when its row is dropped


def test_with_rows_off_only_last_used_at_is_written(store, key_id):
    recorder = UsageRecorder(store.engine, rows=False)
    before = dt.datetime.now(dt.UTC)
    for _ in range(3):
        recorder.record(key_id, "GET /x", 200, 0.001)
    assert recorder.counts()["queued"] == 0
    recorder.flush()
    assert usage_rows(store) == []
    assert before <= last_used(store, key_id) <= dt.datetime.now(dt.UTC)
    assert recorder.counts()["dropped"] == 0


# --- the writer thread ---------------------------------------------------------------------------------------
def test_a_store_that_refuses_a_write_is_counted_and_the_writer_keeps_going(store, key_id, tmp_path):
    recorder = UsageRecorder(store.engine, flush_seconds=0.02)
    healthy = recorder.engine
    broken = sa.create_engine(f"sqlite:///{tmp_path}/no-such-dir/keys.db")
    recorder.engine = broken
    recorder.start()
    try:
        recorder.record(key_id, "GET /lost-1", 200, 0.001)
        recorder.record(key_id, "GET /lost-2", 200, 0.001)
        wait_for(lambda: recorder.counts()["failed"] == 2)
        recorder.engine = healthy
        recorder.record(key_id, "GET /kept", 200, 0.001)
        wait_for(lambda: recorder.counts()["recorded"] == 1)
    finally:
        recorder.stop()
        broken.dispose()
    assert [r.endpoint for r in usage_rows(store)] == ["GET /kept"]
    assert recorder.counts()["failed"] == 2
    assert not recorder._thread.is_alive()


def test_stop_writes_what_is_queued(store, key_id):
    recorder = UsageRecorder(store.engine, flush_seconds=0.02, batch_size=10)
    recorder.start()
    for n in range(35):
        recorder.record(key_id, f"GET /{n}", 200, 0.001)
    recorder.stop()
    assert len(usage_rows(store)) == 35
    assert recorder.counts()["queued"] == 0 and recorder.counts()["recorded"] == 35
    assert not recorder._thread.is_alive()


def test_the_writer_prunes_at_start(store, key_id):
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=100)
    insert_usage(store, key_id, [old])
    recorder = UsageRecorder(store.engine, flush_seconds=0.02)
    recorder.start()
    try:
        wait_for(lambda: recorder.counts()["pruned"] == 1)
    finally:
        recorder.stop()
    assert usage_rows(store) == []


# --- retention ------------------------------------------------------------------------------------------------
NOW = dt.datetime(2027, 6, 1, 12, 0, tzinfo=dt.UTC)


def insert_usage(store: KeyStore, key_id: str, times: list[dt.datetime]) -> None:
    with store.engine.begin() as connection:
        connection.execute(
            sa.insert(ApiKeyUsage.__table__),
            [
                {
                    "id": uuid.uuid4(),
                    "api_key_id": uuid.UUID(key_id),
                    "endpoint": f"GET /{n}",
                    "timestamp": at,
                    "response_time_ms": 1,
                    "status_code": 200,
                }
                for n, at in enumerate(times)
            ],
        )


def test_prune_deletes_rows_older_than_the_retention_and_keeps_newer_ones(store, key_id):
    cutoff = NOW - dt.timedelta(days=90)
    old = [cutoff - dt.timedelta(days=10), cutoff - dt.timedelta(seconds=1)]
    kept = [cutoff, cutoff + dt.timedelta(seconds=1), NOW - dt.timedelta(days=1), NOW]
    insert_usage(store, key_id, old + kept)
    recorder = UsageRecorder(store.engine)  # 90 days by default
    assert recorder.prune(NOW) == 2
    assert [aware(r.timestamp) for r in usage_rows(store)] == kept
    assert recorder.counts()["pruned"] == 2
    assert recorder.prune(NOW) == 0


def test_prune_follows_the_retention_given(store, key_id):
    insert_usage(store, key_id, [NOW - dt.timedelta(days=8), NOW - dt.timedelta(days=6)])
    assert UsageRecorder(store.engine, retention=dt.timedelta(days=7)).prune(NOW) == 1
    assert [aware(r.timestamp) for r in usage_rows(store)] == [NOW - dt.timedelta(days=6)]


def test_prune_deletes_in_batches_until_every_old_row_is_gone(store, key_id, monkeypatch):
    monkeypatch.setattr(usage, "PRUNE_BATCH", 3)
    old = [NOW - dt.timedelta(days=200, minutes=n) for n in range(10)]
    insert_usage(store, key_id, [*old, NOW])
    deleted_per_statement = []

    def count_deletes(conn, cursor, statement, *rest) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deleted_per_statement.append(cursor.rowcount)

    sa.event.listen(store.engine, "after_cursor_execute", count_deletes)
    assert UsageRecorder(store.engine).prune(NOW) == 10
    assert [aware(r.timestamp) for r in usage_rows(store)] == [NOW]
    assert sum(deleted_per_statement) == 10
    assert max(deleted_per_statement) <= 3 and len(deleted_per_statement) >= 4


# --- settings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "enabled"),
    [(None, True), ("", True), ("  ", True), ("on", True), ("OFF", False), (" off ", False)],
)
def test_usage_is_on_unless_turned_off(raw, enabled):
    environ = {} if raw is None else {names.ENV_KEY_USAGE: raw}
    assert usage_enabled(environ) is enabled


@pytest.mark.parametrize("raw", ["yes", "false", "0", "of"])
def test_other_usage_settings_are_refused_naming_the_variable(raw):
    with pytest.raises(ValueError, match=names.ENV_KEY_USAGE):
        usage_enabled({names.ENV_KEY_USAGE: raw})


@pytest.mark.parametrize(("raw", "days"), [(None, 90), ("", 90), ("1", 1), ("30", 30), ("3650", 3650)])
def test_retention_is_read_in_days(raw, days):
    environ = {} if raw is None else {names.ENV_KEY_USAGE_RETENTION_DAYS: raw}
    assert retention_from_environ(environ) == dt.timedelta(days=days)


@pytest.mark.parametrize("raw", ["0", "-5", "3651", "ninety", "1.5"])
def test_a_bad_retention_is_refused_naming_the_variable(raw):
    with pytest.raises(ValueError, match=names.ENV_KEY_USAGE_RETENTION_DAYS):
        retention_from_environ({names.ENV_KEY_USAGE_RETENTION_DAYS: raw})


def test_under_a_steady_trickle_the_writer_writes_a_batch_per_interval_not_a_transaction_per_request(
    store, key_id
):
    """A request every 2 ms for 0.6 s with a 0.25 s flush interval: a handful of transactions for
    300 rows. (Taking only what was queued when the first event arrived wrote one or two rows per
    transaction: about one commit per request, which bench_keys measured as 1.8x the CPU.)"""
    commits = []
    sa.event.listen(store.engine, "commit", lambda _connection: commits.append(1))
    recorder = UsageRecorder(store.engine, flush_seconds=0.25, prune_seconds=3600)
    recorder.start()
    try:
        deadline = time.monotonic() + 0.6
        sent = 0
        while time.monotonic() < deadline:
            recorder.record(key_id, "GET /x", 200, 0.001)
            sent += 1
            time.sleep(0.002)
    finally:
        recorder.stop()
    assert len(usage_rows(store)) == sent
    assert len(commits) <= 8, f"{len(commits)} transactions for {sent} rows"


def test_the_store_pool_holds_a_connection_for_every_thread_that_uses_it():
    """Lookups, the usage writer, the change poller and the REST API never queue for each other's
    connection (a queue past `POOL_TIMEOUT_SECONDS` fails the request with 503)."""
    from runtime.auth.key_store_backend import MAX_LOOKUP_THREADS
    from runtime.services.key_api import MAX_STORE_THREADS

    assert migrate.POOL_SIZE >= MAX_LOOKUP_THREADS + 1 + 1 + MAX_STORE_THREADS
