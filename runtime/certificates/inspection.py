"""Read a certificate into plain facts: subject, SANs, validity, key type, usage.

The same facts feed `hokusai-mtls certs inspect` (text or `--json`), the loader's log
line, and (later) the expiry metric.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

E = TypeVar("E", bound=x509.ExtensionType)

_USAGE_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


def extension(certificate: x509.Certificate | x509.CertificateRevocationList, kind: type[E]) -> E | None:
    """The value of one extension, or None when the certificate (or revocation list) lacks it."""
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def is_ca(certificate: x509.Certificate) -> bool:
    constraints = extension(certificate, x509.BasicConstraints)
    return bool(constraints and constraints.ca)


def extended_key_usages(certificate: x509.Certificate) -> list[str]:
    usage = extension(certificate, x509.ExtendedKeyUsage)
    return [_USAGE_NAMES.get(oid, oid.dotted_string) for oid in usage] if usage else []


def dns_names(certificate: x509.Certificate) -> list[str]:
    san = extension(certificate, x509.SubjectAlternativeName)
    return san.get_values_for_type(x509.DNSName) if san else []


def uris(certificate: x509.Certificate) -> list[str]:
    san = extension(certificate, x509.SubjectAlternativeName)
    return san.get_values_for_type(x509.UniformResourceIdentifier) if san else []


def ip_addresses(certificate: x509.Certificate) -> list[str]:
    san = extension(certificate, x509.SubjectAlternativeName)
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] if san else []


def key_type(certificate: x509.Certificate) -> str:
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}.get(
            key.curve.name, f"ECDSA {key.curve.name}"
        )
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def days_left(certificate: x509.Certificate, now: dt.datetime | None = None) -> int:
    """Whole days until notAfter, rounded down; negative once expired."""
    remaining = certificate.not_valid_after_utc - (now or dt.datetime.now(dt.UTC))
    return math.floor(remaining.total_seconds() / 86400)


def hours_left(certificate: x509.Certificate, now: dt.datetime | None = None) -> float:
    """Hours until notAfter, rounded down to a hundredth; negative once expired (leaves live a day)."""
    remaining = certificate.not_valid_after_utc - (now or dt.datetime.now(dt.UTC))
    return math.floor(remaining.total_seconds() / 36) / 100


def time_left_text(certificate: x509.Certificate, now: dt.datetime | None = None) -> str:
    """`23.98 hours` below two days (leaves live a day: `0 days` would say nothing), else `89 days`."""
    hours = hours_left(certificate, now)
    return f"{hours:.2f} hours" if hours < 48 else f"{days_left(certificate, now)} days"


def describe(certificate: x509.Certificate, now: dt.datetime | None = None) -> dict[str, Any]:
    """Everything an operator asks about a certificate, JSON-ready."""
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "serial": f"{certificate.serial_number:x}",
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
        "days_left": days_left(certificate, now),
        "hours_left": hours_left(certificate, now),
        "key_type": key_type(certificate),
        "is_ca": is_ca(certificate),
        "extended_key_usage": extended_key_usages(certificate),
        "dns_names": dns_names(certificate),
        "uris": uris(certificate),
        "ip_addresses": ip_addresses(certificate),
        "sha256_fingerprint": certificate.fingerprint(hashes.SHA256()).hex(":").upper(),
    }


def format_text(facts: dict[str, Any]) -> str:
    """`describe()` as aligned `field: value` lines; empty lists are left out."""
    lines = []
    for field, value in facts.items():
        if isinstance(value, list):
            if not value:
                continue
            value = ", ".join(value)
        lines.append(f"{field.replace('_', ' '):>20}: {value}")
    return "\n".join(lines)


def describe_certificate(certificate: x509.Certificate) -> str:
    """Serial, subject and SPIFFE ID in one line: what an operator greps a refusal's log for."""
    spiffe = next((uri for uri in uris(certificate) if uri.startswith("spiffe://")), None)
    text = f"serial {certificate.serial_number:x}, subject {certificate.subject.rfc4514_string()}"
    return text + (f", {spiffe}" if spiffe else "")
