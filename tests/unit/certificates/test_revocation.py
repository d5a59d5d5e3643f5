"""Revocation lists: what `certs revoke` signs and what a server takes from them.

A server must take an entry only from a list that the CA it names signed, keep every earlier entry
when the list grows, skip the list of a CA no longer trusted, and refuse a forged or corrupt one by
name; a peer certificate is refused exactly when its (issuer, serial) is listed.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from runtime import names
from runtime.certificates import pem
from runtime.certificates.issuance import CertificateAuthority
from runtime.certificates.revocation import Revocations, replace_list, signed_by, with_revoked
from runtime.errors import PemError, RevocationListError, WrongPemTypeError
from tests.support.certs import forged_list

ENV = "staging"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(ENV)


@pytest.fixture(scope="module")
def leaves(ca):
    return [ca.issue(ENV, names.API), ca.issue(ENV, names.WORKER)]


def der(tls) -> bytes:
    return tls.certificate.public_bytes(Encoding.DER)


def test_a_revoked_leaf_is_refused_and_its_sibling_is_not(ca, leaves):
    api, worker = leaves
    crl = with_revoked(ca, [api.certificate.serial_number])
    revocations = Revocations.verified([crl], [ca.certificate], "test")
    assert revocations.refuses(api.certificate) and revocations.refuses_der(der(api))
    assert not revocations.refuses(worker.certificate) and not revocations.refuses_der(der(worker))
    assert len(revocations) == 1


def test_nothing_revoked_refuses_nothing_not_even_unreadable_der(ca):
    assert not Revocations().refuses_der(b"not a certificate")
    listed = Revocations.verified([with_revoked(ca, [1])], [ca.certificate], "test")
    assert listed.refuses_der(b"not a certificate")  # with entries, what cannot be read is refused


def test_the_next_list_keeps_every_entry_and_counts_up(ca, leaves):
    api, worker = leaves
    first = with_revoked(ca, [api.certificate.serial_number])
    second = with_revoked(ca, [worker.certificate.serial_number], first)
    assert {r.serial_number for r in second} == {
        api.certificate.serial_number,
        worker.certificate.serial_number,
    }
    date = first.get_revoked_certificate_by_serial_number(api.certificate.serial_number).revocation_date_utc
    kept = second.get_revoked_certificate_by_serial_number(api.certificate.serial_number).revocation_date_utc
    assert kept == date  # an entry keeps the day it was revoked
    numbers = [
        crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for crl in (first, second)
    ]
    assert numbers == [1, 2]
    assert second.next_update_utc == ca.certificate.not_valid_after_utc
    assert signed_by(second, ca)


def test_a_list_signed_by_another_key_under_our_name_is_refused(ca):
    forged = forged_list(ca, [12345])  # our CA's name and key id, another key's signature
    with pytest.raises(RevocationListError, match="no CA of that name in the trust bundle signed it"):
        Revocations.verified([forged], [ca.certificate], "ca-crl")


def test_a_list_of_a_ca_no_longer_trusted_is_skipped(ca):
    retired = CertificateAuthority.create(ENV, common_name="Hokusai MLflow CA staging (retired)")
    revocations = Revocations.verified([with_revoked(retired, [7])], [ca.certificate], "ca-crl")
    assert len(revocations) == 0


def test_replacing_keeps_the_other_cas_lists(ca):
    other = CertificateAuthority.create(ENV, common_name="Hokusai MLflow CA staging (next)")
    theirs, ours = with_revoked(other, [5]), with_revoked(ca, [6])
    result = replace_list([theirs, ours], ca, [8])
    assert result[0] == theirs
    assert {r.serial_number for r in result[1]} == {6, 8}
    both = Revocations.verified(result, [ca.certificate, other.certificate], "ca-crl")
    assert len(both) == 3


def test_a_previous_list_of_another_ca_cannot_be_extended(ca):
    other = CertificateAuthority.create(ENV, common_name="someone else")
    with pytest.raises(RevocationListError, match="is not"):
        with_revoked(ca, [1], with_revoked(other, [2]))


def test_pem_round_trip_and_empty_text(ca):
    crls = [with_revoked(ca, [1, 2])]
    assert [
        c.fingerprint(crls[0].signature_hash_algorithm) for c in pem.load_crls(pem.crls_pem(crls), "f")
    ] == [crls[0].fingerprint(crls[0].signature_hash_algorithm)]
    assert pem.load_crls("", "ca-crl") == [] and pem.load_crls(b"\n", "ca-crl") == []


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
            PemError,
            "revocation list #1 is corrupt",
        ),
        ("-----BEGIN X509 CRL-----\nAAAA\n", PemError, "truncated PEM"),
        ("hello", PemError, "not PEM"),
    ],
)
def test_bad_lists_are_named(text, error, message):
    with pytest.raises(error, match=message) as caught:
        pem.load_crls(text, "hokusai/staging/mlflow/ca-crl")
    assert "hokusai/staging/mlflow/ca-crl" in str(caught.value)


def test_a_certificate_where_a_list_belongs_is_named(ca):
    with pytest.raises(WrongPemTypeError, match="found CERTIFICATE"):
        pem.load_crls(pem.certificate_pem(ca.certificate), "ca-crl")


def test_entries_survive_the_dates_of_the_list(ca, leaves):
    """A list is never refused for its age: ours are re-signed only when something is revoked."""
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    crl = with_revoked(ca, [leaves[0].certificate.serial_number], now=long_ago)
    assert Revocations.verified([crl], [ca.certificate], "ca-crl").refuses(leaves[0].certificate)


def test_the_retired_cas_list_is_skipped_even_when_its_successor_shares_its_name(ca):
    """A rollover's new CA may carry the old one's name: the old list (its key id) is not the new CA's,
    so it is skipped, not refused (refusing would stop every server's refresh after `finish`)."""
    successor = CertificateAuthority.create(ENV)  # the same subject name, another key
    assert successor.certificate.subject == ca.certificate.subject
    old_list = with_revoked(ca, [42])
    assert len(Revocations.verified([old_list], [successor.certificate], "ca-crl")) == 0
    assert not signed_by(old_list, successor)
