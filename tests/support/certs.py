"""Checkers that state what a CA and a leaf must look like (as trustme's tests do).

They read the certificate with `cryptography` directly, not through runtime.certificates.inspection,
so a bug there cannot hide a bug in issuance.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from runtime.certificates.identity import TLSIdentity
from runtime.certificates.issuance import CertificateAuthority, KeyType


def ext(certificate: x509.Certificate, kind):
    return certificate.extensions.get_extension_for_class(kind)


def assert_is_ca(certificate: x509.Certificate) -> None:
    constraints = ext(certificate, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    usage = ext(certificate, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert certificate.issuer == certificate.subject
    certificate.verify_directly_issued_by(certificate)  # self-signed, and the signature holds
    ski = ext(certificate, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(certificate.public_key())


def assert_is_leaf(certificate: x509.Certificate, ca: x509.Certificate, usage: x509.ObjectIdentifier) -> None:
    constraints = ext(certificate, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    key_usage = ext(certificate, x509.KeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature and not key_usage.value.key_cert_sign
    assert list(ext(certificate, x509.ExtendedKeyUsage).value) == [usage]
    assert certificate.issuer == ca.subject
    certificate.verify_directly_issued_by(ca)
    aki = ext(certificate, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca, x509.SubjectKeyIdentifier).value.digest
    assert ext(certificate, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        certificate.public_key()
    )


SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


def sans(certificate: x509.Certificate, kind) -> list:
    return ext(certificate, x509.SubjectAlternativeName).value.get_values_for_type(kind)


def lifetime_days(certificate: x509.Certificate) -> float:
    return (certificate.not_valid_after_utc - certificate.not_valid_before_utc) / dt.timedelta(days=1)


def days_ago(days: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)


def new_ca(environment: str = "development", **options) -> CertificateAuthority:
    return CertificateAuthority.create(environment, **options)


def client(
    ca: CertificateAuthority, service: str = "api", environment: str = "development", **kw
) -> TLSIdentity:
    return ca.issue_client(environment, service, **kw)


def server(ca: CertificateAuthority, environment: str = "development", **kw) -> TLSIdentity:
    return ca.issue_server(environment, **kw)


FAST_KEY_TYPES = [KeyType.ECDSA_P256, KeyType.RSA_2048]


def rebuild(leaf: TLSIdentity, ca: CertificateAuthority, *, private_key=None, drop: tuple[type, ...] = ()):
    """`leaf` re-signed by `ca`, optionally with another key or without some extensions.

    For certificates our issuance would never make (an RSA-1024 key, no AKI) that a user
    could still bring.
    """
    key = private_key or leaf.private_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.certificate.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(leaf.certificate.not_valid_before_utc)
        .not_valid_after(leaf.certificate.not_valid_after_utc)
    )
    for extension in leaf.certificate.extensions:
        if isinstance(extension.value, drop):
            continue
        value = extension.value
        if isinstance(value, x509.SubjectKeyIdentifier):
            value = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = builder.add_extension(value, extension.critical)
    return TLSIdentity(builder.sign(ca.identity.private_key, hashes.SHA256()), key, "rebuilt")


def crafted_client(
    ca: CertificateAuthority,
    *,
    uris: tuple[str, ...] = (),
    common_name: str = "crafted",
    subject: x509.Name | None = None,
) -> TLSIdentity:
    """A client leaf signed by `ca` with exactly the URI SANs and subject given.

    For what our issuance never makes but another CA (or an attacker holding a CA-signed
    certificate) could: no SPIFFE URI, two of them, an upper-case trust domain, a CN only.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()), critical=False
        )
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return TLSIdentity(builder.sign(ca.identity.private_key, hashes.SHA256()), key, "crafted")


def forged_list(ca: CertificateAuthority, serials) -> x509.CertificateRevocationList:
    """A revocation list that claims to be `ca`'s (its name, its key id) but is signed by another key."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes

    impostor = CertificateAuthority.create("development")
    now = dt.datetime.now(dt.UTC)
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(impostor.identity.private_key, hashes.SHA256())
