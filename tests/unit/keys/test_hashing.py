"""A keyed hash for 190-bit random keys: a dump alone checks nothing, a rotation keeps keys working."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from runtime.keys import hashing
from runtime.keys.hashing import KeyHasher
from runtime.keys.key_format import generate

SECRET = b"s" * 32
NEXT = b"n" * 32


def test_the_stored_hash_is_hmac_sha256_under_the_secret():
    key = generate("staging")
    assert KeyHasher(SECRET).digest(key) == hmac.new(SECRET, key.encode(), hashlib.sha256).hexdigest()
    assert KeyHasher(SECRET).digest(key) != hashlib.sha256(key.encode()).hexdigest()  # not a plain hash


def test_another_secret_gives_another_hash():
    key = generate("staging")
    assert KeyHasher(SECRET).digest(key) != KeyHasher(NEXT).digest(key)


def test_during_a_secret_rotation_keys_stored_under_the_previous_secret_still_match():
    key = generate("staging")
    stored_before = KeyHasher(SECRET).digest(key)
    rotating = KeyHasher(NEXT, previous=[SECRET])
    assert rotating.digest(key) == KeyHasher(NEXT).digest(key)
    assert rotating.matches(key, stored_before)
    assert not KeyHasher(NEXT).matches(key, stored_before)
    assert not rotating.matches(generate("staging"), stored_before)


@pytest.mark.parametrize("secret", [b"", b"short", b"x" * 31])
def test_a_short_secret_is_refused(secret):
    with pytest.raises(ValueError, match="at least 32 bytes"):
        KeyHasher(secret)


def test_the_secret_never_shows_in_its_representation():
    assert "s" * 8 not in repr(KeyHasher(SECRET))


def test_matching_compares_in_constant_time_under_every_secret_even_after_a_match(monkeypatch):
    """No early exit and no `==`: each candidate digest goes through `hmac.compare_digest`, so how
    long a comparison takes says nothing about how much of the hash an attacker got right."""
    compared = []
    real = hashing.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hashing.hmac, "compare_digest", spy)
    old, new = b"o" * 32, b"n" * 32
    stored_under_new = KeyHasher(new).digest("hk_test_k")
    hasher = KeyHasher(new, previous=[old])
    assert hasher.matches("hk_test_k", stored_under_new)  # matches under the first secret...
    assert len(compared) == 2  # ...and the previous one is compared all the same
    assert all(b == stored_under_new for _, b in compared)
    compared.clear()
    assert not hasher.matches("hk_test_other", stored_under_new)
    assert len(compared) == 2
