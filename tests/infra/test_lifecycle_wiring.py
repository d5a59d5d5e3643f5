"""The synthesized template drives the handlers: what the stack wires is what the code expects.

Each Lambda of the staging Secrets stack is called as AWS would call it: its `Handler` string
imported, ONLY its template `Environment.Variables` (plus the AWS_REGION Lambda sets) in the
environment, its own default clients (moto), the custom resource's template properties as the
event, and every RotationSchedule's secret rotated by the function the schedule names. A
setting the template forgets, misspells or renders wrongly fails here, not in a deployment.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os

import boto3
import pytest
from moto import mock_aws

from runtime import lifecycle, names
from runtime.lifecycle import CA_IDENTITY, clients
from runtime.secrets import rollover
from tests.conftest import REGION
from tests.support.lifecycle import current_version, rotate, rotation_function

pytestmark = pytest.mark.infra

ENV = "staging"


def handler_of(function: dict):
    module, name = function["Properties"]["Handler"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def as_deployed(handler):
    """The handler as Lambda calls it: no client handed in, so it makes its own (moto's)."""
    return lambda event, context, client: handler(event, context)


@pytest.fixture
def lambda_environment(monkeypatch):
    """Set exactly one function's template variables (and AWS_REGION), dropping the previous one's."""
    applied: list[str] = []

    def apply(function: dict) -> None:
        for variable in applied:
            monkeypatch.delenv(variable, raising=False)
        applied.clear()
        for variable, value in function["Properties"].get("Environment", {}).get("Variables", {}).items():
            assert isinstance(value, str), f"{variable} is not a plain string in the template: {value!r}"
            monkeypatch.setenv(variable, value)
            applied.append(variable)
        monkeypatch.setenv("AWS_REGION", REGION)

    clients.secrets_client.cache_clear()
    clients.cloudwatch_client.cache_clear()
    with mock_aws():
        yield apply
    clients.secrets_client.cache_clear()
    clients.cloudwatch_client.cache_clear()


def test_every_handler_runs_with_what_the_template_gives_it(secrets_templates, lambda_environment):
    template = secrets_templates[ENV].to_json()
    resources = template["Resources"]
    functions = {k: v for k, v in resources.items() if v["Type"] == "AWS::Lambda::Function"}
    secret_names = {
        k: v["Properties"]["Name"] for k, v in resources.items() if v["Type"] == "AWS::SecretsManager::Secret"
    }
    secretsmanager = boto3.client("secretsmanager", region_name=REGION)
    for name in secret_names.values():  # the stack's empty shells
        secretsmanager.create_secret(Name=name)
    # The revocation lists are an operator's (`certs revoke`): no handler fills, rotates or reads them.
    revocations = names.secret_name(ENV, names.CA_REVOCATIONS_SECRET)
    assert revocations in secret_names.values()
    managed = {k: v for k, v in secret_names.items() if v != revocations}

    # Issuance: the custom resource's properties, as CloudFormation sends them.
    (custom,) = [r for r in resources.values() if r["Type"] == "Custom::HokusaiMtlsCertificates"]
    properties = dict(custom["Properties"])
    provider_id = properties.pop("ServiceToken")["Fn::GetAtt"][0]
    (issuance,) = [f for f in functions.values() if f["Properties"]["Handler"].endswith("issuance.handler")]
    assert provider_id not in functions or functions[provider_id] is not issuance
    lambda_environment(issuance)
    response = handler_of(issuance)({"RequestType": "Create", "ResourceProperties": properties}, None)
    assert response["Data"]["CaAction"] == "issued"
    for name in managed.values():  # every secret now has a value, ca-key-next its marker
        assert secretsmanager.get_secret_value(SecretId=name)["SecretString"]
    assert_still_empty(secretsmanager, revocations)
    ca = rollover.RolloverStore(ENV, client=secretsmanager).fetch_ca().certificate
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= names.CA_LIFETIME_DAYS

    # Rotation: every schedule's secret, by the function the schedule names.
    function_arn = rotation_function(REGION)
    schedules = [
        r["Properties"] for r in resources.values() if r["Type"] == "AWS::SecretsManager::RotationSchedule"
    ]
    assert len(schedules) == len(managed)
    rotated_identities = set()
    for schedule in schedules:
        secret_id = managed[schedule["SecretId"]["Ref"]]
        function = functions[schedule["RotationLambdaARN"]["Fn::GetAtt"][0]]
        lambda_environment(function)
        handler = handler_of(function)
        before_value = secretsmanager.get_secret_value(SecretId=secret_id)["SecretString"]
        before_version = current_version(secretsmanager, secret_id)

        rotate(secretsmanager, function_arn, secret_id, as_deployed(handler))

        assert current_version(secretsmanager, secret_id) != before_version, secret_id
        after_value = secretsmanager.get_secret_value(SecretId=secret_id)["SecretString"]
        if secret_id.endswith(names.IDENTITY_SECRET_SUFFIX):
            assert after_value != before_value, f"{secret_id}: rotation issued nothing new"
            rotated_identities.add(secret_id)
            variables = function["Properties"]["Environment"]["Variables"]
            lifetime = dt.timedelta(hours=float(variables[lifecycle.ENV_LEAF_LIFETIME_HOURS]))
            identity = next(i for i in names.IDENTITIES if secret_id.endswith(i.secret_suffix))
            leaf = rollover.RolloverStore(ENV, client=secretsmanager).fetch_identity(identity).certificate
            assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == lifetime + dt.timedelta(minutes=5)
        else:  # a CA secret on a new CA: no rollover step is due, the value stays
            assert after_value == before_value, secret_id
    assert rotated_identities == {names.identity_secret_name(ENV, i) for i in names.IDENTITIES}

    # Expiry check: the function the schedule targets, its variables only, an empty event.
    (rule,) = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::Events::Rule"]
    expiry = functions[rule["Targets"][0]["Arn"]["Fn::GetAtt"][0]]
    lambda_environment(expiry)
    assert os.environ[names.ENV_ENVIRONMENT] == ENV
    report = handler_of(expiry)({}, None)
    metrics = boto3.client("cloudwatch", region_name=REGION).list_metrics(Namespace=names.METRIC_NAMESPACE)
    published = {
        (m["MetricName"], next(d["Value"] for d in m["Dimensions"] if d["Name"] == "Identity"))
        for m in metrics["Metrics"]
    }
    expected_identities = {CA_IDENTITY, *(i.name for i in names.IDENTITIES)}
    assert published >= {(names.METRIC_CERT_DAYS_TO_EXPIRY, i) for i in expected_identities}
    assert published >= {(names.METRIC_CERT_HOURS_TO_EXPIRY, i) for i in expected_identities}
    assert report["failures"] == [], report
    assert set(report["days_to_expiry"]) == expected_identities
    assert_still_empty(secretsmanager, revocations)


def assert_still_empty(secretsmanager, name: str) -> None:
    """The secret exists and has no version: what CloudFormation created, untouched."""
    assert not secretsmanager.list_secret_version_ids(SecretId=name)["Versions"], name
    with pytest.raises(secretsmanager.exceptions.ResourceNotFoundException):
        secretsmanager.get_secret_value(SecretId=name)
