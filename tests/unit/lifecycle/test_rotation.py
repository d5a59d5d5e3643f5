"""Secrets Manager rotation of an identity secret against moto, the Lambda run in-process
(`tests.support.lifecycle.rotate`; the `deployed` fixture is in tests/unit/conftest.py)."""

from __future__ import annotations

import datetime as dt
import json
import ssl

import pytest

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import verify_for
from runtime.certificates.issuance import CertificateAuthority
from runtime.lifecycle import ENV_LEAF_LIFETIME_HOURS, rotation
from runtime.lifecycle.rotation import RotationError
from tests.support.lifecycle import ENVIRONMENT, current_version, rotate, stages, store

API_SECRET = names.identity_secret_name(ENVIRONMENT, names.API)
SERVER_SECRET = names.identity_secret_name(ENVIRONMENT, names.SERVER)


@pytest.mark.parametrize("identity", [names.API, names.WORKER, names.SERVER], ids=lambda i: i.name)
def test_the_four_steps_in_order_make_a_new_current_that_verifies(deployed, identity, monkeypatch):
    client, function = deployed
    monkeypatch.setenv(ENV_LEAF_LIFETIME_HOURS, "24")
    secret_id = names.identity_secret_name(ENVIRONMENT, identity)
    secrets = store(client)
    old = secrets.fetch_identity(identity)
    old_version = current_version(client, secret_id)

    steps = rotate(client, function, secret_id, rotation.handler)

    assert list(steps) == ["createSecret", "setSecret", "testSecret", "finishSecret"]
    token = steps["createSecret"]["event"]["ClientRequestToken"]
    assert steps["testSecret"]["stages"][token] == ["AWSPENDING"]
    assert "AWSCURRENT" in steps["testSecret"]["stages"][old_version]
    finished = steps["finishSecret"]["stages"]
    assert finished[token] == ["AWSCURRENT"]
    assert "AWSCURRENT" not in finished[old_version]
    new = secrets.fetch_identity(identity)
    verify_for(identity, new, secrets.fetch_trust_bundle(), ENVIRONMENT)
    assert new.certificate.serial_number != old.certificate.serial_number
    assert new.private_key_pem() != old.private_key_pem()
    life = new.certificate.not_valid_after_utc - new.certificate.not_valid_before_utc
    assert life == dt.timedelta(hours=24, minutes=5)  # HOKUSAI_MTLS_LEAF_LIFETIME_HOURS + the back-dating
    versions = stages(client, secret_id)
    assert not any("AWSPENDING" in s for s in versions.values())
    assert "AWSPREVIOUS" in versions[old_version]
    assert current_version(client, secret_id) != old_version


def test_a_foreign_ca_between_create_and_test_stops_the_rotation(deployed):
    client, function = deployed
    old = store(client).fetch_identity(names.API)
    old_version = current_version(client, API_SECRET)
    foreign = CertificateAuthority.create(ENVIRONMENT, common_name="Not ours")

    def swap_ca(step):
        if step == "testSecret":
            client.put_secret_value(
                SecretId=names.secret_name(ENVIRONMENT, names.CA_KEY_SECRET),
                SecretString=foreign.identity.to_secret_string(),
            )
            client.put_secret_value(
                SecretId=names.secret_name(ENVIRONMENT, names.CA_BUNDLE_SECRET),
                SecretString=pem.bundle_pem([foreign.certificate]).decode(),
            )

    with pytest.raises(RotationError, match="testSecret"):
        rotate(client, function, API_SECRET, rotation.handler, before_step=swap_ca)

    assert current_version(client, API_SECRET) == old_version
    assert store(client).fetch_identity(names.API).certificate == old.certificate


def test_a_corrupted_pending_value_stops_the_rotation(deployed):
    client, function = deployed
    old_version = current_version(client, API_SECRET)

    def corrupt(step):
        if step == "testSecret":
            pending = next(v for v, s in stages(client, API_SECRET).items() if "AWSPENDING" in s)
            value = client.get_secret_value(SecretId=API_SECRET, VersionId=pending)["SecretString"]
            document = json.loads(value)
            document["certificate"] = document["certificate"].replace("A", "B", 5)
            # moto lets a version be rewritten under the same token while it is AWSPENDING
            client.put_secret_value(
                SecretId=API_SECRET,
                ClientRequestToken=pending,
                SecretString=json.dumps(document),
                VersionStages=["AWSPENDING"],
            )

    with pytest.raises(RotationError, match="testSecret"):
        rotate(client, function, API_SECRET, rotation.handler, before_step=corrupt)
    assert current_version(client, API_SECRET) == old_version


def test_a_pending_pair_that_names_another_service_fails_the_test(deployed):
    client, function = deployed
    ca = store(client).fetch_ca()

    def swap_identity(step):
        if step == "testSecret":
            pending = next(v for v, s in stages(client, API_SECRET).items() if "AWSPENDING" in s)
            client.put_secret_value(
                SecretId=API_SECRET,
                ClientRequestToken=pending,
                SecretString=ca.issue(ENVIRONMENT, names.WORKER).to_secret_string(),
                VersionStages=["AWSPENDING"],
            )

    with pytest.raises(RotationError, match="spiffe://hokusai/staging/api"):
        rotate(client, function, API_SECRET, rotation.handler, before_step=swap_identity)


def test_handshake_refuses_a_server_certificate_used_as_a_client():
    ca = CertificateAuthority.create(ENVIRONMENT)
    server_leaf = ca.issue(ENVIRONMENT, names.SERVER)
    rotation.handshake(names.SERVER, server_leaf, ca, [ca.certificate], ENVIRONMENT)
    with pytest.raises(ssl.SSLError, match="certificate"):
        rotation.handshake(names.API, server_leaf, ca, [ca.certificate], ENVIRONMENT)


def test_steps_retried_after_finish_change_nothing(deployed):
    client, function = deployed
    rotate(client, function, API_SECRET, rotation.handler)
    token = current_version(client, API_SECRET)
    before = stages(client, API_SECRET)
    for step in rotation.STEPS:
        rotation.handler(
            {"Step": step, "SecretId": API_SECRET, "ClientRequestToken": token}, None, client=client
        )
    assert stages(client, API_SECRET) == before


def test_other_secrets_are_refused(deployed):
    client, _ = deployed
    ca_key = names.secret_name(ENVIRONMENT, names.CA_KEY_SECRET)
    token = current_version(client, ca_key)
    with pytest.raises(RotationError, match="refusing to rotate"):
        rotation.handler(
            {"Step": "createSecret", "SecretId": ca_key, "ClientRequestToken": token}, None, client=client
        )


def test_rotation_must_be_enabled_and_the_token_a_version(deployed):
    client, _ = deployed
    event = {"Step": "createSecret", "SecretId": API_SECRET, "ClientRequestToken": "no-such-version"}
    with pytest.raises(RotationError, match="rotation is not enabled"):
        rotation.handler(event, None, client=client)
    with pytest.raises(RotationError, match="unknown rotation step"):
        rotation.handler({**event, "Step": "dropSecret"}, None, client=client)


def test_a_token_that_is_no_version_is_refused(deployed):
    client, function = deployed
    rotate(client, function, API_SECRET, rotation.handler)  # rotation is enabled from now on
    event = {"Step": "createSecret", "SecretId": API_SECRET, "ClientRequestToken": "no-such-version"}
    with pytest.raises(RotationError, match="no stage for rotation"):
        rotation.handler(event, None, client=client)
    previous = next(v for v, s in stages(client, API_SECRET).items() if "AWSPREVIOUS" in s)
    with pytest.raises(RotationError, match="is not AWSPENDING"):
        rotation.handler({**event, "ClientRequestToken": previous}, None, client=client)
