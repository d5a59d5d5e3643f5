"""What the auth service says about an API key (`ApiKeyInfo`), the cache's `NEGATIVE`, and a key's
`fingerprint`: the values the validator (`runtime.auth.api_keys`) and the cache
(`runtime.auth.key_cache`) share, kept apart from both so neither imports the other.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from runtime import json_input


class Negative(enum.Enum):
    """The type of `NEGATIVE`, the cache's "the auth service does not know this key"."""

    NEGATIVE = "negative"


NEGATIVE = Negative.NEGATIVE


@dataclass(frozen=True)
class ApiKeyInfo:
    """What the auth service says about a key; `expires_at` is timezone-aware (UTC)."""

    api_key_id: str
    user_id: str
    service_id: str | None
    scopes: tuple[str, ...]
    rate_limit_per_hour: int | None
    expires_at: datetime | None
    is_active: bool
    allowed_ips: tuple[str, ...] | None = None
    """CIDRs the key may be used from (checked against `client_address`'s answer); None: anywhere."""

    def is_expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at.timestamp() <= now

    def fields(self, *, id_field: str = "api_key_id") -> dict[str, Any]:
        """As JSON-able fields, the id under `id_field`: `api_key_id` in our cache, `key_id` in the auth
        service's answer (what `info_from_fields` reads back with the same `id_field`)."""
        return {
            id_field: self.api_key_id,
            "user_id": self.user_id,
            "service_id": self.service_id,
            "scopes": list(self.scopes),
            "rate_limit_per_hour": self.rate_limit_per_hour,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "is_active": self.is_active,
            "allowed_ips": list(self.allowed_ips) if self.allowed_ips is not None else None,
        }

    def to_json(self) -> str:
        """Our own cache format (the field names above), not the auth service's."""
        return json.dumps(self.fields(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ApiKeyInfo:
        """Read `to_json`'s output; raises ValueError for anything else."""
        return info_from_fields(json_input.loads(text), id_field="api_key_id")


def info_from_fields(data: Any, *, id_field: str) -> ApiKeyInfo:
    """Build an ApiKeyInfo from a JSON object, checking every type; ValueError names the field."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")

    def field(name: str, kinds: tuple[type, ...], *, optional: bool = False) -> Any:
        value = data.get(name)
        if value is None and optional:
            return None
        # bool is an int in Python; JSON's true is not a rate limit.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"field {name!r}: expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
        return value

    api_key_id = field(id_field, (str,))
    user_id = field("user_id", (str,))
    if not api_key_id or not user_id:
        raise ValueError(f"fields {id_field!r} and 'user_id' must not be empty")
    scopes = field("scopes", (list,))
    if not all(isinstance(scope, str) for scope in scopes):
        raise ValueError(f"field 'scopes': expected a list of strings, got {scopes!r}")
    limit = field("rate_limit_per_hour", (int,), optional=True)
    if limit is not None and limit < 0:
        raise ValueError(f"field 'rate_limit_per_hour': negative ({limit})")
    allowed_ips = field("allowed_ips", (list,), optional=True)
    if allowed_ips is not None:
        try:
            allowed_ips = tuple(str(ipaddress.ip_network(entry, strict=False)) for entry in allowed_ips)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"field 'allowed_ips': expected a list of CIDRs ({exc})") from None
    return ApiKeyInfo(
        api_key_id=api_key_id,
        user_id=user_id,
        service_id=field("service_id", (str,), optional=True),
        scopes=tuple(scopes),
        rate_limit_per_hour=limit,
        expires_at=_parse_time(field("expires_at", (str,), optional=True)),
        is_active=field("is_active", (bool,)),
        allowed_ips=allowed_ips,
    )


def _parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"field 'expires_at': not ISO-8601: {text!r}") from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def fingerprint(api_key: str) -> str:
    """SHA-256 hex of the key: the only form of a key that may appear in a cache key or a log line."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@functools.lru_cache(maxsize=1024)
def _networks(allowed_ips: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in allowed_ips)


def address_allowed(info: ApiKeyInfo, client: str | None) -> bool:
    """Whether a request from `client` (as `client_address` decided it) may use the key: anywhere
    without an allowlist; else only from an address inside one of its networks (no address: no)."""
    if info.allowed_ips is None:
        return True
    if client is None:
        return False
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in network for network in _networks(info.allowed_ips))
