"""Recording API-key usage (seed 002 §7) and each key's `last_used_at`, off the request path.

The middleware calls `UsageRecorder.record` once per request made with a key the store knows (its
endpoint, status and response time). That call never blocks and never fails a request: it puts the
event on a bounded queue (`MAX_QUEUE`) and notes the key's last use in a bounded map; a full queue
drops the event and counts it (`dropped`). One writer thread per process takes the queue in batches
(`BATCH_SIZE` rows, at least every `FLUSH_SECONDS`) and writes each batch in one transaction: the
usage rows in one multi-row insert, and `last_used_at` once per key in the batch (never one write per
request; a later batch never moves it back). A batch the store refuses is counted (`failed`) and
dropped, so a store that is down costs memory bounded by the queue, not a growing backlog.

With `HOKUSAI_MTLS_KEY_USAGE=off` only `last_used_at` is written. Rows older than the retention
(`HOKUSAI_MTLS_KEY_USAGE_RETENTION_DAYS`, default 90) are deleted every `PRUNE_SECONDS`, in batches
of `PRUNE_BATCH`, so no delete holds a long lock. At shutdown the writer writes what is queued, within
`STOP_SECONDS`.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa

from runtime import env_numbers, names
from runtime.keys.opening import first_line
from runtime.keys.schema import API_KEYS, USAGE

log = logging.getLogger("hokusai_mtls")

MAX_QUEUE = 10_000
BATCH_SIZE = 500
FLUSH_SECONDS = 1.0
MAX_ENDPOINT_LENGTH = 512
MAX_KEYS_PER_FLUSH = 50_000
"""Distinct keys whose last use one flush remembers; more (a flood of keys in one second) are skipped."""
DEFAULT_RETENTION_DAYS = 90
MAX_RETENTION_DAYS = 3650
PRUNE_SECONDS = 3600.0
PRUNE_BATCH = 10_000
STOP_SECONDS = 5.0
FAILURE_LOG_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class UsageEvent:
    key_id: str
    endpoint: str
    at: dt.datetime
    response_time_ms: int
    status_code: int


def usage_enabled(environ: Mapping[str, str]) -> bool:
    """`HOKUSAI_MTLS_KEY_USAGE`: on (default, also when blank) or off; anything else is refused, naming
    the variable."""
    raw = environ.get(names.ENV_KEY_USAGE, "").strip().lower() or "on"
    if raw not in ("on", "off"):
        raise ValueError(f"{names.ENV_KEY_USAGE}={raw!r}: expected on or off")
    return raw == "on"


def retention_from_environ(environ: Mapping[str, str]) -> dt.timedelta:
    days = env_numbers.whole(
        environ,
        names.ENV_KEY_USAGE_RETENTION_DAYS,
        default=DEFAULT_RETENTION_DAYS,
        low=1,
        high=MAX_RETENTION_DAYS,
        what="days",
    )
    return dt.timedelta(days=days)


def endpoint_of(method: str, path: str) -> str:
    """What a usage row names: `GET /mlflow/api/2.0/mlflow/runs/get` (never the query string, which
    may carry a key or a user's data), cut to the column's length."""
    return f"{method} {path}"[:MAX_ENDPOINT_LENGTH]


class UsageRecorder:
    """The bounded queue and its writer thread; `start` it, `record` on any thread, `stop` at shutdown."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        rows: bool = True,
        retention: dt.timedelta = dt.timedelta(days=DEFAULT_RETENTION_DAYS),
        queue_size: int = MAX_QUEUE,
        batch_size: int = BATCH_SIZE,
        flush_seconds: float = FLUSH_SECONDS,
        prune_seconds: float = PRUNE_SECONDS,
    ) -> None:
        self.engine = engine
        self.rows = rows
        self.retention = retention
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.prune_seconds = prune_seconds
        self._queue: queue.Queue[UsageEvent] = queue.Queue(maxsize=queue_size)
        self._last_used: dict[str, dt.datetime] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_failure_log = float("-inf")
        self.recorded = 0
        """Usage events written (the store skips those of keys it does not hold)."""
        self.dropped = 0
        """Events refused because the queue was full (or, for last use, too many keys in one flush)."""
        self.failed = 0
        """Events lost because the store refused their batch."""
        self.pruned = 0

    # --- the request side ----------------------------------------------------------------------
    def record(self, key_id: str, endpoint: str, status_code: int, seconds: float) -> None:
        """Never blocks, never raises: a full queue drops the event and counts it."""
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            if key_id in self._last_used or len(self._last_used) < MAX_KEYS_PER_FLUSH:
                self._last_used[key_id] = now
            elif not self.rows:
                self.dropped += 1
        if not self.rows:
            return
        event = UsageEvent(
            key_id, endpoint[:MAX_ENDPOINT_LENGTH], now, max(0, round(seconds * 1000)), status_code
        )
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def counts(self) -> dict[str, int]:
        return {
            "queued": self._queue.qsize(),
            "recorded": self.recorded,
            "dropped": self.dropped,
            "failed": self.failed,
            "pruned": self.pruned,
        }

    # --- the writer ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hokusai-mtls usage writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Write what is queued (within `timeout`), then end the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self) -> int:
        """Write one batch now (and the last uses noted so far); the number of usage rows written."""
        batch = self._take(block=False)
        self._write(batch)
        return len(batch)

    def prune(self, now: dt.datetime | None = None) -> int:
        """Delete usage older than the retention, `PRUNE_BATCH` rows per statement; the rows deleted."""
        cutoff = (now or dt.datetime.now(dt.UTC)) - self.retention
        table = USAGE
        oldest = sa.select(table.c.id).where(table.c.timestamp < cutoff).limit(PRUNE_BATCH)
        deleted = 0
        while not self._stopping.is_set():
            with self.engine.begin() as connection:
                count = connection.execute(
                    sa.delete(table).where(table.c.id.in_(oldest.scalar_subquery()))
                ).rowcount
            deleted += count
            if count < PRUNE_BATCH:
                break
        self.pruned += deleted
        return deleted

    def _run(self) -> None:
        next_prune = time.monotonic()  # once at start, then every prune_seconds
        while not self._stopping.is_set():
            if self.rows and time.monotonic() >= next_prune:
                self._guarded(self.prune)
                next_prune = time.monotonic() + self.prune_seconds
            batch = self._take(block=True)
            self._guarded(lambda batch=batch: self._write(batch), len(batch))
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline:  # what was queued before the stop
            batch = self._take(block=False)
            self._guarded(lambda batch=batch: self._write(batch), len(batch))
            if not batch:
                break

    def _take(self, *, block: bool) -> list[UsageEvent]:
        """Up to `batch_size` events: `block`, what arrives within `flush_seconds` (a batch per interval
        under steady load, not a transaction per request); else what is queued now."""
        batch: list[UsageEvent] = []
        deadline = time.monotonic() + self.flush_seconds
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                if block and remaining > 0 and not self._stopping.is_set():
                    batch.append(self._queue.get(timeout=remaining))
                else:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                if not block or remaining <= 0 or self._stopping.is_set():
                    break
        return batch

    def _write(self, batch: list[UsageEvent]) -> None:
        with self._lock:
            last_used, self._last_used = self._last_used, {}
        rows = []
        for event in batch:
            key = _uuid(event.key_id)
            if key is not None:
                rows.append(
                    {
                        "id": uuid.uuid4(),
                        "api_key_id": key,
                        "endpoint": event.endpoint,
                        "timestamp": event.at,
                        "response_time_ms": event.response_time_ms,
                        "status_code": event.status_code,
                    }
                )
        uses = [{"key": key, "used_at": at} for key_id, at in last_used.items() if (key := _uuid(key_id))]
        if not rows and not uses:
            return
        keys = API_KEYS
        with self.engine.begin() as connection:
            if rows:
                connection.execute(_INSERT_FOR_KNOWN_KEY, rows)
            if uses:
                connection.execute(
                    sa.update(keys)
                    .where(
                        keys.c.id == sa.bindparam("key"),
                        sa.or_(keys.c.last_used_at.is_(None), keys.c.last_used_at < sa.bindparam("used_at")),
                    )
                    .values(last_used_at=sa.bindparam("used_at")),
                    uses,
                )
        self.recorded += len(rows)

    def _guarded(self, action, events: int = 0) -> None:
        """Run a write; a store that refuses it loses those events (counted), never the thread."""
        try:
            action()
        except sa.exc.SQLAlchemyError as exc:
            self.failed += events
            now = time.monotonic()
            if now - self._last_failure_log >= FAILURE_LOG_SECONDS:
                self._last_failure_log = now
                log.warning(
                    "API-key usage: the key store refused a write (%d events lost so far): %s",
                    self.failed,
                    first_line(exc),
                )


def _insert_for_known_key() -> sa.Insert:
    """One usage row per parameter set, only if its key is in `api_keys`: an id the store does not
    hold (another service's key in migration mode, a key deleted meanwhile) is skipped, not a
    foreign-key failure that would lose the whole batch."""
    usage, keys = USAGE, API_KEYS
    columns = ("id", "api_key_id", "endpoint", "timestamp", "response_time_ms", "status_code")
    values = [sa.bindparam(name, type_=usage.c[name].type) for name in columns]
    return sa.insert(usage).from_select(
        list(columns), sa.select(*values).where(keys.c.id == sa.bindparam("api_key_id", type_=keys.c.id.type))
    )


_INSERT_FOR_KNOWN_KEY = _insert_for_known_key()


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None
