"""Client certificates forwarded by the ONE kind of proxy we are told is in front of us.

A certificate is public: anyone who ever saw a worker's certificate can paste it into a
header. A forwarded certificate therefore proves only what the proxy itself verified (that
the TLS peer held the key), and only when (1) the socket peer is one of our trusted proxies,
(2) the header is the one that proxy kind WRITES ITSELF, and (3) it verifies against our trust
bundle as a client certificate. Which kind is in front is configuration
(`HOKUSAI_MTLS_PROXY_KIND`), never guessed from which headers happen to arrive:

- `none` (default): no forwarded certificate is ever read.
- `alb`: an ALB listener in mutual-TLS *verify* mode writes `X-Amzn-Mtls-Clientcert-Leaf`
  (the URL-encoded PEM of the leaf it verified). An ALB neither writes nor strips
  `X-Forwarded-Client-Cert`, and in verify mode the passthrough header
  `X-Amzn-Mtls-Clientcert` is not the ALB's either: behind an ALB both are the client's.
- `envoy`: Envoy with `forward_client_cert_details: SANITIZE_SET` replaces
  `X-Forwarded-Client-Cert` with exactly one element of its own; its `Cert` field is the
  URL-encoded PEM. XFCC is parsed by its grammar (`,` between elements, `;` between pairs,
  `key=value`, values optionally double-quoted, `\\"` inside quotes), so a quoted
  `,Cert=...` inside another field can never become an element; more than one element or
  header means Envoy is not configured as declared, and nothing is believed.

Every forwarding header (`is_forwarding_header`), read or not, is removed before the
application sees the request.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from runtime import names
from runtime.certificates import pem
from runtime.certificates.inspection import describe_certificate
from runtime.certificates.revocation import NOTHING_REVOKED, Revocations
from runtime.certificates.verification import verify_certificate
from runtime.names import Kind

log = logging.getLogger("hokusai_mtls")

ALB_LEAF_HEADER = b"x-amzn-mtls-clientcert-leaf"
ALB_HEADER_PREFIX = b"x-amzn-mtls-"
XFCC_HEADER = b"x-forwarded-client-cert"
MAX_HEADER_BYTES = 16 * 1024
"""A URL-encoded leaf is 1-3 KiB; anything this large is not one (ALB limits its headers to 16 KiB)."""


def check_proxy_kind(kind: str, trusted_proxies: Sequence[object]) -> str:
    """`kind` if it is a known proxy kind that can work with these trusted proxies; else ValueError."""
    if kind not in names.PROXY_KINDS:
        raise ValueError(f"{names.ENV_PROXY_KIND}={kind!r}: expected one of {', '.join(names.PROXY_KINDS)}")
    if kind != names.PROXY_KIND_NONE and not trusted_proxies:
        raise ValueError(
            f"{names.ENV_PROXY_KIND}={kind} needs {names.ENV_TRUSTED_PROXY_CIDRS}: "
            "the addresses of that proxy (a forwarded certificate is believed from nobody else)"
        )
    return kind


Headers = Sequence[tuple[bytes, bytes]]


def _values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def parse_xfcc(value: str) -> list[dict[str, str]]:
    """XFCC elements as {lowercased key: value}; ValueError for anything outside the grammar."""
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    key: str | None = None
    token: list[str] = []
    quoted = was_quoted = False
    i = 0

    def end_pair() -> None:
        nonlocal key, token, was_quoted
        text = "".join(token)
        if key is None:
            if text.strip() or was_quoted:
                raise ValueError(f"XFCC: {text.strip()!r} has no '='")
        else:
            name = key.strip().lower()
            if not name or name in pairs:
                raise ValueError(f"XFCC: empty or repeated key {key.strip()!r}")
            pairs[name] = text if was_quoted else text.strip()
        key, token, was_quoted = None, [], False

    while i < len(value):
        char = value[i]
        if quoted:
            if char == "\\" and i + 1 < len(value):
                token.append(value[i + 1])
                i += 2
                continue
            if char == '"':
                quoted = False
            else:
                token.append(char)
        elif char == '"':
            if "".join(token).strip() or key is None:
                raise ValueError("XFCC: a quote in the middle of a value or key")
            token, quoted, was_quoted = [], True, True
        elif was_quoted and char not in ";, \t":
            raise ValueError("XFCC: text after a closing quote")
        elif char == "=" and key is None:
            key, token = "".join(token), []
        elif char == ";":
            end_pair()
        elif char == ",":
            end_pair()
            elements.append(pairs)
            pairs = {}
        else:
            token.append(char)
        i += 1
    if quoted:
        raise ValueError("XFCC: unterminated quoted value")
    end_pair()
    elements.append(pairs)
    if any(not element for element in elements):
        raise ValueError("XFCC: an empty element")
    return elements


def _single(headers: Headers, name: bytes) -> str | None:
    """The header's only value (None if absent); ValueError when repeated or oversized."""
    values = _values(headers, name)
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"{name.decode()} appears {len(values)} times")
    if len(values[0]) > MAX_HEADER_BYTES:
        raise ValueError(f"{name.decode()} is longer than {MAX_HEADER_BYTES} bytes")
    return values[0].decode("latin-1")


def _forwarded_pem(headers: Headers, kind: str) -> tuple[str, str | None] | None:
    """(PEM, the SHA-256 hex the proxy says it has, if any) from the kind's own header."""
    if kind == names.PROXY_KIND_ALB:
        leaf = _single(headers, ALB_LEAF_HEADER)
        return (unquote(leaf), None) if leaf else None
    if kind == names.PROXY_KIND_ENVOY:
        xfcc = _single(headers, XFCC_HEADER)
        if not xfcc:
            return None
        elements = parse_xfcc(xfcc)
        if len(elements) != 1:
            raise ValueError(f"XFCC has {len(elements)} elements; SANITIZE_SET writes exactly one")
        cert = elements[0].get("cert")
        return (unquote(cert), elements[0].get("hash")) if cert else None
    return None


def forwarded_certificate(
    headers: Headers,
    kind: str,
    trust_bundle: Sequence[x509.Certificate],
    revocations: Revocations = NOTHING_REVOKED,
) -> x509.Certificate | None:
    """The certificate the `kind` proxy forwarded in `headers`, when it verifies as a client of
    `trust_bundle` and is not revoked (`revocations`: the proxy's own checks are not ours to assume).

    Call it only after checking that the socket peer is a trusted proxy. Any malformed,
    repeated, foreign or unreadable value gives None: the request then has no certificate.
    """
    if kind == names.PROXY_KIND_NONE or not trust_bundle:
        return None
    try:
        found = _forwarded_pem(headers, kind)
        if found is None:
            return None
        text, claimed_hash = found
        if text.count("-----BEGIN") != 1:
            return None  # exactly one certificate: the leaf
        certificate = pem.load_certificate(text, "forwarded client certificate")  # every field decoded
        if claimed_hash is not None:
            der = certificate.public_bytes(Encoding.DER)
            if hashlib.sha256(der).hexdigest() != claimed_hash.lower():
                return None
        verify_certificate(certificate, trust_bundle, kind=Kind.CLIENT, source="forwarded client certificate")
    except Exception:  # hostile input: any parse or verify failure means "no certificate"
        return None
    if revocations.refuses(certificate):
        _log_revoked(describe_certificate(certificate))
        return None
    return certificate


@functools.lru_cache(maxsize=256)
def _log_revoked(description: str) -> None:
    """Once per revoked certificate (while it is among the last 256 seen): a proxy may forward it often."""
    log.warning("a forwarded client certificate is revoked (%s): the request has no certificate", description)


def is_forwarding_header(name: bytes) -> bool:
    lowered = name.lower()
    return lowered == XFCC_HEADER or lowered.startswith(ALB_HEADER_PREFIX)
