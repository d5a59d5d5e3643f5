"""Our API keys: generated from `secrets`, prefixed by environment, refused offline when mistyped."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.keys import key_format
from runtime.keys.key_format import ALPHABET, KEY_PATTERN, InvalidKeyFormat, display_prefix, generate, parse


@pytest.mark.parametrize(
    ("environment", "prefix"),
    [("production", "hk_live_"), ("staging", "hk_test_"), ("development", "hk_test_")],
)
def test_a_key_is_live_only_in_production(environment, prefix):
    key = generate(environment)
    assert key.startswith(prefix)
    assert parse(key).live is (prefix == "hk_live_")
    assert len(key) == key_format.KEY_LENGTH
    assert KEY_PATTERN.fullmatch(key)


def test_keys_do_not_repeat():
    assert len({generate("staging") for _ in range(1000)}) == 1000


@given(
    position=st.integers(min_value=8, max_value=key_format.KEY_LENGTH - 1),
    replacement=st.sampled_from(ALPHABET),
)
def test_any_one_character_changed_is_refused_without_a_lookup(position, replacement):
    key = generate("production")
    typo = key[:position] + replacement + key[position + 1 :]
    if typo == key:
        return
    with pytest.raises(InvalidKeyFormat, match="checksum"):
        parse(typo)


@pytest.mark.parametrize(
    ("candidate", "why"),
    [
        ("sk_live_" + "a" * 38, "starts with"),
        ("hk_live_abc", "46 characters"),
        ("hk_live_" + "a" * 37 + "-", "only letters and digits"),
        ("hk_live_" + "a" * 38, "checksum"),
        (None, "text"),
    ],
)
def test_what_is_not_a_key_is_named_without_echoing_it(candidate, why):
    with pytest.raises(InvalidKeyFormat, match=why) as refused:
        parse(candidate)
    if isinstance(candidate, str) and len(candidate) > 12:
        assert candidate not in str(refused.value)


def test_only_the_display_prefix_is_shown():
    key = generate("production")
    assert display_prefix(key) == key[:12]
    assert parse(key).display_prefix == key[:12]
    assert len(display_prefix(key)) < key_format.KEY_LENGTH - key_format.CHECKSUM_LENGTH


def test_a_scanner_finds_a_leaked_key_in_text():
    key = generate("staging")
    found = KEY_PATTERN.findall(f'config = {{"token": "{key}"}}\n')
    assert found == [key]
    assert parse(found[0]).key == key
