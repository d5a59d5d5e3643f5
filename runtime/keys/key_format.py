"""What an API key looks like: `hk_live_` or `hk_test_`, 32 random characters, a 6-character checksum.

    hk_live_4QbLr0vX9mEwT2sKcZp7yHnA1dGf8uJi3oRe  (46 characters, base62 after the prefix)

- The random part comes from `secrets` (32 base62 characters, about 190 bits): a key cannot be
  guessed, so storing it needs no slow hash (runtime/keys/hashing.py says why).
- `hk_live_` in production, `hk_test_` everywhere else: a test key is never mistaken for a live one.
- The checksum (CRC32 of prefix and random part, in 6 base62 characters, as GitHub's tokens do) lets
  `parse` refuse a mistyped or invented key without touching the database, and lets secret scanners
  recognise a leaked key with the regular expression `KEY_PATTERN` and confirm it offline.

A key is shown once, when it is created; after that only its display prefix (`display_prefix`) is.
"""

from __future__ import annotations

import re
import secrets
import string
import zlib
from dataclasses import dataclass

from runtime import names

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
LIVE_PREFIX = "hk_live_"
TEST_PREFIX = "hk_test_"
RANDOM_LENGTH = 32
CHECKSUM_LENGTH = 6
KEY_LENGTH = len(LIVE_PREFIX) + RANDOM_LENGTH + CHECKSUM_LENGTH
KEY_PATTERN = re.compile(rf"\bhk_(?:live|test)_[0-9A-Za-z]{{{RANDOM_LENGTH + CHECKSUM_LENGTH}}}\b")
"""What a secret scanner looks for (then `parse` confirms the checksum)."""
DISPLAY_LENGTH = len(LIVE_PREFIX) + 4
"""How much of a key is shown after creation (`hk_live_4QbL`): enough to tell a user's keys apart."""


class InvalidKeyFormat(ValueError):
    """Not one of our keys: wrong prefix, length, alphabet or checksum. Says which, never the key."""


@dataclass(frozen=True)
class ParsedKey:
    key: str
    live: bool

    @property
    def display_prefix(self) -> str:
        return display_prefix(self.key)


def prefix_for(environment: str) -> str:
    """`hk_live_` for production, `hk_test_` for every other environment."""
    return LIVE_PREFIX if names.check_environment(environment) == "production" else TEST_PREFIX


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, len(ALPHABET))
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def generate(environment: str) -> str:
    """A new key for `environment`. Show it to its owner once; store only its hash."""
    body = prefix_for(environment) + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_LENGTH))
    return body + _checksum(body)


def parse(candidate: str) -> ParsedKey:
    """`candidate` as one of our keys, or `InvalidKeyFormat` naming what is wrong (not the key)."""
    if not isinstance(candidate, str):
        raise InvalidKeyFormat("an API key is text")
    if not candidate.startswith((LIVE_PREFIX, TEST_PREFIX)):
        raise InvalidKeyFormat(f"an API key starts with {LIVE_PREFIX} or {TEST_PREFIX}")
    if len(candidate) != KEY_LENGTH:
        raise InvalidKeyFormat(f"an API key has {KEY_LENGTH} characters, this one {len(candidate)}")
    tail = candidate[len(LIVE_PREFIX) :]
    if any(character not in ALPHABET for character in tail):
        raise InvalidKeyFormat("an API key has only letters and digits after its prefix")
    body, checksum = candidate[:-CHECKSUM_LENGTH], candidate[-CHECKSUM_LENGTH:]
    if not secrets.compare_digest(_checksum(body), checksum):
        raise InvalidKeyFormat("the API key's checksum does not match: mistyped, truncated or invented")
    return ParsedKey(candidate, candidate.startswith(LIVE_PREFIX))


def is_ours(candidate: str) -> bool:
    """Whether `candidate` is in our format, checksum included (no query, no exception)."""
    try:
        parse(candidate)
    except InvalidKeyFormat:
        return False
    return True


def display_prefix(key: str) -> str:
    """The part of a key that may be shown and logged (`hk_live_4QbL`)."""
    return key[:DISPLAY_LENGTH]
