"""The key store's tables (seed 002 §1), in SQLAlchemy 2; Alembic creates and migrates them
(`runtime.keys.migrate`). SQLite for one process or a laptop, PostgreSQL for a deployment.

- `api_keys`: one row per key. `key_hash` is the keyed hash (`runtime.keys.hashing`), unique and
  indexed, the key itself is never stored; `key_prefix` is what may be shown (`hk_live_4QbL`).
  `user_id` names the owner as the platform's identity provider does (there is no users table
  here to point a foreign key at). A rotation's new key points at the old one (`rotated_from`), and
  the old one keeps working until its `expires_at`, the grace period.
- `api_key_usage`: one row per request made with a key, written in batches; indexed by key and time
  (a key's summary over a period) and by time alone (retention deletes the oldest).
- `api_key_audit`: every operation on a key (created, listed, revoked, rotated), who did it and when;
  never the key.
- `api_key_store_settings`: the store's own values, such as the check of its hashing secret.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import cast

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Table, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[str] = mapped_column(String(255), index=True)
    name: Mapped[str] = mapped_column(String(255))
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    rate_limit_per_hour: Mapped[int | None] = mapped_column(Integer)
    allowed_ips: Mapped[list[str] | None] = mapped_column(JSON)
    """CIDRs the key may be used from; None: anywhere."""
    rotated_from: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("api_keys.id", ondelete="SET NULL")
    )


class ApiKeyUsage(Base):
    __tablename__ = "api_key_usage"
    __table_args__ = (
        Index("ix_api_key_usage_key_time", "api_key_id", "timestamp"),
        Index("ix_api_key_usage_time", "timestamp"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    api_key_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("api_keys.id", ondelete="CASCADE"))
    endpoint: Mapped[str] = mapped_column(String(512))
    timestamp: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    response_time_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int] = mapped_column(Integer)


class ApiKeyAudit(Base):
    __tablename__ = "api_key_audit"
    __table_args__ = (
        Index("ix_api_key_audit_key_time", "api_key_id", "at"),
        Index("ix_api_key_audit_time", "at"),  # "which keys changed since", twice a second per instance
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    """No foreign key: the audit outlives what it is about."""
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(255))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


class StoreSetting(Base):
    """The store's own settings; `hash_check`: the keyed hash of `HASH_CHECK_TEXT` under the secret the
    keys are hashed with (`runtime.keys.opening` refuses a process with another secret)."""

    __tablename__ = "api_key_store_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


# The tables for SQLAlchemy Core statements (bulk inserts, updates by key, batched deletes), typed as
# tables: `__table__` is declared as a FromClause, which insert/update/delete do not take.
API_KEYS = cast(Table, ApiKey.__table__)
USAGE = cast(Table, ApiKeyUsage.__table__)
STORE_SETTINGS = cast(Table, StoreSetting.__table__)
