"""Check that a certificate will work for its role before anyone relies on it.

Each check raises its own error (see `runtime.errors`) naming the certificate and
what is wrong, in the order an operator would look: right key? right CA? in date?
right usage? right name? Only then does `cryptography.x509.verification` run the
full RFC 5280 path validation, so a certificate that passes here also passes the
TLS stacks that will use it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification as rfc5280

from runtime.certificates.identity import TLSIdentity
from runtime.certificates.inspection import (
    dns_names,
    extended_key_usages,
    extension,
    ip_addresses,
    is_ca,
    uris,
)
from runtime.errors import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    ChainVerificationError,
    HostnameMismatchError,
    IdentityMismatchError,
    NotACertificateAuthorityError,
    UntrustedCertificateError,
    WeakKeyError,
    WrongUsageError,
)
from runtime.names import Kind

_REQUIRED_USAGES = {
    Kind.SERVER: ("serverAuth",),
    Kind.CLIENT: ("clientAuth",),
    Kind.BOTH: ("serverAuth", "clientAuth"),
}
MIN_RSA_BITS = 2048
ALLOWED_CURVES = frozenset({"secp256r1", "secp384r1"})


def _subject(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string()


def check_trust_bundle(bundle: Sequence[x509.Certificate], source: str) -> None:
    """A trust bundle holds CA certificates only, and at least one."""
    if not bundle:
        raise NotACertificateAuthorityError(f"{source}: the trust bundle holds no certificate")
    for certificate in bundle:
        usage = extension(certificate, x509.KeyUsage)
        if not is_ca(certificate) or (usage is not None and not usage.key_cert_sign):
            raise NotACertificateAuthorityError(
                f"{source}: {_subject(certificate)} in the trust bundle is not a CA certificate"
            )


def check_key_strength(certificate: x509.Certificate, source: str) -> None:
    """Refuse keys that OpenSSL (and so uvicorn and requests) would refuse at the handshake."""
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise WeakKeyError(
            f"{source}: {_subject(certificate)} has an RSA-{key.key_size} key; at least {MIN_RSA_BITS}"
        )
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in ALLOWED_CURVES:
        raise WeakKeyError(
            f"{source}: {_subject(certificate)} uses curve {key.curve.name}; use P-256 or P-384"
        )
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise WeakKeyError(f"{source}: {_subject(certificate)} has an unsupported {type(key).__name__}")


def check_validity(certificate: x509.Certificate, source: str, now: dt.datetime) -> None:
    if now < certificate.not_valid_before_utc:
        raise CertificateNotYetValidError(
            f"{source}: {_subject(certificate)} is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC (check the clock)"
        )
    if now > certificate.not_valid_after_utc:
        raise CertificateExpiredError(
            f"{source}: {_subject(certificate)} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )


def find_issuer(
    certificate: x509.Certificate, bundle: Sequence[x509.Certificate], source: str
) -> x509.Certificate:
    """The CA of `bundle` whose key signed `certificate`."""
    for candidate in bundle:
        try:
            certificate.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    aki = extension(certificate, x509.AuthorityKeyIdentifier)
    issuer_key = f" key id {aki.key_identifier.hex()[:16]}" if aki and aki.key_identifier else ""
    raise UntrustedCertificateError(
        f"{source}: {_subject(certificate)} was issued by {certificate.issuer.rfc4514_string()}{issuer_key}, "
        f"which is not in the trust bundle ({'; '.join(_ca_label(c) for c in bundle) or 'empty'})"
    )


def _ca_label(certificate: x509.Certificate) -> str:
    """Subject plus key id: after a rollover two CAs may share a subject name."""
    ski = extension(certificate, x509.SubjectKeyIdentifier)
    return f"{_subject(certificate)} key id {ski.digest.hex()[:16]}" if ski else _subject(certificate)


def hostname_matches(certificate: x509.Certificate, hostname: str) -> bool:
    """RFC 6125: IP SANs for addresses, DNS SANs (wildcard = one left-most label) for names."""
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        address = None
    if address is not None:
        return str(address) in ip_addresses(certificate)
    wanted = hostname.lower().rstrip(".").split(".")
    for pattern in dns_names(certificate):
        labels = pattern.lower().rstrip(".").split(".")
        if len(labels) == len(wanted) and all(
            p == w or (i == 0 and p == "*") for i, (p, w) in enumerate(zip(labels, wanted, strict=True))
        ):
            return True
    return False


def verify_identity(
    identity: TLSIdentity,
    bundle: Sequence[x509.Certificate],
    *,
    kind: Kind,
    hostname: str | None = None,
    spiffe_id: str | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Verify a leaf and its key for `kind`; return the CA that issued it.

    `hostname` (servers) is the name clients dial; `spiffe_id` (clients) the URI SAN
    the certificate must carry for the identity it is stored under. (That the key belongs
    to the certificate, `TLSIdentity` checked when it was made.)
    """
    return verify_certificate(
        identity.certificate,
        bundle,
        kind=kind,
        hostname=hostname,
        spiffe_id=spiffe_id,
        now=now,
        source=identity.source,
    )


def verify_certificate(
    certificate: x509.Certificate,
    bundle: Sequence[x509.Certificate],
    *,
    kind: Kind,
    hostname: str | None = None,
    spiffe_id: str | None = None,
    now: dt.datetime | None = None,
    source: str = "certificate",
) -> x509.Certificate:
    """`verify_identity` without the key: for a certificate someone else holds the key of."""
    now = now or dt.datetime.now(dt.UTC)
    check_trust_bundle(bundle, f"{source} trust bundle")
    issuer = find_issuer(certificate, bundle, source)
    check_validity(issuer, f"{source} issuing CA", now)
    check_validity(certificate, source, now)
    check_key_strength(issuer, f"{source} issuing CA")
    check_key_strength(certificate, source)
    if is_ca(certificate):
        raise WrongUsageError(
            f"{source}: {_subject(certificate)} is a CA certificate, not a {kind.value} leaf"
        )
    usages = extended_key_usages(certificate)
    if missing := [usage for usage in _REQUIRED_USAGES[kind] if usage not in usages]:
        raise WrongUsageError(
            f"{source}: {_subject(certificate)} has extended key usage {', '.join(usages) or 'none'}; "
            f"a {kind.value} certificate needs {', '.join(_REQUIRED_USAGES[kind])} (lacks {', '.join(missing)})"
        )
    if hostname is not None and not hostname_matches(certificate, hostname):
        raise HostnameMismatchError(
            f"{source}: {_subject(certificate)} is not valid for {hostname!r} "
            f"(DNS SANs: {', '.join(dns_names(certificate)) or 'none'}; IP SANs: "
            f"{', '.join(ip_addresses(certificate)) or 'none'})"
        )
    if spiffe_id is not None and uris(certificate) != [spiffe_id]:
        raise IdentityMismatchError(
            f"{source}: {_subject(certificate)} has URI SAN(s) {', '.join(uris(certificate)) or 'none'}; "
            f"expected exactly {spiffe_id}"
        )
    _verify_path(certificate, bundle, kind, hostname, source, now)
    return issuer


def _verify_path(
    certificate: x509.Certificate,
    bundle: Sequence[x509.Certificate],
    kind: Kind,
    hostname: str | None,
    source: str,
    now: dt.datetime,
) -> None:
    builder = rfc5280.PolicyBuilder().store(rfc5280.Store(list(bundle))).time(now)
    try:
        if kind in (Kind.CLIENT, Kind.BOTH):
            builder.build_client_verifier().verify(certificate, [])
        if kind is Kind.CLIENT:
            return
        name = hostname or (dns_names(certificate) or ip_addresses(certificate) or [""])[0]
        subject: rfc5280.Subject
        try:
            subject = rfc5280.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            subject = rfc5280.DNSName(name)
        builder.build_server_verifier(subject).verify(certificate, [])
    except (rfc5280.VerificationError, ValueError) as exc:
        raise ChainVerificationError(f"{source}: {_subject(certificate)}: {exc}") from exc
