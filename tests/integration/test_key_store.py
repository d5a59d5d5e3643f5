"""The key store's operations on SQLite and on a real PostgreSQL: a key shown once, found by its
keyed hash, refused offline when malformed, revoked, rotated with a grace period, every change audited."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from runtime.keys import key_format, migrate
from runtime.keys.hashing import KeyHasher
from runtime.keys.schema import ApiKey
from runtime.keys.store import DEFAULT_ROTATION_GRACE, KeyNotFound, KeyStore

pytestmark = pytest.mark.integration

SECRET = b"k" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Iterator[KeyStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/keys.db"
    else:
        url = request.getfixturevalue("postgres_server").create_database(f"keys_{uuid.uuid4().hex[:8]}")
    engine = migrate.engine(url)
    migrate.upgrade(engine)
    yield KeyStore(engine, KeyHasher(SECRET), environment="production")
    engine.dispose()


def dump(store: KeyStore) -> str:
    """Everything the database holds, as text: what a leaked dump would show."""
    with store.engine.connect() as connection:
        return repr(
            [list(connection.execute(sa.text(f"SELECT * FROM {t}"))) for t in ("api_keys", "api_key_audit")]  # noqa: S608
        )


def test_a_created_key_is_found_by_itself_and_stored_only_as_its_keyed_hash(store, caplog):
    caplog.set_level(logging.DEBUG)
    created = store.create("alice", "ci", actor="alice", scopes=["mlflow:read"], allowed_ips=["10.1.2.3"])
    assert created.key.startswith("hk_live_")
    assert created.key not in repr(created)
    found = store.lookup(created.key)
    assert found == created.record
    assert found.allowed_ips == ("10.1.2.3/32",)
    text = dump(store)
    assert created.key not in text and created.key[12:] not in text  # nor the part after the display prefix
    assert created.record.key_prefix in text
    assert created.key not in caplog.text


def test_a_malformed_key_is_refused_without_a_query_and_an_unknown_one_is_not_found(store):
    store.create("alice", "ci", actor="alice")
    queries = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *args: queries.append(args[2]))
    assert store.lookup("hk_live_" + "a" * 38) is None  # checksum wrong
    assert store.lookup("not a key") is None
    assert queries == []
    assert store.lookup(key_format.generate("production")) is None  # well-formed, unknown: one query
    assert len(queries) == 1


def test_a_revoked_key_is_inactive_at_once_and_only_its_owner_or_an_admin_may_revoke(store):
    created = store.create("alice", "ci", actor="alice")
    with pytest.raises(KeyNotFound):
        store.revoke(created.record.id, actor="mallory", owner="mallory")
    revoked = store.revoke(created.record.id, actor="alice", owner="alice")
    assert not revoked.is_active and revoked.revoked_at is not None
    assert not store.lookup(created.key).usable(dt.datetime.now(dt.UTC))


def test_a_rotation_gives_a_new_key_and_the_old_one_a_grace_period(store):
    created = store.create("alice", "ci", actor="alice", scopes=["mlflow:write"], rate_limit_per_hour=50)
    rotated = store.rotate(created.record.id, actor="alice")
    now = dt.datetime.now(dt.UTC)
    assert rotated.key != created.key
    new, old = store.lookup(rotated.key), store.lookup(created.key)
    assert new.rotated_from == created.record.id
    assert (new.user_id, new.name, new.scopes, new.rate_limit_per_hour) == (
        "alice",
        "ci",
        ("mlflow:write",),
        50,
    )
    assert new.usable(now) and old.usable(now)
    assert old.expires_at <= now + DEFAULT_ROTATION_GRACE
    assert not old.usable(now + DEFAULT_ROTATION_GRACE + dt.timedelta(seconds=1))
    ended = store.rotate(rotated.record.id, actor="alice", grace=dt.timedelta(0))
    assert not store.lookup(rotated.key).usable(now) and store.lookup(ended.key).usable(now)
    with pytest.raises(ValueError, match="revoked or expired"):
        store.rotate(rotated.record.id, actor="alice")


def test_every_change_is_audited_without_the_key(store):
    created = store.create("alice", "ci", actor="alice")
    store.list_keys(owner="alice", actor="alice")
    rotated = store.rotate(created.record.id, actor="admin")
    store.revoke(rotated.record.id, actor="admin")
    actions = [(row.action, row.actor, row.api_key_id) for row in store.audit_trail()]
    key, new = created.record.id, rotated.record.id
    assert actions == [
        ("created", "alice", key),
        ("listed", "alice", None),
        ("rotated", "admin", key),
        ("revoked", "admin", new),
    ]
    for row in store.audit_trail():
        assert created.key not in repr(row.detail) and rotated.key not in repr(row.detail)


def test_listing_is_per_owner_newest_first(store):
    first = store.create("alice", "one", actor="alice")
    store.create("bob", "other", actor="bob")
    second = store.create("alice", "two", actor="alice")
    assert [r.id for r in store.list_keys(owner="alice")] == [second.record.id, first.record.id]
    assert len(store.list_keys()) == 3


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"allowed_ips": ["10.0.0.0/33"]}, "allowed_ips"),
        ({"rate_limit_per_hour": -1}, "rate_limit_per_hour"),
        ({"expires_at": dt.datetime(2030, 1, 1)}, "expires_at"),
    ],
)
def test_bad_settings_name_their_field_and_store_nothing(store, options, field):
    with pytest.raises(ValueError, match=field):
        store.create("alice", "ci", actor="alice", **options)
    with store.engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(ApiKey)).scalar() == 0


def test_a_key_is_rotated_once_and_only_working_keys_count_against_a_users_limit(store):
    old = store.create("alice", "ci", actor="alice")
    new = store.rotate(old.record.id, actor="alice", grace=dt.timedelta(hours=2))
    with pytest.raises(ValueError, match="already rotated"):  # a second successor would die with the grace
        store.rotate(old.record.id, actor="alice", grace=dt.timedelta(0))
    newest = store.rotate(new.record.id, actor="alice")  # its successor is the one to rotate
    assert newest.record.rotated_from == new.record.id
    assert store.active_key_count("alice") == 3  # the two in their grace and the newest
    store.create("alice", "gone", actor="alice", expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    store.revoke(old.record.id, actor="alice")
    assert store.active_key_count("alice") == 2  # neither the expired nor the revoked one


@pytest.mark.parametrize("name", ["ci\nINFO forged line", "ci\x00", "ci-\u202eyek", "ci\u2028two", "\ue000"])
def test_a_name_that_could_forge_or_hide_text_is_refused(store, name):
    with pytest.raises(ValueError, match="name: control, format and separator characters"):
        store.create("alice", name, actor="alice")


def test_a_name_in_any_script_is_kept_as_given(store):
    assert store.create("zoë", "Zoë's laptop 💻 — 東京", actor="zoë").record.name == "Zoë's laptop 💻 — 東京"
