"""Which keys' cached answers went stale: a revoked or rotated key is refused within a second.

`ApiKeyValidator` caches what it learnt about a key for five minutes (in memory, or in Redis for
every instance), keyed by the key's fingerprint. The store knows a key by its id, and only its keyed
hash, so whoever revokes a key cannot name the cache entry to delete. Instead every instance polls
the store's audit for revocations and rotations (`runtime.auth.key_store_backend.ChangePoller`,
every `POLL_SECONDS`) and notes the key ids here; the next request with such a key skips the cache
once, asks the store, and caches the fresh answer (inactive, or the rotation's grace-period expiry).

Why the store and not a Redis channel: the audit is written in the same transaction as the change,
so no change is missed (a Redis publish is lost by an instance that was reconnecting, and Redis is
optional and only ever a cache here); an instance that starts reads the last `lookback` of changes,
which covers every entry another instance may have put into a shared cache before it started.

A noted id is forgotten when the fresh answer is in, or after `window_seconds` (by then every entry
cached before the change has expired anyway), so the map holds at most the keys changed in that window.
Until the first look at the store has succeeded, every cached answer counts as stale: fail closed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

POLL_SECONDS = 0.5
"""How often each instance asks the store what changed: the bound on how long a revoked key works."""


class KeyChanges:
    """Key ids changed since their answers were cached; noted from the poller's thread, read on the loop."""

    def __init__(self, window_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_seconds = window_seconds
        self._clock = clock
        self._stale: dict[str, float] = {}
        self._lock = threading.Lock()
        self.current = False
        """False until the first look at the store succeeded: until then every cached answer is stale
        (an instance that just started cannot know what was revoked while a shared cache kept it)."""
        self.following = False
        """Whether the last look succeeded (for /health); after an outage, cached answers stay trusted
        up to their TTL, so the store being down does not refuse every key that was just fine."""

    def __len__(self) -> int:
        return len(self._stale)

    def note(self, key_ids: Iterable[str]) -> None:
        """The ids of keys changed since the last look; also marks this instance current."""
        now = self._clock()
        with self._lock:
            self.current = True
            for key_id in key_ids:
                self._stale[key_id] = now
            expired = [k for k, noted in self._stale.items() if now - noted > self.window_seconds]
            for key_id in expired:
                del self._stale[key_id]

    def is_stale(self, key_id: str) -> bool:
        """Whether a cached answer about `key_id` must be asked again (cheap: one dict lookup)."""
        return not self.current or key_id in self._stale

    def refreshed(self, key_id: str, since: float) -> None:
        """The store's answer, asked at `since` (this clock), is cached: unless the key changed again
        after that, forget it."""
        with self._lock:
            noted = self._stale.get(key_id)
            if noted is not None and noted <= since:
                del self._stale[key_id]

    def now(self) -> float:
        return self._clock()
