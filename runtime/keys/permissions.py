"""Who may do what with keys through the REST API (seed 002 §6): a user their own, an admin anyone's.

- `keys:admin` manages every user's keys, with any scopes, limits and addresses. The first one is
  made by an operator (`hokusai-mtls auth create-key --admin`).
- `keys:manage` manages the caller's own keys (`user_id` of the key or certificate that called).
- Neither: the REST API refuses (403), whatever the key may do elsewhere.

A key that manages keys must not be a way to a wider key: what a non-admin caller creates, or gets
by rotating, is `covered` by the caller's own key. Its scopes are among the caller's, its addresses
inside the caller's allowlist, its expiry no later and its rate limit no higher; a new key inherits
the caller's limits where the request leaves them out. So a leaked `keys:manage` key can mint only
keys as weak as itself, never unrestricted ones. A user may hold at most `MAX_ACTIVE_KEYS_PER_USER`
active keys (a key per request would otherwise multiply a per-key rate limit).
Revoking and reading need ownership only: taking a right away widens nothing.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

ADMIN_SCOPE = "keys:admin"
MANAGE_SCOPE = "keys:manage"
MAX_ACTIVE_KEYS_PER_USER = 25


class NotAllowed(Exception):
    """The caller may not do this; the message says what it lacks (shown in the 403)."""


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the middleware's verdict, and the limits of the key they called with
    (None: not limited, as for a service's certificate)."""

    user_id: str
    scopes: tuple[str, ...]
    key_id: str | None = None
    expires_at: dt.datetime | None = None
    rate_limit_per_hour: int | None = None
    allowed_ips: tuple[str, ...] | None = None

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    @property
    def actor(self) -> str:
        """How the audit names the caller: the user and the key they used."""
        actor = f"api:{self.user_id}"
        return f"{actor} key:{self.key_id}" if self.key_id else actor

    def require_manage(self) -> None:
        if not (self.is_admin or MANAGE_SCOPE in self.scopes):
            raise NotAllowed(f"managing API keys needs the {MANAGE_SCOPE} scope (or {ADMIN_SCOPE})")

    def owner_filter(self, user_id: str | None) -> str | None:
        """Whose keys the call may touch: None (anyone's) for an admin, else the caller's own."""
        if self.is_admin:
            return user_id
        if user_id is not None and user_id != self.user_id:
            raise NotAllowed(f"only {ADMIN_SCOPE} manages another user's keys")
        return self.user_id

    def bounded(
        self,
        *,
        scopes: Sequence[str],
        expires_at: dt.datetime | None,
        rate_limit_per_hour: int | None,
        allowed_ips: Sequence[str] | None,
    ) -> tuple[dt.datetime | None, int | None, list[str] | None]:
        """A new key's (expiry, rate limit, allowlist), the caller's where the request gives none;
        `NotAllowed` when the key would be wider than the caller's own."""
        if self.is_admin:
            return expires_at, rate_limit_per_hour, list(allowed_ips) if allowed_ips is not None else None
        expires_at = self.expires_at if expires_at is None else expires_at
        rate = self.rate_limit_per_hour if rate_limit_per_hour is None else rate_limit_per_hour
        networks = (
            list(allowed_ips)
            if allowed_ips is not None
            else (list(self.allowed_ips) if self.allowed_ips is not None else None)
        )
        self.check_covers(
            scopes=scopes, expires_at=expires_at, rate_limit_per_hour=rate, allowed_ips=networks
        )
        return expires_at, rate, networks

    def check_covers(
        self,
        *,
        scopes: Sequence[str],
        expires_at: dt.datetime | None,
        rate_limit_per_hour: int | None,
        allowed_ips: Sequence[str] | None,
    ) -> None:
        """`NotAllowed` unless a key of these rights is no wider than the caller's (admins: anything)."""
        if self.is_admin:
            return
        extra = sorted(set(scopes) - set(self.scopes))
        if extra:
            raise NotAllowed(f"a key cannot be given scopes the calling key lacks: {', '.join(extra)}")
        if self.expires_at is not None and (expires_at is None or expires_at > self.expires_at):
            raise NotAllowed(
                f"the key cannot outlive the calling key (expires {self.expires_at.isoformat()})"
            )
        if self.rate_limit_per_hour is not None and (
            rate_limit_per_hour is None or rate_limit_per_hour > self.rate_limit_per_hour
        ):
            raise NotAllowed(
                f"the key's rate limit cannot exceed the calling key's ({self.rate_limit_per_hour} per hour)"
            )
        if self.allowed_ips is not None:
            mine = [ipaddress.ip_network(entry, strict=False) for entry in self.allowed_ips]
            if allowed_ips is None:
                raise NotAllowed("the key must be limited to the calling key's allowed addresses")
            for entry in allowed_ips:
                network = ipaddress.ip_network(entry, strict=False)
                if not any(_inside(network, own) for own in mine):
                    raise NotAllowed(f"allowed_ips: {entry} is outside the calling key's allowed addresses")


def _inside(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network, own: ipaddress.IPv4Network | ipaddress.IPv6Network
) -> bool:
    if isinstance(network, ipaddress.IPv4Network) and isinstance(own, ipaddress.IPv4Network):
        return network.subnet_of(own)
    if isinstance(network, ipaddress.IPv6Network) and isinstance(own, ipaddress.IPv6Network):
        return network.subnet_of(own)
    return False  # another IP version is never inside
