"""The lifecycle Lambdas take their identities from the declaration (HOKUSAI_MTLS_SERVICES, which the
stacks set): a platform's own service in an environment named `qa` is issued, rotated and watched."""

from __future__ import annotations

import json

import boto3

from runtime import names
from runtime.certificates.certset import verify_for
from runtime.certificates.inspection import extended_key_usages
from runtime.lifecycle import expiry, issuance, rotation
from runtime.service_catalog import DEFAULT_CATALOG, parse_catalog
from tests.conftest import REGION
from tests.support.lifecycle import rotate, rotation_function, store
from tests.unit.test_service_catalog import PLATFORM

CATALOG = parse_catalog(PLATFORM)


def test_a_declared_service_is_issued_rotated_and_checked_in_qa(secretsmanager, monkeypatch):
    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    monkeypatch.setenv(names.ENV_SERVICES, CATALOG.to_json())
    suffixes = [names.CA_KEY_SECRET, names.CA_BUNDLE_SECRET, names.CA_NEXT_SECRET]
    suffixes += [identity.secret_suffix for identity in CATALOG.identities]
    for suffix in suffixes:
        secretsmanager.create_secret(Name=names.secret_name("qa", suffix))

    data = issuance.handler(
        {"RequestType": "Create", "ResourceProperties": {"Environment": "qa"}}, None, client=secretsmanager
    )["Data"]
    assert {data[f"{name.capitalize()}Action"] for name in ("streaming", "document-converter")} == {"issued"}

    secrets = store(secretsmanager, "qa")
    streaming = CATALOG.identity_by_name("streaming")
    before = secrets.fetch_identity(streaming)
    secret_id = names.identity_secret_name("qa", streaming)
    rotate(secretsmanager, rotation_function(REGION), secret_id, rotation.handler)
    after = secrets.fetch_identity(streaming)
    assert after.certificate.serial_number != before.certificate.serial_number
    verify_for(streaming, after, secrets.fetch_trust_bundle(), "qa")
    assert set(extended_key_usages(after.certificate)) == {"serverAuth", "clientAuth"}

    report = expiry.check("qa", secrets=secretsmanager, cloudwatch=cloudwatch)
    assert set(report.days_to_expiry) == {"ca", *(identity.name for identity in CATALOG.identities)}
    assert report.failures == []


def test_a_platform_of_forty_services_fits_cloudformations_4_kib_response(secretsmanager, monkeypatch):
    """CloudFormation refuses a custom resource response over 4096 bytes: past a dozen identities the
    response counts the actions instead of naming each serial (the log still names every one)."""
    servers = {
        f"service-number-{n:02d}": {"serves": "mtls", "port": 8443, "callers": ["worker"]} for n in range(37)
    }
    document = json.loads(DEFAULT_CATALOG.to_json())
    catalog = parse_catalog({**document, **servers})
    assert len(catalog.identities) == 40
    monkeypatch.setenv(names.ENV_SERVICES, catalog.to_json())
    suffixes = [names.CA_KEY_SECRET, names.CA_BUNDLE_SECRET, names.CA_NEXT_SECRET]
    for suffix in suffixes + [identity.secret_suffix for identity in catalog.identities]:
        secretsmanager.create_secret(Name=names.secret_name("qa", suffix))

    event = {"RequestType": "Create", "ResourceProperties": {"Environment": "qa"}}
    response = issuance.handler(event, None, client=secretsmanager)
    envelope = {  # what the CDK provider sends back, with the longest ids CloudFormation uses
        "Status": "SUCCESS",
        "Reason": "x" * 200,
        "StackId": "arn:aws:cloudformation:eu-west-1:123456789012:stack/" + "s" * 128 + "/" + "u" * 36,
        "RequestId": "r" * 36,
        "LogicalResourceId": "L" * 64,
        **response,
    }
    assert len(json.dumps(envelope).encode()) < 4096
    assert response["Data"]["IdentityActions"] == "issued=40"
    assert response["Data"]["CaAction"] == "issued"
    again = issuance.handler({**event, "RequestType": "Update"}, None, client=secretsmanager)
    assert again["Data"]["IdentityActions"] == "kept=40"
