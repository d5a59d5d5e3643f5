"""The synthesized app: stages and their stacks, secret names (from runtime.names), encryption, retention, cdk-nag."""

from __future__ import annotations

import pytest

from runtime import names
from stacks.settings import RETAINED_ENVIRONMENTS
from tests.support.nag import nag_findings

pytestmark = pytest.mark.infra

ENVIRONMENTS = pytest.mark.parametrize("env", names.ENVIRONMENTS)


def expected_secret_names(env: str) -> set[str]:
    return {
        names.secret_name(env, names.CA_BUNDLE_SECRET),
        names.secret_name(env, names.CA_KEY_SECRET),
        names.secret_name(env, names.CA_NEXT_SECRET),
        names.secret_name(env, names.CA_REVOCATIONS_SECRET),
        *(names.identity_secret_name(env, identity) for identity in names.IDENTITIES),
    }


def secrets(template) -> dict:
    return template.find_resources("AWS::SecretsManager::Secret")


def secrets_key(template) -> tuple[str, dict]:
    """The key of the certificate secrets (the stack's other key encrypts the lifecycle's logs)."""
    keys = template.find_resources("AWS::KMS::Key")
    assert len(keys) == 2, f"expected the secrets' and the logs' KMS keys, found {sorted(keys)}"
    (found,) = [(k, v) for k, v in keys.items() if "certificate secrets" in v["Properties"]["Description"]]
    return found


def test_one_stage_per_environment(cdk_app, stages):
    from aws_cdk import Stage

    stage_names = {child.node.id for child in cdk_app.node.children if isinstance(child, Stage)}
    assert stage_names == {f"Hokusai-{env}" for env in names.ENVIRONMENTS}
    for env, stage in stages.items():
        assert stage.secrets.stack_name == f"Hokusai-{env}-Secrets"


def test_app_synthesizes_every_stage_and_passes_validation(cloud_assembly):
    # Synthesizing the App runs the registered cdk-nag plugin: a finding raises there.
    nested = {artifact.display_name for artifact in cloud_assembly.nested_assemblies}
    assert nested == {f"Hokusai-{env}" for env in names.ENVIRONMENTS}
    for artifact in cloud_assembly.nested_assemblies:
        stacks = {stack.stack_name: stack for stack in artifact.nested_assembly.stacks}
        prefix = artifact.display_name
        assert set(stacks) == {
            f"{prefix}-{name}" for name in ("Secrets", "Network", "Services", "Monitoring")
        }
        services_depends_on = {d.id for d in stacks[f"{prefix}-Services"].dependencies}
        assert {stacks[f"{prefix}-Secrets"].id, stacks[f"{prefix}-Network"].id} <= services_depends_on


@ENVIRONMENTS
def test_secret_names_come_from_runtime_names(secrets_templates, env):
    found = {resource["Properties"]["Name"] for resource in secrets(secrets_templates[env]).values()}
    assert found == expected_secret_names(env)


@ENVIRONMENTS
def test_construct_exposes_each_secret_under_its_identity(stages, env):
    certificates = stages[env].secrets.certificates

    def name_of(secret) -> str:
        return secret.node.default_child.name

    assert name_of(certificates.ca_bundle) == names.secret_name(env, names.CA_BUNDLE_SECRET)
    assert name_of(certificates.ca_key) == names.secret_name(env, names.CA_KEY_SECRET)
    assert name_of(certificates.ca_key_next) == names.secret_name(env, names.CA_NEXT_SECRET)
    assert name_of(certificates.ca_revocations) == names.secret_name(env, names.CA_REVOCATIONS_SECRET)
    assert set(certificates.identities) == {identity.name for identity in names.IDENTITIES}
    for identity in names.IDENTITIES:
        assert name_of(certificates.identity(identity)) == names.identity_secret_name(env, identity)
    assert {name_of(secret) for secret in certificates.all_secrets} == expected_secret_names(env)
    assert len(certificates.all_secrets) == len(expected_secret_names(env))


@ENVIRONMENTS
def test_secrets_are_encrypted_with_the_rotating_customer_key(secrets_templates, env):
    template = secrets_templates[env]
    key_id, key = secrets_key(template)
    assert key["Properties"]["EnableKeyRotation"] is True
    for logical_id, secret in secrets(template).items():
        assert secret["Properties"]["KmsKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}, logical_id


@ENVIRONMENTS
def test_secrets_are_empty_shells(secrets_templates, env):
    """No value in the template and none generated: issuance or `hokusai-mtls certs upload` puts the
    values (`certs revoke` the revocation lists', which stay empty until the first revocation)."""
    for logical_id, secret in secrets(secrets_templates[env]).items():
        properties = secret["Properties"]
        assert "SecretString" not in properties, logical_id
        assert "GenerateSecretString" not in properties, logical_id
        assert "SecretStringTemplate" not in str(properties), logical_id


@ENVIRONMENTS
def test_removal_policy_retains_production_only(secrets_templates, env):
    expected = "Retain" if env in RETAINED_ENVIRONMENTS else "Delete"
    template = secrets_templates[env]
    resources = {**secrets(template), **template.find_resources("AWS::KMS::Key")}
    resources.update(template.find_resources("AWS::Logs::LogGroup"))
    assert len(resources) == len(expected_secret_names(env)) + 2 + 7
    for logical_id, resource in resources.items():
        assert resource.get("DeletionPolicy") == expected, logical_id
        assert resource.get("UpdateReplacePolicy") == expected, logical_id


@ENVIRONMENTS
@pytest.mark.parametrize("stack", ["secrets", "network", "services"])
def test_cdk_nag_reports_no_unacknowledged_violations(cdk_app, stages, env, stack):
    assert nag_findings(cdk_app, getattr(stages[env], stack)) == []
