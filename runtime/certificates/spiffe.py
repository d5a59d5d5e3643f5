"""SPIFFE IDs, read as the SPIFFE spec defines them (SPIFFE-ID.md §2, X509-SVID.md §2).

A SPIFFE ID is `spiffe://<trust domain>/<path>`: the scheme is exactly `spiffe`; the trust
domain holds only lowercase letters, digits, `.`, `-` and `_`; the path is one or more
segments of letters, digits, `.`, `-`, `_`, none empty, none `.` or `..`; no port, user
info, query, fragment or percent-encoding; at most 2048 bytes. Anything else is not a
SPIFFE ID at all, so `spiffe://HOKUSAI/...` or `spiffe://hokusai/x/../api` is refused
instead of being read loosely (go-spiffe's `spiffeid.FromString` holds the same rules).

An X.509-SVID carries exactly one URI SAN: a certificate with a SPIFFE URI and any other
URI, or two SPIFFE URIs, names no one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_LENGTH = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    segments: tuple[str, ...]

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}/{'/'.join(self.segments)}"


def looks_like_spiffe(uri: str) -> bool:
    """The URI claims the spiffe scheme, in any case: it must then be a valid SPIFFE ID or nothing."""
    return uri[:7].lower() == "spiffe:"


def parse_spiffe_id(uri: str) -> SpiffeId:
    """The SPIFFE ID in `uri`; ValueError naming the rule it breaks."""
    if len(uri.encode("utf-8", "surrogatepass")) > MAX_LENGTH:
        raise ValueError(f"longer than {MAX_LENGTH} bytes")
    if not uri.startswith(SCHEME_PREFIX):
        raise ValueError("the scheme must be exactly 'spiffe://'")
    trust_domain, slash, path = uri[len(SCHEME_PREFIX) :].partition("/")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(
            f"trust domain {trust_domain!r}: only a-z, 0-9, '.', '-', '_' (no port, no user info)"
        )
    if not slash or not path:
        raise ValueError("no path: a workload's SPIFFE ID names it below the trust domain")
    segments = tuple(path.split("/"))
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(f"path segment {segment!r}: only A-Z, a-z, 0-9, '.', '-', '_', never empty")
        if segment in (".", ".."):
            raise ValueError(f"path segment {segment!r} is not allowed")
    return SpiffeId(trust_domain, segments)
