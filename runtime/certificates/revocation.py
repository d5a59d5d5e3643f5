"""Revoked certificates: revocation lists our CA signs, and the check a server makes on each connection.

Leaves that live a day are the first revocation: a stolen key is good for hours. `hokusai-mtls certs
revoke` is for those hours. Its record is an RFC 5280 CRL per CA (PEM `X509 CRL`, what `openssl crl
-text` reads) in the `ca-crl` secret (`names.CA_REVOCATIONS_SECRET`). A server takes an entry only from
a list that the CA it names, a CA of its trust bundle, signed: whoever can write the secret but not the
CA key can neither revoke a certificate nor unrevoke one with a list of their own making.

Why not OpenSSL's own CRL check (`VERIFY_CRL_CHECK_LEAF`): it refuses every certificate of a CA that has
no list (both CAs of a rollover bundle would need one, signed by a key the old CA may no longer have),
and it never runs on a resumed TLS session, which brings back a certificate without verifying it. So the
check runs once a connection is up, for full and resumed handshakes alike (`runtime.serving.asgi_tls`),
against the revocations of the context the connection got: a reload swaps certificate, bundle and
revocations together.

An entry is (issuer name, serial). Serials are random 159-bit numbers (`x509.random_serial_number`), so
two CAs that share a name after a rollover never share a serial. A list only grows: `with_revoked` keeps
every earlier entry (an entry whose certificate has expired is harmless; nothing prunes it yet).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from runtime.certificates import pem
from runtime.certificates.inspection import extension
from runtime.certificates.issuance import CertificateAuthority
from runtime.errors import RevocationListError

log = logging.getLogger("hokusai_mtls")

CHECKED_CERTIFICATES_KEPT = 1024
"""Client certificates (DER) whose issuer and serial `Revocations.refuses_der` keeps parsed."""


@dataclass(frozen=True)
class Revocations:
    """The revoked (issuer name, serial) pairs of every verified list; empty: nothing is revoked."""

    entries: frozenset[tuple[bytes, int]] = frozenset()

    @classmethod
    def verified(
        cls, crls: Sequence[x509.CertificateRevocationList], bundle: Sequence[x509.Certificate], source: str
    ) -> Revocations:
        """The entries of `crls`, each list checked to be signed by the CA of `bundle` it names.

        A list naming no CA of the bundle is skipped (the CA was retired by a rollover: its leaves are
        refused as unknown anyway); a list naming one but signed by none is a `RevocationListError`.
        """
        entries: set[tuple[bytes, int]] = set()
        for index, crl in enumerate(crls, start=1):
            signers = [ca for ca in bundle if _names_as_issuer(crl, ca)]
            if not signers:
                log.info(
                    "%s: revocation list #%d of %s skipped: that CA is not in the trust bundle (retired)",
                    source,
                    index,
                    crl.issuer.rfc4514_string(),
                )
                continue
            if not any(_signed_by(crl, ca) for ca in signers):
                raise RevocationListError(
                    f"{source}: revocation list #{index} names {crl.issuer.rfc4514_string()} as its issuer, "
                    "but no CA of that name in the trust bundle signed it"
                )
            issuer = crl.issuer.public_bytes()
            entries.update((issuer, revoked.serial_number) for revoked in crl)
        return cls(frozenset(entries))

    @classmethod
    def from_pem(cls, data: bytes | str, bundle: Sequence[x509.Certificate], source: str) -> Revocations:
        return cls.verified(pem.load_crls(data, source), bundle, source)

    def __len__(self) -> int:
        return len(self.entries)

    def refuses(self, certificate: x509.Certificate) -> bool:
        return (certificate.issuer.public_bytes(), certificate.serial_number) in self.entries

    def refuses_der(self, der: bytes) -> bool:
        """Whether a peer's certificate (the DER OpenSSL verified) is revoked; one that cannot be read is
        refused while anything is revoked (nothing proves it is not)."""
        if not self.entries:
            return False
        key = _issuer_and_serial(der)
        return key is None or key in self.entries


NOTHING_REVOKED = Revocations()
"""The revocations of a set without lists (a client's, or nothing revoked yet)."""


@functools.lru_cache(maxsize=CHECKED_CERTIFICATES_KEPT)
def _issuer_and_serial(der: bytes) -> tuple[bytes, int] | None:
    try:
        certificate = x509.load_der_x509_certificate(der)
        return certificate.issuer.public_bytes(), certificate.serial_number
    except Exception:  # hostile DER: the caller refuses it
        return None


def _names_as_issuer(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    """`crl` says `ca` issued it: its issuer name and, when both carry one, its authority key id (two CAs
    of a rollover may share a name: the retired one's list must not be taken for the new one's)."""
    if crl.issuer != ca.subject:
        return False
    aki, ski = extension(crl, x509.AuthorityKeyIdentifier), extension(ca, x509.SubjectKeyIdentifier)
    return aki is None or aki.key_identifier is None or ski is None or aki.key_identifier == ski.digest


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]  # our CAs: EC or RSA
    except (TypeError, ValueError):  # a key type that cannot sign a list
        return False


def signed_by(crl: x509.CertificateRevocationList, ca: CertificateAuthority) -> bool:
    """Whether `ca` issued `crl` (its name and its signature)."""
    return _names_as_issuer(crl, ca.certificate) and _signed_by(crl, ca.certificate)


def with_revoked(
    ca: CertificateAuthority,
    serials: Iterable[int],
    previous: x509.CertificateRevocationList | None = None,
    now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """`ca`'s next list: every entry of `previous` (its own earlier list) plus `serials`, numbered one up.

    `nextUpdate` is the CA's own end: we re-sign only when something is revoked, and a list of ours is
    never refused for its age (tools that read it, such as `openssl crl`, want the field)."""
    now = now or dt.datetime.now(dt.UTC)
    if previous is not None and not signed_by(previous, ca):
        raise RevocationListError(f"the previous revocation list is not {_label(ca)}'s")
    dates = {revoked.serial_number: revoked.revocation_date_utc for revoked in previous or ()}
    for serial in serials:
        dates.setdefault(serial, now)
    number = _crl_number(previous) if previous is not None else 0
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now)
        .next_update(max(ca.certificate.not_valid_after_utc, now + dt.timedelta(minutes=1)))
        .add_extension(x509.CRLNumber(number + 1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.identity.private_key.public_key()),
            critical=False,
        )
    )
    for serial, when in sorted(dates.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca.identity.private_key, hashes.SHA256())


def replace_list(
    crls: Sequence[x509.CertificateRevocationList], ca: CertificateAuthority, serials: Iterable[int], now=None
) -> list[x509.CertificateRevocationList]:
    """`crls` with `ca`'s list replaced by its next one (`with_revoked`); the other CAs' lists kept."""
    own = [crl for crl in crls if signed_by(crl, ca)]
    others = [crl for crl in crls if crl not in own]
    latest = max(own, key=_crl_number, default=None)
    return [*others, with_revoked(ca, serials, latest, now)]


def of_bundle(
    crls: Sequence[x509.CertificateRevocationList], bundle: Sequence[x509.Certificate]
) -> tuple[list[x509.CertificateRevocationList], list[x509.CertificateRevocationList]]:
    """(the lists of CAs in `bundle`, those of CAs no longer in it): `certs revoke` drops the second."""
    kept = [crl for crl in crls if any(_names_as_issuer(crl, ca) for ca in bundle)]
    return kept, [crl for crl in crls if crl not in kept]


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    """The list's CRLNumber (RFC 5280 5.2.3), 0 if it has none."""
    number = extension(crl, x509.CRLNumber)
    return number.crl_number if number else 0


def _label(ca: CertificateAuthority) -> str:
    return ca.certificate.subject.rfc4514_string()


__all__ = [
    "NOTHING_REVOKED",
    "Revocations",
    "of_bundle",
    "replace_list",
    "signed_by",
    "with_revoked",
]
