"""Parse PEM with errors that say which file or secret is wrong and how.

`cryptography` reports every parse failure as a bare ValueError; an operator needs to
know whether the text was empty, truncated, or simply the wrong thing (a private key
pasted where the certificate goes is the classic).
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from runtime.errors import CertificateError, PemError, WrongPemTypeError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s.*?-----END \1-----", re.DOTALL)
_CERTIFICATE = b"CERTIFICATE"


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("ascii", errors="replace") if isinstance(data, str) else data


def _blocks(data: bytes, source: str, expected: str) -> list[tuple[bytes, bytes]]:
    """Return (label, block) pairs, refusing text without PEM or with a cut-off block."""
    begins = _BEGIN.findall(data)
    if not begins:
        what = "empty" if not data.strip() else "not PEM"
        raise PemError(f"{source}: {what}; expected a -----BEGIN {expected}----- block")
    blocks = [(m.group(1), m.group(0)) for m in _BLOCK.finditer(data)]
    if len(blocks) != len(begins):
        complete = {label for label, _ in blocks}
        cut = next((label for label in begins if label not in complete), begins[-1])
        raise PemError(f"{source}: truncated PEM: -----BEGIN {cut.decode()}----- has no matching END line")
    return blocks


def load_certificates(data: bytes | str, source: str) -> list[x509.Certificate]:
    """All certificates of a PEM bundle, in order; anything else in the text is an error."""
    blocks = _blocks(_as_bytes(data), source, "CERTIFICATE")
    others = sorted({label.decode() for label, _ in blocks if label != _CERTIFICATE})
    if others:
        raise WrongPemTypeError(f"{source}: expected certificates only, found {' and '.join(others)}")
    certificates = []
    for index, (_, block) in enumerate(blocks, start=1):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            raise PemError(f"{source}: certificate #{index} is corrupt: {exc}") from exc
    return certificates


def load_certificate(data: bytes | str, source: str) -> x509.Certificate:
    """Exactly one certificate."""
    certificates = load_certificates(data, source)
    if len(certificates) != 1:
        raise PemError(f"{source}: expected one certificate, found {len(certificates)}")
    return certificates[0]


def load_private_key(data: bytes | str, source: str) -> PrivateKey:
    """One unencrypted EC or RSA private key (MLflow and uvicorn cannot prompt for a password)."""
    blocks = _blocks(_as_bytes(data), source, "PRIVATE KEY")
    labels = [label.decode() for label, _ in blocks]
    keys = [(label, block) for label, block in blocks if label.endswith(b"PRIVATE KEY")]
    if not keys:
        raise WrongPemTypeError(
            f"{source}: expected a private key, found {' and '.join(sorted(set(labels)))}"
        )
    if len(blocks) != 1:
        raise PemError(f"{source}: expected one private key block, found {', '.join(labels)}")
    label, block = keys[0]
    if label == b"ENCRYPTED PRIVATE KEY":
        raise PemError(f"{source}: the private key is encrypted; an unencrypted key is required")
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError) as exc:
        raise PemError(f"{source}: private key is corrupt: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"{source}: unsupported key type {type(key).__name__}; use ECDSA or RSA")
    return key


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def bundle_pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(certificate_pem(c) for c in certificates)


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8, unencrypted: the form both uvicorn and requests accept."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
