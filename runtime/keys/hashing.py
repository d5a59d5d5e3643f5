"""How a key is stored: HMAC-SHA256 under a server-side secret, not bcrypt.

The seed asks for bcrypt. A slow hash protects what a person chose (a password that a dump lets an
attacker guess at offline); our keys are 190 random bits (`runtime.keys.key_format`), which no
guessing reaches, so bcrypt would add its ~100 ms to every cache miss and protect nothing. What a
database dump must not reveal is a usable key, and a keyed hash does that: without the secret (in
Secrets Manager, never in the database) the hashes in a dump cannot be checked against anything,
and with it they still cannot be reversed. Lookups are by the hash (an indexed equality); the row
found is compared again in constant time.

Rotating the secret makes every stored hash stale, so a `KeyHasher` also takes previous secrets:
`digests` gives a key's hash under each, for lookups while a rotation re-hashes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

MIN_SECRET_BYTES = 32


class KeyHasher:
    """`digest(key)`: the hex HMAC-SHA256 of `key` under the current secret; `digests(key)`: under
    the current and then every previous one."""

    def __init__(self, secret: bytes, previous: Sequence[bytes] = ()) -> None:
        for value in (secret, *previous):
            if len(value) < MIN_SECRET_BYTES:
                raise ValueError(f"the API-key hashing secret needs at least {MIN_SECRET_BYTES} bytes")
        self._secrets = (bytes(secret), *map(bytes, previous))

    def digest(self, key: str) -> str:
        return self._digest(self._secrets[0], key)

    def digests(self, key: str) -> list[str]:
        return [self._digest(secret, key) for secret in self._secrets]

    def matches(self, key: str, stored: str) -> bool:
        """Whether `stored` is the hash of `key` under one of the secrets, in constant time."""
        found = False
        for digest in self.digests(key):
            found |= hmac.compare_digest(digest, stored)
        return found

    @staticmethod
    def _digest(secret: bytes, key: str) -> str:
        return hmac.new(secret, key.encode("utf-8"), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:  # never the secret
        return f"KeyHasher({len(self._secrets)} secret(s))"
