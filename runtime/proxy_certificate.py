"""Client certificates forwarded by a proxy that terminated TLS (an ALB with mTLS, Envoy).

Honoured only when the socket peer is one of OUR trusted proxies (a client can write any
header it likes), and even then verified here against our trust bundle as a client
certificate: the proxy is trusted to report what it saw, not to decide what we trust.

- `X-Amzn-Mtls-Clientcert`: the ALB's URL-encoded PEM leaf (the ALB replaces any such header
  a client sent);
- `X-Forwarded-Client-Cert` (Envoy): each proxy appends an element, so the right-most one is
  what our closest proxy wrote; its `Cert="..."` field is the URL-encoded PEM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import unquote

from cryptography import x509

from runtime.errors import CertificateError
from runtime.names import Kind
from runtime.verification import verify_certificate

ALB_HEADER = b"x-amzn-mtls-clientcert"
XFCC_HEADER = b"x-forwarded-client-cert"
_XFCC_CERT = re.compile(r'(?:^|;)\s*Cert="?([^";]+)"?', re.IGNORECASE)


def _last(scope: Mapping, name: bytes) -> str | None:
    values = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == name]
    return values[-1] if values else None


def _forwarded_pem(scope: Mapping) -> str | None:
    if alb := _last(scope, ALB_HEADER):
        return unquote(alb)
    if xfcc := _last(scope, XFCC_HEADER):
        match = _XFCC_CERT.search(xfcc.split(",")[-1])
        return unquote(match.group(1)) if match else None
    return None


def forwarded_certificate(
    scope: Mapping, trust_bundle: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The forwarded client certificate when it verifies as a client of `trust_bundle`; else None.

    Call it only after checking that the socket peer is a trusted proxy.
    """
    text = _forwarded_pem(scope)
    if not text or not trust_bundle:
        return None
    try:
        certificate = x509.load_pem_x509_certificate(text.encode())
        verify_certificate(certificate, trust_bundle, kind=Kind.CLIENT, source="forwarded client certificate")
    except (ValueError, CertificateError):
        return None
    return certificate
