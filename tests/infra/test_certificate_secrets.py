"""CertificateSecrets.grant_identity alone in a bare Stack: exactly two secrets, decrypt via Secrets Manager."""

from __future__ import annotations

import pytest

from runtime import names

pytestmark = pytest.mark.infra


@pytest.fixture(scope="module")
def granted(tmp_path_factory, cdk_context):
    """Two identical stacks, one with `grant_identity(API, role)`: what differs is the grant."""
    import aws_cdk as cdk
    from aws_cdk import aws_iam as iam
    from aws_cdk.assertions import Template

    from constructs_lib.certificate_secrets import CertificateSecrets

    app = cdk.App(context=cdk_context, outdir=str(tmp_path_factory.mktemp("secrets.out")))
    built = {}
    for name in ("Baseline", "Grants"):
        stack = cdk.Stack(app, name)
        certificates = CertificateSecrets(
            stack, "Certificates", environment="staging", removal_policy=cdk.RemovalPolicy.DESTROY
        )
        role = iam.Role(stack, "ApiRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"))
        grant = certificates.grant_identity(names.API, role) if name == "Grants" else None
        built[name] = {"stack": stack, "certificates": certificates, "grant": grant}
    for parts in built.values():  # synthesize once every stack exists
        parts["template"] = Template.from_stack(parts["stack"]).to_json()
    return built


def secret_ids_by_name(template: dict) -> dict[str, str]:
    return {
        resource["Properties"]["Name"]: logical_id
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == "AWS::SecretsManager::Secret"
    }


def test_grant_identity_reads_the_identity_and_the_bundle_and_decrypts_via_secrets_manager(granted):
    built = granted["Grants"]
    template = built["template"]
    (policy,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::IAM::Policy"]
    read, decrypt = policy["Properties"]["PolicyDocument"]["Statement"]
    ids = secret_ids_by_name(template)
    assert sorted(read["Action"]) == ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"]
    assert read["Effect"] == "Allow" and "Condition" not in read
    assert sorted(r["Ref"] for r in read["Resource"]) == sorted(
        [
            ids[names.secret_name("staging", names.CA_BUNDLE_SECRET)],
            ids[names.identity_secret_name("staging", names.API)],
        ]
    )
    key_id = built["stack"].get_logical_id(built["certificates"].key.node.default_child)
    assert decrypt == {
        "Action": "kms:Decrypt",
        "Condition": {
            "StringEquals": {
                "kms:ViaService": {
                    "Fn::Join": ["", ["secretsmanager.", {"Ref": "AWS::Region"}, ".amazonaws.com"]]
                }
            }
        },
        "Effect": "Allow",
        "Resource": {"Fn::GetAtt": [key_id, "Arn"]},
    }
    assert built["grant"].success


def test_grant_identity_changes_nothing_on_the_resource_side(granted):
    """Same key policy as without the grant, and no secret resource policy."""
    baseline, grants = granted["Baseline"]["template"], granted["Grants"]["template"]

    def key_policy(template: dict) -> dict:
        (key,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::KMS::Key"]
        return key["Properties"]["KeyPolicy"]

    assert key_policy(grants) == key_policy(baseline)
    types = {resource["Type"] for resource in grants["Resources"].values()}
    assert "AWS::SecretsManager::ResourcePolicy" not in types
