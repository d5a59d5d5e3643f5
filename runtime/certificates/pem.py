"""Parse PEM with errors that say which file or secret is wrong and how.

`cryptography` reports every parse failure as a bare ValueError; an operator needs to
know whether the text was empty, truncated, or simply the wrong thing (a private key
pasted where the certificate goes is the classic).

Everything here reads hostile input (a secret anyone with write access filled, a file, a
header a proxy forwarded), so two rules hold:

- Framing is linear: one pass over the BEGIN/END lines pairs each BEGIN with the next
  marker. (A regular expression from BEGIN to its END rescanned the rest of the text for
  every BEGIN without an END: 1 MB took minutes.)
- Certificates are parsed eagerly. `cryptography` decodes a certificate's subject, issuer,
  extensions and key only when they are first read, and then raises ValueError, TypeError,
  `UnsupportedAlgorithm`, `DuplicateExtension` or `InvalidVersion` wherever that happens,
  long after loading (once, after the files had been swapped). `parsed()` reads every field
  our code reads, once, here, and turns any failure into a `PemError` naming the field; a
  certificate that leaves this module can be described, verified and logged without raising.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from runtime.errors import CertificateError, PemError, WrongPemTypeError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_MARKER = re.compile(rb"-----(BEGIN|END) ([A-Z0-9 ]{1,64})-----")
_CERTIFICATE = b"CERTIFICATE"
_CRL = b"X509 CRL"

_FIELDS = (
    ("version", lambda c: c.version),
    ("serial number", lambda c: c.serial_number),
    ("subject", lambda c: c.subject.rfc4514_string()),
    ("issuer", lambda c: c.issuer.rfc4514_string()),
    ("validity", lambda c: (c.not_valid_before_utc, c.not_valid_after_utc)),
    ("extensions", lambda c: [extension.value for extension in c.extensions]),
    ("public key", lambda c: c.public_key()),
    ("signature algorithm", lambda c: c.signature_hash_algorithm),
    ("encoding", lambda c: c.fingerprint(hashes.SHA256())),
)
"""Every field of a certificate that hokusai-mtls reads, in the order an operator reads them."""


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("ascii", errors="replace") if isinstance(data, str) else data


def _blocks(data: bytes, source: str, expected: str) -> list[tuple[bytes, bytes]]:
    """Return (label, block) pairs, refusing text without PEM or with a cut-off block (one pass)."""
    blocks: list[tuple[bytes, bytes]] = []
    open_label, open_at = None, 0
    for marker in _MARKER.finditer(data):
        kind, label = marker.group(1), marker.group(2)
        if kind == b"BEGIN":
            if open_label is not None:
                raise _truncated(source, open_label)
            open_label, open_at = label, marker.start()
        elif open_label is None:
            raise PemError(f"{source}: -----END {label.decode()}----- without a BEGIN line")
        elif label != open_label:
            raise PemError(
                f"{source}: -----BEGIN {open_label.decode()}----- is closed by -----END {label.decode()}-----"
            )
        else:
            blocks.append((label, data[open_at : marker.end()]))
            open_label = None
    if open_label is not None:
        raise _truncated(source, open_label)
    if not blocks:
        what = "empty" if not data.strip() else "not PEM"
        raise PemError(f"{source}: {what}; expected a -----BEGIN {expected}----- block")
    return blocks


def _truncated(source: str, label: bytes) -> PemError:
    return PemError(f"{source}: truncated PEM: -----BEGIN {label.decode()}----- has no matching END line")


def parsed(certificate: x509.Certificate, source: str) -> x509.Certificate:
    """`certificate`, once every field we read has decoded; else a `PemError` naming the field."""
    for field, read in _FIELDS:
        try:
            read(certificate)
        except Exception as exc:  # hostile DER: cryptography raises many types, all mean malformed
            raise PemError(f"{source}: malformed {field}: {_reason(exc)}") from exc
    return certificate


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)


def load_der_certificate(der: bytes, source: str) -> x509.Certificate:
    """One DER certificate (a TLS peer's), parsed eagerly like every PEM one."""
    try:
        certificate = x509.load_der_x509_certificate(der)
    except Exception as exc:  # hostile DER
        raise PemError(f"{source}: corrupt certificate: {_reason(exc)}") from exc
    return parsed(certificate, source)


def load_certificates(data: bytes | str, source: str) -> list[x509.Certificate]:
    """All certificates of a PEM bundle, in order; anything else in the text is an error."""
    blocks = _blocks(_as_bytes(data), source, "CERTIFICATE")
    others = sorted({label.decode() for label, _ in blocks if label != _CERTIFICATE})
    if others:
        raise WrongPemTypeError(f"{source}: expected certificates only, found {' and '.join(others)}")
    certificates = []
    for index, (_, block) in enumerate(blocks, start=1):
        try:
            certificate = x509.load_pem_x509_certificate(block)
        except Exception as exc:  # hostile PEM: ValueError mostly, but not only
            raise PemError(f"{source}: certificate #{index} is corrupt: {_reason(exc)}") from exc
        certificates.append(parsed(certificate, f"{source}: certificate #{index}"))
    return certificates


def load_crls(data: bytes | str, source: str) -> list[x509.CertificateRevocationList]:
    """All revocation lists (`X509 CRL` blocks) of a PEM text, parsed eagerly like certificates;
    empty text is no list at all (the `ca-crl` secret before the first revocation)."""
    raw = _as_bytes(data)
    if not raw.strip():
        return []
    blocks = _blocks(raw, source, _CRL.decode())
    others = sorted({label.decode() for label, _ in blocks if label != _CRL})
    if others:
        raise WrongPemTypeError(
            f"{source}: expected revocation lists (X509 CRL) only, found {' and '.join(others)}"
        )
    crls = []
    for index, (_, block) in enumerate(blocks, start=1):
        where = f"{source}: revocation list #{index}"
        try:
            crl = x509.load_pem_x509_crl(block)
            # Every field the check reads, now: cryptography decodes them lazily (see the module's rules).
            (
                crl.issuer.rfc4514_string(),
                crl.last_update_utc,
                crl.next_update_utc,
                crl.signature_hash_algorithm,
            )
            _ = [(entry.serial_number, entry.revocation_date_utc) for entry in crl]
            _ = [extension.value for extension in crl.extensions]
        except Exception as exc:  # hostile PEM: ValueError mostly, but not only
            raise PemError(f"{where} is corrupt: {_reason(exc)}") from exc
        crls.append(crl)
    return crls


def crls_pem(crls: list[x509.CertificateRevocationList]) -> bytes:
    return b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in crls)


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
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PemError(f"{source}: private key is corrupt: {_reason(exc)}") from exc
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
