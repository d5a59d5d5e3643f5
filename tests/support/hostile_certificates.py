"""Certificates signed by a test CA with one field made hostile: each one a class an outside
fuzz run found raising something other than our named errors (a traceback, or no code).

`HOSTILE[name](ca)` returns the DER; `FIELD[name]` is the field our error must name.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509

from runtime.certificates.issuance import CertificateAuthority
from tests.support import der
from tests.support.certs import client, crafted_client


def _leaf(ca: CertificateAuthority) -> x509.Certificate:
    return client(ca).certificate


def repeated_subject_attribute(ca: CertificateAuthority) -> bytes:
    """One RDN holding CN=twice+CN=twice: cryptography raises when the subject is first read."""
    rdn = x509.RelativeDistinguishedName(
        [
            x509.NameAttribute(x509.NameOID.COMMON_NAME, "twiceA"),
            x509.NameAttribute(x509.NameOID.COMMON_NAME, "twiceB"),
        ]
    )
    certificate = crafted_client(ca, subject=x509.Name([rdn]), uris=("spiffe://hokusai/development/api",))
    return der.resigned_with(certificate.certificate, ca, b"twiceB", b"twiceA")


def repeated_extension(ca: CertificateAuthority) -> bytes:
    """Key usage relabelled as a second basic constraints: DuplicateExtension, lazily."""
    return der.resigned_with(_leaf(ca), ca, bytes.fromhex("0603551d0f"), bytes.fromhex("0603551d13"))


def invalid_version(ca: CertificateAuthority) -> bytes:
    """X.509 version 6 (v1-v3 exist): InvalidVersion."""
    return der.resigned_with(_leaf(ca), ca, bytes.fromhex("a003020102"), bytes.fromhex("a003020105"))


def unknown_key_algorithm(ca: CertificateAuthority) -> bytes:
    """The EC key's algorithm OID changed to one nobody knows: UnsupportedAlgorithm from public_key()."""
    return der.resigned_with(_leaf(ca), ca, bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2a8648ce3d0209"))


def malformed_san(ca: CertificateAuthority) -> bytes:
    """The SPIFFE URI's GeneralName tag changed to [9], which GeneralName does not have."""
    leaf = _leaf(ca)
    tbs = leaf.tbs_certificate_bytes
    at = tbs.index(b"spiffe://")
    old = tbs[at - 2 : at + 9]
    return der.resigned_with(leaf, ca, old, b"\x89" + old[1:])


def bit_string_common_name(ca: CertificateAuthority) -> bytes:
    """The CN as a BIT STRING: TypeError while the subject is rendered (RFC 4514)."""
    leaf = _leaf(ca)
    common_name = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value.encode()
    tbs = leaf.tbs_certificate_bytes
    at = tbs.index(common_name)
    old = tbs[at - 2 : at + len(common_name)]
    return der.resigned_with(leaf, ca, old, b"\x03" + old[1:])


HOSTILE: dict[str, Callable[[CertificateAuthority], bytes]] = {
    "repeated subject attribute": repeated_subject_attribute,
    "repeated extension": repeated_extension,
    "invalid version": invalid_version,
    "unknown key algorithm": unknown_key_algorithm,
    "malformed SAN": malformed_san,
    "BIT STRING common name": bit_string_common_name,
}

FIELD = {
    "repeated subject attribute": "malformed subject",
    "repeated extension": "malformed extensions",
    "invalid version": "InvalidVersion",
    "unknown key algorithm": "malformed public key",
    "malformed SAN": "malformed extensions",
    "BIT STRING common name": "malformed subject",
}
"""What the PemError must say, so an operator knows which field to look at."""
