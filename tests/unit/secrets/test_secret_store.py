"""Secrets Manager store against moto: round trips, idempotent uploads, named failures."""

from __future__ import annotations

import copy

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from runtime import names
from runtime.certificates.certset import CertificateSet
from runtime.errors import (
    SecretAccessDeniedError,
    SecretContentError,
    SecretDecryptionError,
    SecretNotFoundError,
    SecretThrottledError,
    SecretUnavailableError,
    UntrustedCertificateError,
)
from runtime.secrets.secret_store import SecretStore, make_client
from tests.conftest import REGION
from tests.support.certs import new_ca

EXPECTED_NAMES = [
    "hokusai/development/mlflow/ca-cert",
    "hokusai/development/mlflow/ca-key",
    "hokusai/development/mlflow/server-identity",
    "hokusai/development/mlflow/api-identity",
    "hokusai/development/mlflow/worker-identity",
]


def version_count(client, secret_id: str) -> int:
    return len(client.list_secret_version_ids(SecretId=secret_id)["Versions"])


def test_upload_creates_every_secret_tagged_and_fetch_returns_the_same(secretsmanager, development_set):
    store = SecretStore("development", client=secretsmanager)
    results = store.upload(development_set)
    assert [(r.secret_id, r.action) for r in results] == [(n, "created") for n in EXPECTED_NAMES]

    assert store.fetch_trust_bundle() == development_set.trust_bundle
    for identity in names.IDENTITIES:
        fetched = store.fetch_identity(identity)
        assert fetched.certificate == development_set.identities[identity.name].certificate
        assert fetched.private_key_pem() == development_set.identities[identity.name].private_key_pem()
    assert store.fetch_ca().certificate == development_set.ca.certificate

    tags = {t["Key"]: t["Value"] for t in secretsmanager.describe_secret(SecretId=EXPECTED_NAMES[3])["Tags"]}
    assert tags["hokusai-mtls:environment"] == "development"
    assert tags["hokusai-mtls:content"] == "identity/api"
    assert tags["hokusai-mtls:not-after"].startswith(
        development_set.identities["api"].certificate.not_valid_after_utc.strftime("%Y-%m-%d")
    )


def test_uploading_the_same_set_twice_adds_no_version(secretsmanager, development_set):
    store = SecretStore("development", client=secretsmanager)
    store.upload(development_set)
    again = store.upload(development_set)
    assert {r.action for r in again} == {"unchanged"}
    assert all(version_count(secretsmanager, name) == 1 for name in EXPECTED_NAMES)


def test_a_reissued_leaf_becomes_a_new_current_version(secretsmanager, development_set):
    store = SecretStore("development", client=secretsmanager)
    store.upload(development_set)
    reissued = copy.copy(development_set)
    reissued.identities = {
        **development_set.identities,
        "api": development_set.ca.issue("development", names.API),
    }
    actions = {r.secret_id: r.action for r in store.upload(reissued)}
    assert actions["hokusai/development/mlflow/api-identity"] == "updated"
    assert actions["hokusai/development/mlflow/worker-identity"] == "unchanged"
    assert store.fetch_identity(names.API).certificate == reissued.identities["api"].certificate


def test_upload_fills_secret_shells_created_by_the_stack_and_uses_kms(secretsmanager, development_set):
    kms = boto3.client("kms", region_name=REGION)
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    secretsmanager.create_secret(Name=EXPECTED_NAMES[3], KmsKeyId=key_id)  # no value yet, like a CDK shell
    results = SecretStore("development", client=secretsmanager).upload(development_set, kms_key_id=key_id)
    actions = {r.secret_id: r.action for r in results}
    assert actions[EXPECTED_NAMES[3]] == "updated"
    assert actions[EXPECTED_NAMES[4]] == "created"
    assert secretsmanager.describe_secret(SecretId=EXPECTED_NAMES[4])["KmsKeyId"].endswith(key_id)


def test_a_set_that_does_not_verify_is_not_uploaded_at_all(secretsmanager, development_set):
    broken = copy.copy(development_set)
    broken.identities = {**development_set.identities, "worker": new_ca().issue("development", names.WORKER)}
    with pytest.raises(UntrustedCertificateError, match="worker"):
        SecretStore("development", client=secretsmanager).upload(broken)
    assert secretsmanager.list_secrets()["SecretList"] == []


def test_a_set_for_another_environment_is_refused(secretsmanager, development_set):
    with pytest.raises(ValueError, match="refusing to mix"):
        SecretStore("production", client=secretsmanager).upload(development_set)


def test_missing_secret_names_the_secret(secretsmanager):
    with pytest.raises(SecretNotFoundError, match="hokusai/staging/mlflow/api-identity: not found"):
        SecretStore("staging", client=secretsmanager).fetch_identity(names.API)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"certificate": "x", "private_key": "y"}', "not PEM"),
    ],
)
def test_bad_identity_contents_name_the_secret_and_the_problem(secretsmanager, value, message):
    secretsmanager.create_secret(Name="hokusai/staging/mlflow/api-identity", SecretString=value)
    with pytest.raises(SecretContentError, match=f"secret hokusai/staging/mlflow/api-identity: .*{message}"):
        SecretStore("staging", client=secretsmanager).fetch_identity(names.API)


def test_bundle_holding_a_key_is_reported(secretsmanager, development_set):
    key = development_set.identities["api"].private_key_pem().decode()
    secretsmanager.create_secret(Name="hokusai/staging/mlflow/ca-cert", SecretString=key)
    with pytest.raises(SecretContentError, match="ca-cert: .*found PRIVATE KEY"):
        SecretStore("staging", client=secretsmanager).fetch_trust_bundle()


def test_binary_secret_is_reported(secretsmanager):
    secretsmanager.create_secret(Name="hokusai/staging/mlflow/ca-cert", SecretBinary=b"\x00\x01")
    with pytest.raises(SecretContentError, match="binary"):
        SecretStore("staging", client=secretsmanager).fetch_trust_bundle()


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        ("AccessDeniedException", SecretAccessDeniedError, "access denied"),
        ("DecryptionFailure", SecretDecryptionError, "KMS could not decrypt the value"),
        ("ThrottlingException", SecretThrottledError, "throttled after 5 attempts"),
    ],
)
def test_aws_errors_become_named_errors(code, error, message):
    """Stubbed responses: moto cannot make IAM, KMS or throttling fail on demand."""
    client = make_client(REGION)
    with Stubber(client) as stubber:
        stubber.add_client_error("get_secret_value", service_error_code=code, service_message="from AWS")
        with pytest.raises(error, match=f"hokusai/production/mlflow/ca-cert: {message}: from AWS"):
            SecretStore("production", client=client).fetch_trust_bundle()


def test_the_default_client_uses_botocore_standard_retries():
    config = make_client(REGION).meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 5}


def test_the_default_client_takes_the_region_ecs_sets(monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert make_client().meta.region_name == "eu-west-3"


def test_unreachable_store_is_named():
    client = boto3.client(
        "secretsmanager",
        region_name=REGION,
        endpoint_url="http://127.0.0.1:9",  # the discard port: connection refused
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    with pytest.raises(
        SecretUnavailableError, match="hokusai/production/mlflow/ca-cert: Secrets Manager unreachable"
    ):
        SecretStore("production", client=client).fetch_trust_bundle()


def test_certificate_set_round_trips_through_a_directory(tmp_path, development_set):
    development_set.write_to_dir(tmp_path)
    again = CertificateSet.read_from_dir(tmp_path, "development")
    again.verify()
    assert again.ca.certificate == development_set.ca.certificate
    assert again.identities["server"].certificate == development_set.identities["server"].certificate
