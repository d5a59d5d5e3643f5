"""First issuance (the custom resource) against moto: fills empty shells, then never replaces."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet, verify_for
from runtime.certificates.issuance import CertificateAuthority
from runtime.errors import CertificateSetError, SecretContentError
from runtime.lifecycle import issuance
from runtime.secrets.rollover import NO_NEXT_CA
from tests.support.lifecycle import ENVIRONMENT, create_shells, store, version_counts


def event(request_type: str = "Create", **properties) -> dict:
    return {
        "RequestType": request_type,
        "ResourceProperties": {
            "ServiceToken": "arn:aws:lambda:us-east-1:123456789012:function:provider",
            "Environment": ENVIRONMENT,
            "LeafLifetimeHours": "24",
            "ServerSans": ["localhost", "127.0.0.1"],
            "KeyType": "ecdsa-p256",
            **properties,
        },
    }


def test_first_deploy_issues_a_ca_and_every_identity_into_the_shells(secretsmanager):
    create_shells(secretsmanager)
    response = issuance.handler(event(), None, client=secretsmanager)

    assert response["PhysicalResourceId"] == f"hokusai-mtls-{ENVIRONMENT}-certificates"
    data = response["Data"]
    assert data["CaAction"] == "issued"
    assert {data[f"{i.name.capitalize()}Action"] for i in names.IDENTITIES} == {"issued"}
    assert "PRIVATE KEY" not in json.dumps(response)

    secrets = store(secretsmanager)
    bundle = secrets.fetch_trust_bundle()
    ca = secrets.fetch_ca()
    assert bundle == [ca.certificate]
    for identity in names.IDENTITIES:
        tls = secrets.fetch_identity(identity)
        verify_for(identity, tls, bundle, ENVIRONMENT)
        assert data[f"{identity.name.capitalize()}Serial"] == f"{tls.certificate.serial_number:x}"
        lifetime = tls.certificate.not_valid_after_utc - tls.certificate.not_valid_before_utc
        assert lifetime == dt.timedelta(hours=24, minutes=5)  # LeafLifetimeHours + the back-dated allowance
    server = secrets.fetch_identity(names.SERVER).certificate
    assert server.subject.rfc4514_string().startswith("CN=mlflow.hokusai-staging.local")
    assert "localhost" in str(server.extensions)
    assert version_counts(secretsmanager) == dict.fromkeys(version_counts(secretsmanager), 1)


@pytest.mark.parametrize("second", ["Create", "Update"])
def test_a_second_create_or_update_changes_nothing(secretsmanager, second):
    create_shells(secretsmanager)
    first = issuance.handler(event(), None, client=secretsmanager)
    before = version_counts(secretsmanager)

    again = issuance.handler(event(second), None, client=secretsmanager)

    assert version_counts(secretsmanager) == before
    assert again["PhysicalResourceId"] == first["PhysicalResourceId"]
    for key, value in first["Data"].items():
        if key.endswith("Action"):
            assert again["Data"][key] == "kept"
        else:
            assert again["Data"][key] == value


@pytest.mark.parametrize("ca_source", ["issued", "imported"])
def test_an_imported_ca_is_used_and_kept(secretsmanager, ca_source):
    create_shells(secretsmanager)
    imported = CertificateAuthority.create(ENVIRONMENT, common_name="Imported Corp CA")
    secretsmanager.put_secret_value(
        SecretId=names.secret_name(ENVIRONMENT, names.CA_KEY_SECRET),
        SecretString=imported.identity.to_secret_string(),
    )
    secretsmanager.put_secret_value(
        SecretId=names.secret_name(ENVIRONMENT, names.CA_BUNDLE_SECRET),
        SecretString=pem.bundle_pem([imported.certificate]).decode(),
    )

    data = issuance.handler(event(CaSource=ca_source), None, client=secretsmanager)["Data"]

    assert data["CaAction"] == "kept"
    assert data["CaSerial"] == f"{imported.certificate.serial_number:x}"
    secrets = store(secretsmanager)
    for identity in names.IDENTITIES:
        tls = secrets.fetch_identity(identity)
        assert tls.certificate.issuer == imported.certificate.subject
        verify_for(identity, tls, [imported.certificate], ENVIRONMENT)
    counts = version_counts(secretsmanager)
    assert counts[names.CA_KEY_SECRET] == counts[names.CA_BUNDLE_SECRET] == 1


def test_a_complete_uploaded_set_is_left_alone(secretsmanager):
    create_shells(secretsmanager)
    uploaded = CertificateSet.issue(ENVIRONMENT)
    store(secretsmanager).upload(uploaded)
    before = version_counts(secretsmanager)

    data = issuance.handler(event(), None, client=secretsmanager)["Data"]

    # `certs upload` does not write ca-key-next: issuance gives it the "no rollover" marker, and
    # adds no version to any certificate secret.
    assert version_counts(secretsmanager) == {**before, names.CA_NEXT_SECRET: 1}
    next_ca = secretsmanager.get_secret_value(SecretId=names.secret_name(ENVIRONMENT, names.CA_NEXT_SECRET))
    assert json.loads(next_ca["SecretString"]) == NO_NEXT_CA
    assert store(secretsmanager).fetch_ca().certificate == uploaded.ca.certificate
    assert data["ApiSerial"] == f"{uploaded.identities['api'].certificate.serial_number:x}"


def test_an_invalid_identity_is_reissued_and_valid_ones_are_not(secretsmanager):
    create_shells(secretsmanager)
    issuance.handler(event(), None, client=secretsmanager)
    worker = names.identity_secret_name(ENVIRONMENT, names.WORKER)
    foreign = CertificateAuthority.create(ENVIRONMENT).issue(ENVIRONMENT, names.WORKER)
    secretsmanager.put_secret_value(SecretId=worker, SecretString=foreign.to_secret_string())
    before = version_counts(secretsmanager)

    data = issuance.handler(event("Update"), None, client=secretsmanager)["Data"]

    assert data["WorkerAction"] == "reissued"
    assert data["ApiAction"] == data["ServerAction"] == data["CaAction"] == "kept"
    after = version_counts(secretsmanager)
    assert after[names.WORKER.secret_suffix] == before[names.WORKER.secret_suffix] + 1
    assert {k: v for k, v in after.items() if k != names.WORKER.secret_suffix} == {
        k: v for k, v in before.items() if k != names.WORKER.secret_suffix
    }
    secrets = store(secretsmanager)
    verify_for(names.WORKER, secrets.fetch_identity(names.WORKER), secrets.fetch_trust_bundle(), ENVIRONMENT)


def test_a_corrupted_ca_fails_the_deployment_instead_of_being_replaced(secretsmanager):
    create_shells(secretsmanager)
    ca_key = names.secret_name(ENVIRONMENT, names.CA_KEY_SECRET)
    secretsmanager.put_secret_value(SecretId=ca_key, SecretString="{not json")
    with pytest.raises(SecretContentError, match="ca-key"):
        issuance.handler(event(), None, client=secretsmanager)
    assert version_counts(secretsmanager)[names.CA_KEY_SECRET] == 1


def test_a_ca_missing_from_the_bundle_fails_the_deployment(secretsmanager):
    create_shells(secretsmanager)
    issuance.handler(event(), None, client=secretsmanager)
    other = CertificateAuthority.create(ENVIRONMENT)
    secretsmanager.put_secret_value(
        SecretId=names.secret_name(ENVIRONMENT, names.CA_BUNDLE_SECRET),
        SecretString=pem.bundle_pem([other.certificate]).decode(),
    )
    with pytest.raises(CertificateSetError, match="not in the trust bundle"):
        issuance.handler(event("Update"), None, client=secretsmanager)


def test_delete_touches_nothing(secretsmanager):
    create_shells(secretsmanager)
    issuance.handler(event(), None, client=secretsmanager)
    before = version_counts(secretsmanager)
    response = issuance.handler(
        {**event("Delete"), "PhysicalResourceId": "hokusai-mtls-staging-certificates"},
        None,
        client=secretsmanager,
    )
    assert response == {"PhysicalResourceId": "hokusai-mtls-staging-certificates"}
    assert version_counts(secretsmanager) == before


def test_an_imported_ca_that_was_not_uploaded_fails_the_deployment(secretsmanager):
    create_shells(secretsmanager)

    with pytest.raises(SecretContentError, match=r"ca-key.*is empty.*caSource: imported.*certs upload"):
        issuance.handler(event(CaSource="imported"), None, client=secretsmanager)

    # Nothing was issued: no CA of ours, no leaf from one.
    assert set(version_counts(secretsmanager).values()) == {0}


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        ({"Environment": "Staging"}, "is not a valid name"),
        ({"LeafLifetimeHours": "ninety"}, "invalid ResourceProperties"),
        ({"LeafLifetimeHours": "0"}, "invalid ResourceProperties: leaf lifetime"),
        ({"LeafLifetimeHours": "nan"}, "invalid ResourceProperties: leaf lifetime"),
        ({"KeyType": "dsa-1024"}, "invalid ResourceProperties"),
        ({"ServerSans": "localhost"}, "must be a list"),
        ({"CaSource": "borrowed"}, "CaSource 'borrowed'"),
    ],
)
def test_bad_properties_are_refused_with_their_name(secretsmanager, properties, message):
    with pytest.raises(ValueError, match=message):
        issuance.handler(event(**properties), None, client=secretsmanager)
