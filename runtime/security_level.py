"""The three security levels of seed 003, from strongest to none.

A service always knows, and logs once at start, which level it runs at; only
`development` may run below MTLS while mTLS is enabled (see `runtime.secrets.loader`).
"""

from __future__ import annotations

import enum


class SecurityLevel(enum.Enum):
    MTLS = "MTLS"
    """Own certificate + trust bundle: both ends authenticated."""
    TLS = "TLS"
    """Trust bundle only: the server is verified, this caller is anonymous to it."""
    INSECURE = "INSECURE"
    """Plain HTTP: the rollback switch, or development without any certificate."""


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_flag(name: str, value: str | None, *, default: bool) -> bool:
    """Read a boolean environment variable; an unknown word is an error, never a guess."""
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; use true or false")
