"""Verification: each way a certificate can be wrong raises its own named error."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from runtime import names
from runtime.certificates.certset import CertificateSet, verify_for
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.verification import hostname_matches, verify_identity
from runtime.errors import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    CertificateSetError,
    ChainVerificationError,
    HostnameMismatchError,
    IdentityMismatchError,
    KeyMismatchError,
    NotACertificateAuthorityError,
    UntrustedCertificateError,
    WeakKeyError,
    WrongUsageError,
)
from tests.support.certs import FAST_KEY_TYPES, client, days_ago, new_ca, rebuild, server

SERVER, CLIENT = names.Kind.SERVER, names.Kind.CLIENT
HOST = "mlflow.hokusai-development.local"


@pytest.fixture
def ca():
    return new_ca()


@pytest.mark.parametrize("key_type", FAST_KEY_TYPES, ids=lambda k: k.value)
def test_fresh_identities_verify_for_their_role(key_type):
    ca = new_ca(key_type=key_type)
    assert (
        verify_identity(server(ca, key_type=key_type), [ca.certificate], kind=SERVER, hostname=HOST)
        == ca.certificate
    )
    api = client(ca, key_type=key_type)
    assert verify_identity(api, [ca.certificate], kind=CLIENT, spiffe_id="spiffe://hokusai/development/api")


def test_expired(ca):
    old = client(ca, lifetime_hours=10 * 24, now=days_ago(11))
    with pytest.raises(CertificateExpiredError, match=r"CN=api.*expired on"):
        verify_identity(old, [ca.certificate], kind=CLIENT)


def test_not_yet_valid(ca):
    future = client(ca, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    with pytest.raises(CertificateNotYetValidError, match="not valid before"):
        verify_identity(future, [ca.certificate], kind=CLIENT)


def test_expired_issuing_ca_is_named_as_the_ca():
    ca = new_ca(lifetime_days=20, now=days_ago(30))
    leaf = client(ca, lifetime_hours=10 * 24, now=days_ago(25))
    with pytest.raises(CertificateExpiredError, match="issuing CA"):
        verify_identity(leaf, [ca.certificate], kind=CLIENT)


def test_wrong_ca(ca):
    foreign = new_ca()
    with pytest.raises(UntrustedCertificateError, match="not in the trust bundle"):
        verify_identity(client(foreign), [ca.certificate], kind=CLIENT)


def test_a_rollover_bundle_trusts_leaves_of_both_cas(ca):
    successor = new_ca()
    bundle = [ca.certificate, successor.certificate]
    assert verify_identity(client(ca), bundle, kind=CLIENT) == ca.certificate
    assert verify_identity(client(successor), bundle, kind=CLIENT) == successor.certificate


def test_key_of_another_certificate(ca):
    mine, other = client(ca), client(ca, "worker")
    with pytest.raises(KeyMismatchError, match="does not belong"):
        TLSIdentity(mine.certificate, other.private_key, "api")


def test_client_certificate_used_as_server(ca):
    with pytest.raises(WrongUsageError, match="needs serverAuth"):
        verify_identity(client(ca), [ca.certificate], kind=SERVER, hostname=HOST)


def test_server_certificate_used_as_client(ca):
    with pytest.raises(WrongUsageError, match="needs clientAuth"):
        verify_identity(server(ca), [ca.certificate], kind=CLIENT)


def test_ca_certificate_used_as_leaf(ca):
    with pytest.raises(WrongUsageError, match="is a CA certificate"):
        verify_identity(ca.identity, [ca.certificate], kind=SERVER, hostname=HOST)


def test_wrong_hostname(ca):
    with pytest.raises(HostnameMismatchError, match="not valid for 'mlflow.hokusai-production.local'"):
        verify_identity(server(ca), [ca.certificate], kind=SERVER, hostname="mlflow.hokusai-production.local")


def test_ip_address_hostname_needs_an_ip_san(ca):
    with_ip = server(ca, extra_sans=("127.0.0.1",))
    assert verify_identity(with_ip, [ca.certificate], kind=SERVER, hostname="127.0.0.1")
    with pytest.raises(HostnameMismatchError):
        verify_identity(server(ca), [ca.certificate], kind=SERVER, hostname="127.0.0.1")


def test_certificate_of_another_service(ca):
    with pytest.raises(IdentityMismatchError, match="expected exactly spiffe://hokusai/development/api"):
        verify_for(names.API, client(ca, "worker"), [ca.certificate], "development")


def test_the_ca_of_another_environment_is_refused_by_the_one_verification():
    """The loader, `certs verify --dir` and `certs upload` all verify through `verify_for`."""
    ca = new_ca("staging")
    staging_api = ca.issue_client("staging", "api")
    with pytest.raises(CertificateSetError, match="belongs to staging, not production"):
        verify_for(names.API, staging_api, [ca.certificate], "production")


def test_a_development_ca_in_productions_bundle_is_refused_next_to_its_leaf():
    development = new_ca("development")
    production = new_ca("production")
    leaf = development.issue_client("production", "api")  # production's SPIFFE ID, development's CA
    with pytest.raises(CertificateSetError, match="belongs to development, not production"):
        verify_for(names.API, leaf, [production.certificate, development.certificate], "production")


def test_a_leaf_naming_another_environment_is_refused_by_its_spiffe_id():
    """The right environment's CA, but the leaf names another environment's identity."""
    ca = new_ca("production")
    staging_api = ca.issue_client("staging", "api")
    with pytest.raises(IdentityMismatchError):
        verify_for(names.API, staging_api, [ca.certificate], "production")


def test_a_leaf_in_the_trust_bundle_is_refused(ca):
    leaf = client(ca)
    with pytest.raises(NotACertificateAuthorityError, match="not a CA certificate"):
        verify_identity(leaf, [ca.certificate, leaf.certificate], kind=CLIENT)


def test_rfc5280_path_validation_catches_what_the_named_checks_do_not(ca):
    """A leaf without an authority key identifier passes our checks but not RFC 5280 validation."""
    no_aki = rebuild(client(ca), ca, drop=(x509.AuthorityKeyIdentifier,))
    with pytest.raises(ChainVerificationError):
        verify_identity(no_aki, [ca.certificate], kind=CLIENT)


def test_a_key_openssl_would_refuse_is_named(ca):
    small = rebuild(
        client(ca),
        ca,
        private_key=rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 - the point
    )
    with pytest.raises(WeakKeyError, match="RSA-1024 key; at least 2048"):
        verify_identity(small, [ca.certificate], kind=CLIENT)


def test_a_ca_issued_for_another_environment_is_refused():
    staging_ca = new_ca("staging")
    with pytest.raises(CertificateSetError, match="belongs to staging, not development"):
        CertificateSet.issue("development", ca=staging_ca)
    mixed = CertificateSet.issue("staging", ca=staging_ca)
    mixed.environment = "development"
    with pytest.raises(CertificateSetError, match="belongs to staging"):
        mixed.verify()


@pytest.mark.parametrize(
    ("pattern", "hostname", "expected"),
    [
        ("mlflow.hokusai-development.local", "MLFLOW.hokusai-development.local.", True),
        ("*.hokusai-development.local", "other.hokusai-development.local", True),
        ("*.hokusai-development.local", "a.b.hokusai-development.local", False),
        ("*.local", "hokusai-development.local", True),
        ("mlflow.*.local", "mlflow.x.local", False),
        ("mlflow.hokusai-development.local", "mlflow.hokusai-development.local.evil", False),
    ],
)
def test_hostname_matching_follows_rfc_6125(pattern, hostname, expected):
    ca = new_ca()
    leaf = ca.issue_server("development", extra_sans=(pattern,))
    assert hostname_matches(leaf.certificate, hostname) is expected
