"""The key store's operations (seed 002 §2, §8): create, list, revoke, rotate, look up; every change audited.

A key is returned once, by `create` and `rotate` (`CreatedKey.key`); the store keeps only its keyed
hash (`runtime.keys.hashing`), and every other answer is a `KeyRecord`, which has no way to hold it.
`lookup` refuses a malformed key (`runtime.keys.key_format.parse`: prefix, length, checksum) without
a query, then finds the row by hash (an indexed equality) and compares the hash again in constant time.

Rotation makes a new key with the old one's owner, name, scopes, limits and allowed addresses, and
lets the old one work for a grace period (`DEFAULT_ROTATION_GRACE`, 24 hours: long enough for a
deploy that carries the new key to reach every task, short enough that a leaked key dies soon);
`grace=0` ends it at once. Revocation is immediate in the store; caches are the validator's concern.

Every operation writes one `api_key_audit` row (who, what, when, which key by id and display prefix;
never the key), in the same transaction as the change, so there is no change without its audit.
Looking keys up is not audited here: a write per refused request would let anyone fill the table.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from runtime.errors import KeyNotFoundError
from runtime.keys import key_format
from runtime.keys.hashing import KeyHasher
from runtime.keys.schema import ApiKey, ApiKeyAudit

DEFAULT_ROTATION_GRACE = dt.timedelta(hours=24)
MAX_NAME_LENGTH = 255
INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
"""Unicode categories a name may not hold: controls (a newline forges a log line), formats (a
right-to-left override turns `ci-key` around on screen), surrogates, private and unassigned ones."""
SCOPE = re.compile(r"[A-Za-z0-9:._-]{1,64}")
CHANGE_ACTIONS = ("revoked", "rotated")
"""The audited actions after which a validator must not trust what it cached about the key."""
CHANGES_LIMIT = 1000


KeyNotFound = KeyNotFoundError
"""No key with this id (or not one the caller may see): `runtime.errors.KeyNotFoundError`."""


@dataclass(frozen=True)
class KeyRecord:
    """A key as the store describes it: everything but the key and its hash."""

    id: uuid.UUID
    key_prefix: str
    user_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    is_active: bool
    rate_limit_per_hour: int | None
    allowed_ips: tuple[str, ...] | None
    rotated_from: uuid.UUID | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyRecord:
        return cls(
            id=row.id,
            key_prefix=row.key_prefix,
            user_id=row.user_id,
            name=row.name,
            scopes=tuple(row.scopes or ()),
            created_at=row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=dt.UTC),
            expires_at=_aware(row.expires_at),
            last_used_at=_aware(row.last_used_at),
            revoked_at=_aware(row.revoked_at),
            is_active=row.is_active,
            rate_limit_per_hour=row.rate_limit_per_hour,
            allowed_ips=tuple(row.allowed_ips) if row.allowed_ips is not None else None,
            rotated_from=row.rotated_from,
        )

    def usable(self, now: dt.datetime) -> bool:
        return self.is_active and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class KeyChange:
    """An audited revocation or rotation: the key's cached answers are stale from `at` on."""

    audit_id: uuid.UUID
    key_id: uuid.UUID
    at: dt.datetime


@dataclass(frozen=True)
class CreatedKey:
    """A new key, shown this once, and its record."""

    key: str
    record: KeyRecord

    def __repr__(self) -> str:  # a log line or a traceback must never carry the key
        return f"CreatedKey({self.record.key_prefix}..., id={self.record.id})"


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes for timezone columns: they were written in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_text(field: str, value: str) -> None:
    """A name or a user id: 1 to 255 printable characters, so it cannot forge a line in a log."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_LENGTH:
        raise ValueError(f"{field}: expected 1 to {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(character) in INVISIBLE for character in value):
        raise ValueError(f"{field}: control, format and separator characters are not allowed")


def check_networks(allowed_ips: Iterable[str] | None) -> list[str] | None:
    """The allowlist as normalised CIDRs (`10.1.2.3` -> `10.1.2.3/32`); ValueError naming the entry."""
    if allowed_ips is None:
        return None
    networks = []
    for entry in allowed_ips:
        try:
            networks.append(str(ipaddress.ip_network(str(entry).strip(), strict=False)))
        except ValueError:
            raise ValueError(f"allowed_ips: {entry!r} is not an IP address or CIDR") from None
    return networks


class KeyStore:
    """The operations, each in its own transaction, on an engine `runtime.keys.migrate` has upgraded."""

    def __init__(self, engine: sa.Engine, hasher: KeyHasher, *, environment: str) -> None:
        self.engine = engine
        self.hasher = hasher
        self.environment = environment
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    # --- changes --------------------------------------------------------------------------------
    def create(
        self,
        user_id: str,
        name: str,
        *,
        actor: str,
        scopes: Sequence[str] = (),
        expires_at: dt.datetime | None = None,
        rate_limit_per_hour: int | None = None,
        allowed_ips: Iterable[str] | None = None,
    ) -> CreatedKey:
        _check_text("user_id", user_id)
        _check_text("name", name)
        for scope in scopes:
            if not SCOPE.fullmatch(str(scope)):
                raise ValueError(
                    f"scopes: {scope!r} is not a scope (letters, digits and : . _ -, at most 64)"
                )
        if rate_limit_per_hour is not None and (
            isinstance(rate_limit_per_hour, bool) or rate_limit_per_hour < 0
        ):
            raise ValueError("rate_limit_per_hour: expected a whole number, 0 or more")
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError("expires_at: expected a time with its time zone")
        networks = check_networks(allowed_ips)
        with self._sessions.begin() as session:
            row, key = self._new_row(
                session, user_id, name, list(scopes), expires_at, rate_limit_per_hour, networks
            )
            self._audit(session, row.id, "created", actor, {"key_prefix": row.key_prefix, "user_id": user_id})
            return CreatedKey(key, KeyRecord.of(row))

    def revoke(self, key_id: uuid.UUID, *, actor: str, owner: str | None = None) -> KeyRecord:
        """Deactivate the key now. `owner`: only if it belongs to that user (else `KeyNotFound`)."""
        with self._sessions.begin() as session:
            row = self._row(session, key_id, owner)
            if row.is_active:
                row.is_active = False
                row.revoked_at = _now()
            self._audit(session, row.id, "revoked", actor, {"key_prefix": row.key_prefix})
            return KeyRecord.of(row)

    def rotate(
        self,
        key_id: uuid.UUID,
        *,
        actor: str,
        owner: str | None = None,
        grace: dt.timedelta = DEFAULT_ROTATION_GRACE,
    ) -> CreatedKey:
        """A new key like the old one (same owner, scopes, limits, addresses and expiry); the old one
        works for `grace` more, never longer than it would have."""
        if grace < dt.timedelta(0):
            raise ValueError("grace: expected 0 or more")
        with self._sessions.begin() as session:
            old = self._row(session, key_id, owner)
            now = _now()
            if not KeyRecord.of(old).usable(now):
                raise ValueError(f"key {key_id} is revoked or expired: create a new one instead")
            successor = session.scalar(sa.select(ApiKey.id).where(ApiKey.rotated_from == old.id).limit(1))
            if successor is not None:  # in its grace period: a second successor would only shorten it
                raise ValueError(f"key {key_id} was already rotated (to {successor}): rotate that one")
            end = now + grace
            old_expiry = _aware(old.expires_at)
            old.expires_at = end if old_expiry is None else min(old_expiry, end)
            if grace == dt.timedelta(0):
                old.is_active = False
                old.revoked_at = now
            new, key = self._new_row(  # the same expiry as the old key had: a rotation renews the secret only
                session,
                old.user_id,
                old.name,
                list(old.scopes or ()),
                old_expiry,
                old.rate_limit_per_hour,
                old.allowed_ips,
                rotated_from=old.id,
            )
            self._audit(
                session,
                old.id,
                "rotated",
                actor,
                {
                    "key_prefix": old.key_prefix,
                    "new_key_id": str(new.id),
                    "grace_seconds": grace.total_seconds(),
                },
            )
            return CreatedKey(key, KeyRecord.of(new))

    # --- reading --------------------------------------------------------------------------------
    def get(self, key_id: uuid.UUID, *, owner: str | None = None) -> KeyRecord:
        with self._sessions() as session:
            return KeyRecord.of(self._row(session, key_id, owner))

    def list_keys(
        self,
        *,
        owner: str | None = None,
        actor: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[KeyRecord]:
        """A user's keys (`owner`), or every key; newest first, `limit` of them from `offset`. With
        `actor`, the listing is audited."""
        with self._sessions.begin() as session:
            query = (
                sa.select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id).offset(offset).limit(limit)
            )
            if owner is not None:
                query = query.where(ApiKey.user_id == owner)
            records = [KeyRecord.of(row) for row in session.scalars(query)]
            if actor is not None:
                self._audit(session, None, "listed", actor, {"owner": owner, "count": len(records)})
            return records

    def lookup(self, candidate: str) -> KeyRecord | None:
        """The record of the key `candidate` is, or None: malformed (no query made) or unknown.
        Whether it may be used now (active, not expired, from this address) is the caller's to judge."""
        try:
            key_format.parse(candidate)
        except key_format.InvalidKeyFormat:
            return None
        digests = self.hasher.digests(candidate)
        with self._sessions() as session:
            for row in session.scalars(sa.select(ApiKey).where(ApiKey.key_hash.in_(digests))):
                if self.hasher.matches(candidate, row.key_hash):
                    return KeyRecord.of(row)
        return None

    def changes_since(self, after: dt.datetime, *, limit: int = CHANGES_LIMIT) -> list[KeyChange]:
        """Revocations and rotations audited after `after`, oldest first, at most `limit`: what a
        validator's cache must forget (`runtime.auth.key_changes`)."""
        query = (
            sa.select(ApiKeyAudit.id, ApiKeyAudit.api_key_id, ApiKeyAudit.at)
            .where(ApiKeyAudit.at > after, ApiKeyAudit.action.in_(CHANGE_ACTIONS))
            .order_by(ApiKeyAudit.at, ApiKeyAudit.id)
            .limit(limit)
        )
        with self._sessions() as session:
            return [
                KeyChange(audit_id=row.id, key_id=row.api_key_id, at=_utc(row.at))
                for row in session.execute(query)
                if row.api_key_id is not None
            ]

    def active_key_count(self, owner: str) -> int:
        """How many of the user's keys work now (active, not expired): keys in a rotation's grace too."""
        query = sa.select(sa.func.count()).where(
            ApiKey.user_id == owner,
            ApiKey.is_active.is_(True),
            sa.or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > _now()),
        )
        with self._sessions() as session:
            return session.scalar(query) or 0

    def audit_trail(self, key_id: uuid.UUID | None = None) -> list[ApiKeyAudit]:
        """The audit rows, oldest first (of one key, or all)."""
        with self._sessions() as session:
            query = sa.select(ApiKeyAudit).order_by(ApiKeyAudit.at, ApiKeyAudit.id)
            if key_id is not None:
                query = query.where(ApiKeyAudit.api_key_id == key_id)
            return list(session.scalars(query))

    # --- inside -------------------------------------------------------------------------------------
    def _new_row(
        self,
        session: Session,
        user_id: str,
        name: str,
        scopes: list[str],
        expires_at: dt.datetime | None,
        rate_limit_per_hour: int | None,
        allowed_ips: list[str] | None,
        *,
        rotated_from: uuid.UUID | None = None,
    ) -> tuple[ApiKey, str]:
        """The new row and its key (which is handed back once and never stored)."""
        key = key_format.generate(self.environment)
        row = ApiKey(
            id=uuid.uuid4(),
            key_hash=self.hasher.digest(key),
            key_prefix=key_format.display_prefix(key),
            user_id=user_id,
            name=name,
            scopes=scopes,
            created_at=_now(),
            expires_at=expires_at,
            is_active=True,
            rate_limit_per_hour=rate_limit_per_hour,
            allowed_ips=allowed_ips,
            rotated_from=rotated_from,
        )
        session.add(row)
        session.flush()
        return row, key

    def _row(self, session: Session, key_id: uuid.UUID, owner: str | None) -> ApiKey:
        row = session.get(ApiKey, key_id)
        if row is None or (owner is not None and row.user_id != owner):
            raise KeyNotFound(f"no API key {key_id}")
        return row

    @staticmethod
    def _audit(session: Session, key_id: uuid.UUID | None, action: str, actor: str, detail: dict) -> None:
        session.add(
            ApiKeyAudit(
                id=uuid.uuid4(), api_key_id=key_id, action=action, actor=actor, at=_now(), detail=detail
            )
        )
