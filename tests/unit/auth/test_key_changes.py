"""A revoked or rotated key is not trusted from a cache: the change feed, the validator's re-ask, the poller.

`KeyChanges` runs on an injected clock; the validator on a small in-test backend (the validator is what
is tested); the store's change feed and the poller on a real SQLite store in tmp_path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from runtime.auth import key_store_backend
from runtime.auth.api_keys import ApiKeyInfo, ApiKeyValidator
from runtime.auth.key_cache import MemoryKeyCache
from runtime.auth.key_changes import KeyChanges
from runtime.auth.key_store_backend import CHANGES_LOOKBACK, ChangePoller
from runtime.errors import AuthServiceUnavailable
from runtime.keys import migrate
from runtime.keys.hashing import KeyHasher
from runtime.keys.schema import ApiKeyAudit
from runtime.keys.store import KeyStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- KeyChanges ------------------------------------------------------------------------------------
def current(window: float, clock=None) -> KeyChanges:
    """KeyChanges after a first successful look at the store that found nothing."""
    changes = KeyChanges(window, clock=clock or Clock())
    changes.note([])
    return changes


def test_until_the_first_look_at_the_store_every_key_is_stale():
    changes = KeyChanges(60, clock=Clock())
    assert changes.is_stale("a") and changes.is_stale("anything")
    changes.refreshed("a", 10**9)  # a fresh answer about one key says nothing about the others
    assert changes.is_stale("a") and changes.is_stale("b")
    changes.note([])
    assert not changes.is_stale("a") and not changes.is_stale("b") and len(changes) == 0


def test_a_noted_key_is_stale_and_others_are_not():
    changes = current(60)
    assert not changes.is_stale("a")
    changes.note(["a", "b"])
    assert changes.is_stale("a") and changes.is_stale("b")
    assert not changes.is_stale("c")
    assert len(changes) == 2


def test_a_fresh_answer_asked_after_the_change_forgets_it():
    clock = Clock(1000.0)
    changes = KeyChanges(60, clock=clock)
    changes.note(["a"])
    changes.refreshed("a", 1000.0)  # asked at the very moment it was noted: the answer is fresh
    assert not changes.is_stale("a")
    changes.note(["b"])
    changes.refreshed("b", 1005.0)
    assert not changes.is_stale("b") and len(changes) == 0


def test_an_answer_asked_before_a_change_does_not_forget_it():
    """The store was asked at `since`; a change noted after that may not be in the answer."""
    clock = Clock(1000.0)
    changes = KeyChanges(60, clock=clock)
    changes.note(["a"])
    asked = clock.now
    clock.now = 1001.0
    changes.note(["a"])  # changed again while the answer was on its way
    changes.refreshed("a", asked)
    assert changes.is_stale("a")
    changes.refreshed("a", 1001.0)
    assert not changes.is_stale("a")


def test_refreshing_a_key_that_was_never_noted_is_harmless():
    changes = current(60)
    changes.refreshed("nobody", 5.0)
    assert len(changes) == 0 and not changes.is_stale("nobody")


def test_a_noted_key_is_forgotten_after_the_window():
    clock = Clock(1000.0)
    changes = KeyChanges(60, clock=clock)
    changes.note(["old"])
    clock.now = 1060.0  # exactly the window: every entry cached before the change may still live
    changes.note(["other"])
    assert changes.is_stale("old")
    clock.now = 1060.5
    changes.note(["newer"])
    assert not changes.is_stale("old")
    assert changes.is_stale("other") and changes.is_stale("newer")
    assert len(changes) == 2


def test_noting_a_key_again_restarts_its_window():
    clock = Clock(1000.0)
    changes = KeyChanges(60, clock=clock)
    changes.note(["a"])
    clock.now = 1050.0
    changes.note(["a"])
    clock.now = 1100.0  # 100 s after the first note, 50 s after the second
    changes.note(["b"])
    assert changes.is_stale("a")


def test_notes_from_many_threads_at_once_are_all_kept():
    """No sleeps: the threads start together at a barrier; each notes ids of its own while others refresh."""
    changes = KeyChanges(3600)
    threads, per_thread = 8, 500
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def noter(n: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                changes.note([f"{n}-{i}"])
        except BaseException as exc:  # reported below
            errors.append(exc)

    def refresher() -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                changes.refreshed(f"never-{i}", changes.now())
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=noter, args=(n,)) for n in range(threads - 1)]
    workers.append(threading.Thread(target=refresher))
    for worker in workers:
        worker.start()
    barrier.wait()
    for worker in workers:
        worker.join()
    assert errors == []
    assert len(changes) == (threads - 1) * per_thread


# --- the validator's re-ask --------------------------------------------------------------------------
KEY_A = "hk_test_key-a"
KEY_B = "hk_test_key-b"


def info(key_id: str, **overrides) -> ApiKeyInfo:
    fields = {
        "api_key_id": key_id,
        "user_id": "alice",
        "service_id": None,
        "scopes": ("mlflow:read",),
        "rate_limit_per_hour": None,
        "expires_at": None,
        "is_active": True,
    } | overrides
    return ApiKeyInfo(**fields)


class Backend:
    """Answers per key from `answers`; counts calls per key; `down` raises as a store that is down."""

    def __init__(self) -> None:
        self.answers = {KEY_A: info("id-a"), KEY_B: info("id-b")}
        self.calls: dict[str, int] = {}
        self.down = False
        self.during_call = None  # run inside the next call (a change noted while it is on its way)

    async def validate(self, api_key, *, request_id):
        self.calls[api_key] = self.calls.get(api_key, 0) + 1
        if self.during_call is not None:
            action, self.during_call = self.during_call, None
            await action()
        if self.down:
            raise AuthServiceUnavailable("key store", "down (test)")
        return self.answers.get(api_key)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def changes(clock):
    return current(360, clock)


@pytest.fixture
def backend():
    return Backend()


@pytest.fixture
def validator(backend, changes):
    return ApiKeyValidator(backend, MemoryKeyCache(), changes=changes)


async def test_a_key_noted_stale_is_asked_again_once_then_cached_again(validator, backend, changes):
    assert (await validator.validate(KEY_A, request_id="r")).outcome == "ok"
    assert (await validator.validate(KEY_A, request_id="r")).cached
    assert backend.calls[KEY_A] == 1
    backend.answers[KEY_A] = info("id-a", is_active=False)  # revoked in the store
    changes.note(["id-a"])
    revoked = await validator.validate(KEY_A, request_id="r")
    assert (revoked.outcome, revoked.cached) == ("inactive", False)
    assert backend.calls[KEY_A] == 2
    assert not changes.is_stale("id-a")
    for _ in range(3):
        again = await validator.validate(KEY_A, request_id="r")
        assert (again.outcome, again.cached) == ("inactive", True)
    assert backend.calls[KEY_A] == 2


async def test_a_rotated_key_gets_its_grace_expiry_from_the_re_ask(validator, backend, changes):
    await validator.validate(KEY_A, request_id="r")
    ends = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    backend.answers[KEY_A] = info("id-a", expires_at=ends)
    changes.note(["id-a"])
    assert (await validator.validate(KEY_A, request_id="r")).info.expires_at == ends
    assert (await validator.validate(KEY_A, request_id="r")).info.expires_at == ends  # cached, fresh


async def test_a_failed_re_ask_is_unavailable_and_the_key_stays_stale(validator, backend, changes):
    await validator.validate(KEY_A, request_id="r")
    changes.note(["id-a"])
    backend.down = True
    with pytest.raises(AuthServiceUnavailable):
        await validator.validate(KEY_A, request_id="r")
    assert changes.is_stale("id-a")
    with pytest.raises(AuthServiceUnavailable):  # not answered from the (pre-change) cache meanwhile
        await validator.validate(KEY_A, request_id="r")
    assert backend.calls[KEY_A] == 3
    backend.down = False
    backend.answers[KEY_A] = info("id-a", is_active=False)
    assert (await validator.validate(KEY_A, request_id="r")).outcome == "inactive"
    assert backend.calls[KEY_A] == 4 and not changes.is_stale("id-a")


async def test_other_keys_still_come_from_the_cache(validator, backend, changes):
    await validator.validate(KEY_A, request_id="r")
    await validator.validate(KEY_B, request_id="r")
    changes.note(["id-a", "id-unrelated"])
    for _ in range(3):
        assert (await validator.validate(KEY_B, request_id="r")).cached
    assert backend.calls == {KEY_A: 1, KEY_B: 1}
    await validator.validate(KEY_A, request_id="r")
    assert backend.calls == {KEY_A: 2, KEY_B: 1}


async def test_a_change_noted_while_the_re_ask_is_on_its_way_is_asked_again(
    validator, backend, changes, clock
):
    await validator.validate(KEY_A, request_id="r")
    changes.note(["id-a"])

    async def changed_again():  # the answer may predate this change
        clock.now += 1
        changes.note(["id-a"])

    backend.during_call = changed_again
    await validator.validate(KEY_A, request_id="r")
    assert changes.is_stale("id-a")
    assert not (await validator.validate(KEY_A, request_id="r")).cached
    assert backend.calls[KEY_A] == 3
    assert (await validator.validate(KEY_A, request_id="r")).cached


async def test_a_request_that_joins_a_re_ask_begun_before_a_change_does_not_trust_its_answer(
    validator, backend, changes, clock
):
    """Request 1 re-asks after a rotation; the key is revoked while that call is on its way; request 2
    sees the revocation, but shares request 1's call, whose answer was read before the revocation."""
    await validator.validate(KEY_A, request_id="r")
    clock.now += 1
    changes.note(["id-a"])  # rotated
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow_answer():
        started.set()
        await release.wait()

    backend.during_call = slow_answer
    first = asyncio.ensure_future(validator.validate(KEY_A, request_id="1"))
    await started.wait()  # request 1's call has read the store: the key was still active
    clock.now += 1
    changes.note(["id-a"])  # revoked now
    clock.now += 1
    second = asyncio.ensure_future(validator.validate(KEY_A, request_id="2"))
    for _ in range(5):  # request 2 reaches the shared call (no new one: the backend was asked once)
        await asyncio.sleep(0)
    release.set()
    assert (await first).outcome == "ok" and (await second).outcome == "ok"  # both read before it
    assert backend.calls[KEY_A] == 2
    assert changes.is_stale("id-a")  # so the revocation is still to be asked about
    backend.answers[KEY_A] = info("id-a", is_active=False)
    assert (await validator.validate(KEY_A, request_id="3")).outcome == "inactive"


async def test_before_the_first_look_at_the_store_no_cached_answer_is_trusted(backend, clock):
    """A shared cache may hold an answer from before a revocation this instance never saw."""
    changes = KeyChanges(360, clock=clock)
    validator = ApiKeyValidator(backend, MemoryKeyCache(), changes=changes)
    await validator.validate(KEY_A, request_id="r")
    backend.answers[KEY_A] = info("id-a", is_active=False)
    assert (await validator.validate(KEY_A, request_id="r")).outcome == "inactive"
    assert (await validator.validate(KEY_A, request_id="r")).outcome == "inactive"
    assert backend.calls[KEY_A] == 3  # each asked again while the store has not been read
    changes.note([])
    assert (await validator.validate(KEY_A, request_id="r")).cached
    assert backend.calls[KEY_A] == 3


async def test_without_changes_the_cache_is_trusted_as_before(backend):
    validator = ApiKeyValidator(backend, MemoryKeyCache())
    await validator.validate(KEY_A, request_id="r")
    backend.answers[KEY_A] = info("id-a", is_active=False)
    assert (await validator.validate(KEY_A, request_id="r")).outcome == "ok"
    assert backend.calls[KEY_A] == 1


# --- the store's change feed ------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path) -> KeyStore:
    engine = migrate.engine(f"sqlite:///{tmp_path}/keys.db")
    migrate.upgrade(engine)
    yield KeyStore(engine, KeyHasher(b"c" * 32), environment="staging")
    engine.dispose()


LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def audit_row(store: KeyStore, key_id: uuid.UUID | None, action: str, at: dt.datetime) -> uuid.UUID:
    """An audit row written as a (late-committing) transaction of another instance would write it."""
    audit_id = uuid.uuid4()
    with sessionmaker(store.engine).begin() as session:
        session.add(ApiKeyAudit(id=audit_id, api_key_id=key_id, action=action, actor="t", at=at, detail={}))
    return audit_id


def test_revocations_and_rotations_are_changes_creation_is_not(store):
    one = store.create("alice", "one", actor="t")
    two = store.create("alice", "two", actor="t")
    store.list_keys(actor="t")  # audited, but changes nothing
    assert store.changes_since(LONG_AGO) == []
    store.revoke(one.record.id, actor="t")
    store.rotate(two.record.id, actor="t")
    changes = store.changes_since(LONG_AGO)
    assert [change.key_id for change in changes] == [one.record.id, two.record.id]  # the old key's id
    assert changes[0].at <= changes[1].at and changes[0].at.tzinfo is not None
    assert len({change.audit_id for change in changes}) == 2


def test_changes_are_oldest_first_after_the_time_given_and_limited(store):
    key = store.create("alice", "one", actor="t").record.id
    base = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    offsets = [5, 1, 4, 2, 3]
    for seconds in offsets:
        audit_row(store, key, "revoked", base + dt.timedelta(seconds=seconds))
    audit_row(store, key, "created", base + dt.timedelta(seconds=6))
    audit_row(store, None, "revoked", base + dt.timedelta(seconds=7))  # about no key: nothing to forget
    times = [change.at for change in store.changes_since(base)]
    assert times == [base + dt.timedelta(seconds=s) for s in (1, 2, 3, 4, 5)]
    assert [c.at for c in store.changes_since(base + dt.timedelta(seconds=2))] == times[2:]  # strictly after
    assert [c.at for c in store.changes_since(base, limit=2)] == times[:2]


# --- ChangePoller on the store -------------------------------------------------------------------------
def test_a_revocation_after_the_poller_started_is_noted_on_the_next_poll_once(store):
    key = store.create("alice", "one", actor="t")
    changes = KeyChanges(CHANGES_LOOKBACK.total_seconds())
    poller = ChangePoller(store, changes)
    assert changes.is_stale(str(key.record.id))  # nothing read yet: nothing trusted
    assert poller.poll() == 0  # a creation is not a change
    assert not changes.is_stale(str(key.record.id))
    store.revoke(key.record.id, actor="t")
    assert poller.poll() == 1
    assert changes.is_stale(str(key.record.id))
    assert poller.poll() == 0  # seen already: noted once
    changes.refreshed(str(key.record.id), changes.now())
    assert poller.poll() == 0
    assert not changes.is_stale(str(key.record.id))


def test_a_rotation_marks_the_old_key(store):
    old = store.create("alice", "one", actor="t")
    changes = KeyChanges(600)
    poller = ChangePoller(store, changes)
    new = store.rotate(old.record.id, actor="t")
    assert poller.poll() == 1
    assert changes.is_stale(str(old.record.id)) and not changes.is_stale(str(new.record.id))


def test_a_change_that_committed_late_with_an_earlier_time_is_still_seen(store):
    first = store.create("alice", "one", actor="t")
    late = store.create("alice", "two", actor="t")
    changes = KeyChanges(600)
    poller = ChangePoller(store, changes)
    store.revoke(first.record.id, actor="t")
    assert poller.poll() == 1
    (seen,) = store.changes_since(LONG_AGO)
    audit_row(store, late.record.id, "revoked", seen.at - dt.timedelta(seconds=2))
    assert poller.poll() == 1
    assert changes.is_stale(str(late.record.id))
    assert poller.poll() == 0


def test_at_start_the_poller_reads_the_lookback(store):
    before = store.create("alice", "one", actor="t")
    store.revoke(before.record.id, actor="t")  # before this instance started
    ancient = store.create("alice", "two", actor="t")
    too_old = dt.datetime.now(dt.UTC) - CHANGES_LOOKBACK - dt.timedelta(minutes=5)
    audit_row(store, ancient.record.id, "revoked", too_old)
    changes = KeyChanges(CHANGES_LOOKBACK.total_seconds())
    assert ChangePoller(store, changes).poll() == 1
    assert changes.is_stale(str(before.record.id))
    assert not changes.is_stale(str(ancient.record.id))  # no cache entry of another instance is that old


def test_a_burst_larger_than_a_page_is_read_in_one_poll(store, monkeypatch):
    keys = [store.create("alice", f"k{n}", actor="t").record.id for n in range(7)]
    changes = KeyChanges(600)
    poller = ChangePoller(store, changes)
    page_size = 3
    monkeypatch.setattr(key_store_backend, "CHANGES_LIMIT", page_size)
    real = store.changes_since
    pages = []

    def paged(after, *, limit=page_size):
        pages.append(after)
        return real(after, limit=min(limit, page_size))

    monkeypatch.setattr(store, "changes_since", paged)
    for key in keys:
        store.revoke(key, actor="t")
    assert poller.poll() == 7
    assert all(changes.is_stale(str(key)) for key in keys)
    assert len(pages) >= 3
    assert poller.poll() == 0


def test_a_store_that_fails_is_logged_once_per_outage_and_nothing_is_skipped(store, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="hokusai_mtls")
    key = store.create("alice", "one", actor="t")
    other = store.create("alice", "two", actor="t")
    changes = KeyChanges(600)
    poller = ChangePoller(store, changes)
    assert poller.poll() == 0
    real = store.changes_since

    def down(*args, **kwargs):
        raise sa.exc.OperationalError("SELECT ...", {}, Exception("database is locked\nSELECT secret"))

    monkeypatch.setattr(store, "changes_since", down)
    store.revoke(key.record.id, actor="t")  # during the outage
    assert changes.following
    assert [poller.poll() for _ in range(3)] == [0, 0, 0]
    assert not changes.following  # what /health reports during the outage
    assert changes.current and not changes.is_stale(str(other.record.id))  # cached answers stay trusted
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "revoked" in warnings[0].getMessage() and "SELECT secret" not in warnings[0].getMessage()
    monkeypatch.setattr(store, "changes_since", real)
    assert poller.poll() == 1  # the revocation made while the store was down
    assert changes.is_stale(str(key.record.id)) and changes.following
    assert any(r.levelno == logging.INFO and "again" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(store, "changes_since", down)  # a second outage is logged again
    poller.poll()
    poller.poll()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    monkeypatch.setattr(store, "changes_since", real)
    store.revoke(other.record.id, actor="t")
    assert poller.poll() == 1


def test_a_store_whose_table_is_gone_is_a_failed_poll_not_a_crash(store, caplog):
    caplog.set_level(logging.WARNING, logger="hokusai_mtls")
    changes = KeyChanges(600)
    poller = ChangePoller(store, changes)
    assert poller.poll() == 0
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE api_key_audit")
    assert poller.poll() == 0
    assert poller.poll() == 0
    assert len(caplog.records) == 1 and "no such table" in caplog.records[0].getMessage()
    ApiKeyAudit.__table__.create(store.engine)
    key = store.create("alice", "one", actor="t")
    store.revoke(key.record.id, actor="t")
    assert poller.poll() == 1
    assert changes.is_stale(str(key.record.id))


def test_a_store_that_cannot_be_read_at_start_leaves_every_cached_answer_stale(store, monkeypatch):
    key = store.create("alice", "one", actor="t")
    changes = KeyChanges(600)
    poller = ChangePoller(store, changes)

    def down(*args, **kwargs):
        raise sa.exc.OperationalError("SELECT ...", {}, Exception("unable to open database file"))

    monkeypatch.setattr(store, "changes_since", down)
    assert poller.poll() == 0
    assert changes.is_stale(str(key.record.id))
    monkeypatch.undo()
    assert poller.poll() == 0
    assert not changes.is_stale(str(key.record.id))
