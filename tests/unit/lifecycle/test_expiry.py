"""The scheduled expiry check against moto's Secrets Manager and CloudWatch."""

from __future__ import annotations

import datetime as dt
import logging

import boto3
import pytest

from runtime import names
from runtime.certificates.certset import CertificateSet
from runtime.certificates.inspection import days_left
from runtime.certificates.issuance import CertificateAuthority
from runtime.lifecycle import CA_IDENTITY, expiry
from tests.conftest import REGION
from tests.support.lifecycle import ENVIRONMENT, create_shells, store

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
"""The issuing clock: an hour ago, so `upload()` (which verifies with the real clock) accepts the set."""
LEAF_DAYS = {"server": 90, "api": 45, "worker": 10}
CA_DAYS = 365


@pytest.fixture
def cloudwatch(secretsmanager):
    return boto3.client("cloudwatch", region_name=REGION)


@pytest.fixture
def known_set(secretsmanager) -> CertificateSet:
    """Certificates issued at NOW with known lifetimes, uploaded into the CDK's shells."""
    create_shells(secretsmanager)
    ca = CertificateAuthority.create(ENVIRONMENT, lifetime_days=CA_DAYS, now=NOW)
    certificates = CertificateSet(ENVIRONMENT, [ca.certificate], {}, ca)
    for identity in names.IDENTITIES:
        certificates.identities[identity.name] = ca.issue(
            ENVIRONMENT, identity, lifetime_hours=LEAF_DAYS[identity.name] * 24, now=NOW
        )
    store(secretsmanager).upload(certificates)
    return certificates


def published(cloudwatch, metric: str, identity: str) -> list[float]:
    """The maximum of each value published for (environment, identity) in the last hour."""
    end = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    points = cloudwatch.get_metric_statistics(
        Namespace=names.METRIC_NAMESPACE,
        MetricName=metric,
        Dimensions=[
            {"Name": names.DIM_ENVIRONMENT, "Value": ENVIRONMENT},
            {"Name": names.DIM_IDENTITY, "Value": identity},
        ],
        StartTime=end - dt.timedelta(hours=1),
        EndTime=end,
        Period=3600,
        Statistics=["Maximum"],
    )["Datapoints"]
    return [p["Maximum"] for p in points]


def test_days_to_expiry_are_published_for_every_identity_and_the_ca(secretsmanager, cloudwatch, known_set):
    later = NOW + dt.timedelta(days=3, hours=1)
    report = expiry.handler(
        {"environment": ENVIRONMENT}, None, secrets=secretsmanager, cloudwatch=cloudwatch, now=later
    )

    # 3 days and an hour into a lifetime of N days: N - 4 whole days and 23 hours are left
    expected = {"server": 86, "api": 41, "worker": 6, CA_IDENTITY: CA_DAYS - 4}
    hours = {identity: days * 24 - 73 for identity, days in {**LEAF_DAYS, CA_IDENTITY: CA_DAYS}.items()}
    assert report == {
        "environment": ENVIRONMENT,
        "days_to_expiry": expected,
        "hours_to_expiry": hours,
        "failures": [],
    }
    for identity, days in expected.items():
        assert published(cloudwatch, names.METRIC_CERT_DAYS_TO_EXPIRY, identity) == [days]
        assert published(cloudwatch, names.METRIC_CERT_HOURS_TO_EXPIRY, identity) == [hours[identity]]
        assert published(cloudwatch, names.METRIC_CERT_CHECK_FAILURES, identity) == [0]


def test_a_day_leaf_reports_its_hours_to_a_hundredth(secretsmanager, cloudwatch, known_set):
    """24-hour leaves: the alarms compare hours left with shares of the lifetime, so days (0) say nothing."""
    ca = known_set.ca
    known_set.identities["api"] = ca.issue(ENVIRONMENT, names.API, lifetime_hours=24, now=NOW)
    store(secretsmanager).upload(known_set)
    later = NOW + dt.timedelta(hours=17, minutes=30, seconds=36)  # 6 h 29 min 24 s left: 6.49 hours
    report = expiry.check(ENVIRONMENT, secrets=secretsmanager, cloudwatch=cloudwatch, now=later)
    assert (report.days_to_expiry["api"], report.hours_to_expiry["api"]) == (0, 6.49)
    assert published(cloudwatch, names.METRIC_CERT_HOURS_TO_EXPIRY, "api") == [6.49]


def test_days_round_down_and_go_negative_after_expiry(known_set):
    worker = known_set.identities["worker"].certificate
    assert days_left(worker, worker.not_valid_after_utc - dt.timedelta(seconds=1)) == 0
    assert days_left(worker, worker.not_valid_after_utc + dt.timedelta(hours=1)) == -1


def test_an_expired_certificate_reports_its_days_and_a_failure(secretsmanager, cloudwatch, known_set):
    after_worker = NOW + dt.timedelta(days=LEAF_DAYS["worker"] + 2)
    report = expiry.check(ENVIRONMENT, secrets=secretsmanager, cloudwatch=cloudwatch, now=after_worker)
    assert report.days_to_expiry["worker"] == -2
    assert [(f["identity"], f["code"]) for f in report.failures] == [("worker", "certificate-expired")]
    assert published(cloudwatch, names.METRIC_CERT_CHECK_FAILURES, "worker") == [1]


def test_malformed_and_missing_secrets_are_failures_not_gaps(secretsmanager, cloudwatch, known_set, caplog):
    api = names.identity_secret_name(ENVIRONMENT, names.API)
    secretsmanager.put_secret_value(SecretId=api, SecretString='{"schema": 1, "certificate": "junk"}')
    worker = names.identity_secret_name(ENVIRONMENT, names.WORKER)
    secretsmanager.delete_secret(SecretId=worker, ForceDeleteWithoutRecovery=True)
    leaked = known_set.identities["server"].private_key_pem().decode()

    with caplog.at_level(logging.ERROR, logger="hokusai_mtls"):
        report = expiry.check(ENVIRONMENT, secrets=secretsmanager, cloudwatch=cloudwatch, now=NOW)

    failures = {f["identity"]: f for f in report.failures}
    assert set(failures) == {"api", "worker"}
    assert failures["api"]["secret"] == api and failures["api"]["code"] == "secret-content-invalid"
    assert failures["worker"]["code"] == "secret-not-found"
    assert set(report.days_to_expiry) == {"server", CA_IDENTITY}  # the others still checked
    for identity in ("api", "worker"):
        assert published(cloudwatch, names.METRIC_CERT_CHECK_FAILURES, identity) == [1]
        assert published(cloudwatch, names.METRIC_CERT_DAYS_TO_EXPIRY, identity) == []
    assert published(cloudwatch, names.METRIC_CERT_CHECK_FAILURES, "server") == [0]
    assert api in caplog.text and "junk" not in caplog.text and leaked not in caplog.text


def test_an_unreadable_bundle_is_a_ca_failure_and_identities_are_still_parsed(
    secretsmanager, cloudwatch, known_set
):
    bundle = names.secret_name(ENVIRONMENT, names.CA_BUNDLE_SECRET)
    secretsmanager.put_secret_value(SecretId=bundle, SecretString="not a PEM bundle")
    report = expiry.check(ENVIRONMENT, secrets=secretsmanager, cloudwatch=cloudwatch, now=NOW)
    assert [f["identity"] for f in report.failures] == [CA_IDENTITY]
    assert set(report.days_to_expiry) == {i.name for i in names.IDENTITIES}
    assert published(cloudwatch, names.METRIC_CERT_CHECK_FAILURES, CA_IDENTITY) == [1]


def test_an_identity_from_a_ca_outside_the_bundle_is_a_failure(secretsmanager, cloudwatch, known_set):
    foreign = CertificateAuthority.create(ENVIRONMENT, now=NOW).issue(ENVIRONMENT, names.API, now=NOW)
    secretsmanager.put_secret_value(
        SecretId=names.identity_secret_name(ENVIRONMENT, names.API), SecretString=foreign.to_secret_string()
    )
    report = expiry.check(ENVIRONMENT, secrets=secretsmanager, cloudwatch=cloudwatch, now=NOW)
    assert [(f["identity"], f["code"]) for f in report.failures] == [("api", "untrusted-issuer")]


def test_the_environment_comes_from_the_variable_and_must_be_known(secretsmanager, cloudwatch, monkeypatch):
    monkeypatch.setenv(names.ENV_ENVIRONMENT, "../production")
    with pytest.raises(ValueError, match="is not a valid name"):
        expiry.handler({}, None, secrets=secretsmanager, cloudwatch=cloudwatch)
