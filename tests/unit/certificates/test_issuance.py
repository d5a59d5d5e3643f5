"""Issuance: what the CA and each leaf carry, for each key type, and the lifetimes."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from runtime import names
from runtime.certificates.inspection import uris
from runtime.certificates.issuance import CertificateAuthority, KeyType
from runtime.errors import LifetimeError, NotACertificateAuthorityError
from tests.support.certs import (
    CLIENT_AUTH,
    FAST_KEY_TYPES,
    SERVER_AUTH,
    assert_is_ca,
    assert_is_leaf,
    days_ago,
    lifetime_days,
    new_ca,
    sans,
)


@pytest.mark.parametrize("key_type", FAST_KEY_TYPES, ids=lambda k: k.value)
def test_ca_is_a_path_length_zero_signing_ca(key_type):
    ca = new_ca("staging", key_type=key_type)
    assert_is_ca(ca.certificate)
    assert "staging" in ca.certificate.subject.rfc4514_string()


@pytest.mark.parametrize("key_type", FAST_KEY_TYPES, ids=lambda k: k.value)
def test_server_certificate_names_the_cloud_map_host_and_extra_sans(key_type):
    ca = new_ca("production", key_type=key_type)
    leaf = ca.issue_server("production", extra_sans=("localhost", "127.0.0.1"), key_type=key_type)
    assert_is_leaf(leaf.certificate, ca.certificate, SERVER_AUTH)
    assert sans(leaf.certificate, x509.DNSName) == ["mlflow.hokusai-production.local", "localhost"]
    assert sans(leaf.certificate, x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


@pytest.mark.parametrize("service", ["api", "worker"])
def test_client_certificate_carries_exactly_one_spiffe_uri(service):
    ca = new_ca()
    leaf = ca.issue_client("development", service)
    assert_is_leaf(leaf.certificate, ca.certificate, CLIENT_AUTH)
    assert sans(leaf.certificate, x509.UniformResourceIdentifier) == [
        f"spiffe://hokusai/development/{service}"
    ]
    assert sans(leaf.certificate, x509.DNSName) == []
    assert leaf.certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == service


def test_default_key_is_ecdsa_p256_and_rsa_is_selectable():
    ca = new_ca()
    assert isinstance(ca.issue_client("development", "api").private_key, ec.EllipticCurvePrivateKey)
    assert ca.issue_client("development", "api").private_key.curve.name == "secp256r1"
    rsa_leaf = ca.issue_client("development", "api", key_type=KeyType.RSA_2048)
    assert isinstance(rsa_leaf.private_key, rsa.RSAPrivateKey) and rsa_leaf.private_key.key_size == 2048
    usage = rsa_leaf.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_encipherment  # RSA key exchange needs it; ECDSA leaves do not carry it


def test_serials_are_random_and_distinct():
    ca = new_ca()
    serials = {ca.issue_client("development", "api").certificate.serial_number for _ in range(20)}
    assert len(serials) == 20
    assert all(s.bit_length() > 100 for s in serials)


@pytest.mark.parametrize(
    ("environment", "hours"), [("development", 365 * 24), ("staging", 24), ("production", 24), ("qa", 24)]
)
def test_leaves_live_a_day_by_default_and_a_year_in_development(environment, hours):
    ca = new_ca(environment)
    leaf = ca.issue_client(environment, "api")
    life = leaf.certificate.not_valid_after_utc - leaf.certificate.not_valid_before_utc
    assert life == dt.timedelta(hours=hours, minutes=5)  # + the 5 minutes of back-dating


def test_leaf_not_before_is_back_dated_for_clock_skew():
    ca = new_ca()
    before = dt.datetime.now(dt.UTC)
    leaf = ca.issue_client("development", "api")
    assert before - dt.timedelta(minutes=6) < leaf.certificate.not_valid_before_utc < before


def test_lifetimes_are_configurable_and_the_ca_outlives_its_leaves():
    ca = new_ca("production", lifetime_days=400)
    leaf = ca.issue_server("production", lifetime_hours=30 * 24)
    assert lifetime_days(leaf.certificate) == pytest.approx(30, abs=0.01)
    assert ca.certificate.not_valid_after_utc > leaf.certificate.not_valid_after_utc
    minutes = ca.issue_client("production", "api", lifetime_hours=0.05)  # compressed-time tests: 3 minutes
    life = minutes.certificate.not_valid_after_utc - minutes.certificate.not_valid_before_utc
    assert life == dt.timedelta(minutes=3 + 5)
    with pytest.raises(LifetimeError, match="outlive its CA"):
        ca.issue_server("production", lifetime_hours=401 * 24)


@pytest.mark.parametrize("hours", [0, -1, 0.01, float("nan"), float("inf"), True, "24", 1e12, 876_001])
def test_a_leaf_lifetime_below_a_minute_or_not_a_number_is_refused(hours):
    with pytest.raises(LifetimeError, match="at least one minute"):
        new_ca().issue_client("development", "api", lifetime_hours=hours)


@pytest.mark.parametrize("days", [0, -1])
def test_non_positive_lifetimes_are_refused(days):
    with pytest.raises(LifetimeError, match="positive"):
        new_ca(lifetime_days=days)


@pytest.mark.parametrize("days", [36_501, 10**9])
def test_a_ca_lifetime_past_the_date_arithmetic_is_a_named_error_not_an_overflow(days):
    with pytest.raises(LifetimeError, match="at most 36500"):
        new_ca(lifetime_days=days)


def test_an_invalid_environment_name_is_refused_by_name():
    with pytest.raises(ValueError, match="'QA/1' is not a valid name"):
        new_ca("QA/1")


def test_a_declared_environment_of_any_valid_name_gets_its_own_ca_and_leaves():
    ca = new_ca("sandbox-alice")
    leaf = ca.issue("sandbox-alice", names.WORKER)
    assert uris(leaf.certificate) == ["spiffe://hokusai/sandbox-alice/worker"]
    life = leaf.certificate.not_valid_after_utc - leaf.certificate.not_valid_before_utc
    assert life == dt.timedelta(hours=24, minutes=5)  # not development: a day


def test_issue_dispatches_by_identity_kind():
    ca = new_ca()
    assert_is_leaf(ca.issue("development", names.SERVER).certificate, ca.certificate, SERVER_AUTH)
    assert_is_leaf(ca.issue("development", names.WORKER).certificate, ca.certificate, CLIENT_AUTH)


def test_a_leaf_cannot_act_as_a_ca():
    ca = new_ca()
    leaf = ca.issue_client("development", "api")
    with pytest.raises(NotACertificateAuthorityError, match="not a CA"):
        CertificateAuthority(leaf)


def test_from_pem_round_trip_issues_leaves_the_original_verifies():
    ca = new_ca()
    again = CertificateAuthority.from_pem(ca.identity.certificate_pem(), ca.identity.private_key_pem())
    leaf = again.issue_client("development", "api", now=days_ago(1))
    leaf.certificate.verify_directly_issued_by(ca.certificate)
