"""CertificateSecrets alone in a bare Stack: `grant_identity` reads exactly the identity and the bundle (and
the revocation lists for an identity that serves), decrypt via Secrets Manager; the revocation-list secret
itself (an empty shell, its SMG4 acknowledged)."""

from __future__ import annotations

import json

import pytest

from runtime import names

pytestmark = pytest.mark.infra


@pytest.fixture(scope="module")
def granted(tmp_path_factory, cdk_context):
    """Four identical stacks, three with a grant (`grant_identity(API, role)`, a client,
    `grant_identity(SERVER, role)`, a server, and the API behind an ALB that forwards client
    certificates): what differs is the grant."""
    import aws_cdk as cdk
    from aws_cdk import aws_iam as iam
    from aws_cdk.assertions import Template

    from constructs_lib.certificate_secrets import CertificateSecrets

    app = cdk.App(context=cdk_context, outdir=str(tmp_path_factory.mktemp("secrets.out")))
    built = {}
    for name, identity, proxy_kind in (
        ("Baseline", None, names.PROXY_KIND_NONE),
        ("Grants", names.API, names.PROXY_KIND_NONE),
        ("ServerGrants", names.SERVER, names.PROXY_KIND_NONE),
        ("ForwardedGrants", names.API, names.PROXY_KIND_ALB),
    ):
        stack = cdk.Stack(app, name)
        certificates = CertificateSecrets(
            stack, "Certificates", environment="staging", removal_policy=cdk.RemovalPolicy.DESTROY
        )
        role = iam.Role(stack, "TaskRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"))
        grant = (
            certificates.grant_identity(identity, role, proxy_kind=proxy_kind)
            if identity is not None
            else None
        )
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


CA_CRL = names.secret_name("staging", names.CA_REVOCATIONS_SECRET)


def granted_statements(built: dict) -> tuple[dict, dict]:
    """The grant's two statements: read on the secrets, decrypt on the key."""
    (policy,) = [r for r in built["template"]["Resources"].values() if r["Type"] == "AWS::IAM::Policy"]
    read, decrypt = policy["Properties"]["PolicyDocument"]["Statement"]
    return read, decrypt


def assert_decrypts_via_secrets_manager_only(built: dict, decrypt: dict) -> None:
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


def assert_grant_reads_exactly(built: dict, suffixes: list[str]) -> dict:
    """The grant reads (and describes) exactly these secrets, unconditionally, and decrypts only via
    Secrets Manager; returns the secrets' logical ids by name."""
    read, decrypt = granted_statements(built)
    ids = secret_ids_by_name(built["template"])
    assert sorted(read["Action"]) == ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"]
    assert read["Effect"] == "Allow" and "Condition" not in read
    assert sorted(r["Ref"] for r in read["Resource"]) == sorted(
        ids[names.secret_name("staging", s)] for s in suffixes
    )
    assert_decrypts_via_secrets_manager_only(built, decrypt)
    assert built["grant"].success
    return ids


def test_grant_identity_reads_the_identity_and_the_bundle_and_decrypts_via_secrets_manager(granted):
    """A client identity (api): its own secret and the bundle only, not the revocation lists."""
    ids = assert_grant_reads_exactly(granted["Grants"], [names.CA_BUNDLE_SECRET, names.API.secret_suffix])
    assert {"Ref": ids[CA_CRL]} not in granted_statements(granted["Grants"])[0]["Resource"]


def test_grant_identity_of_a_server_also_reads_the_revocation_lists(granted):
    """An identity that serves checks client certificates against `ca-crl`: read on it, nothing more."""
    assert names.SERVER.serves and not names.API.serves
    assert_grant_reads_exactly(
        granted["ServerGrants"],
        [names.CA_BUNDLE_SECRET, names.SERVER.secret_suffix, names.CA_REVOCATIONS_SECRET],
    )


def test_a_client_that_accepts_forwarded_certificates_reads_the_revocation_lists(granted):
    """The API behind an ALB in mTLS verify mode believes the leaf the ALB forwards: it must refuse a
    revoked one, so it reads `ca-crl` like a server (and the loader fetches it: `reads_revocations`)."""
    assert names.API.reads_revocations(names.PROXY_KIND_ALB) and not names.API.reads_revocations()
    built = granted["ForwardedGrants"]
    read, _ = granted_statements(built)
    ids = secret_ids_by_name(built["template"])
    assert {"Ref": ids[CA_CRL]} in read["Resource"]
    assert {"Ref": ids[names.identity_secret_name("staging", names.SERVER)]} not in read["Resource"]


def test_the_revocation_lists_are_an_empty_secret_under_the_certificates_key(granted):
    built = granted["Baseline"]
    resources = built["template"]["Resources"]
    logical_id = secret_ids_by_name(built["template"])[CA_CRL]
    assert CA_CRL == "hokusai/staging/mlflow/ca-crl"
    assert logical_id == built["stack"].get_logical_id(
        built["certificates"].ca_revocations.node.default_child
    )
    properties = resources[logical_id]["Properties"]
    key_id = built["stack"].get_logical_id(built["certificates"].key.node.default_child)
    assert properties["KmsKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    for absent in ("SecretString", "GenerateSecretString", "SecretStringTemplate"):
        assert absent not in json.dumps(properties), absent
    assert "revoke" in properties["Description"] and "CRL" in properties["Description"]
    assert built["certificates"].ca_revocations in built["certificates"].all_secrets
    # Nothing in the construct rotates it, and no resource policy opens it.
    types = {resource["Type"] for resource in resources.values()}
    assert "AWS::SecretsManager::RotationSchedule" not in types
    assert "AWS::SecretsManager::ResourcePolicy" not in types


def test_smg4_is_acknowledged_on_the_revocation_lists_only(granted):
    """Without `CertificateLifecycle` (no rotation schedules), SMG4 fires on every certificate secret but
    `ca-crl`: the acknowledgment covers that one secret, not the construct."""
    from aws_cdk import Validations
    from cdk_nag import AwsSolutionsChecks

    built = granted["Baseline"]
    certificates = built["certificates"]
    report = AwsSolutionsChecks(built["stack"].node.scope).validate_scope(built["stack"])
    smg4 = {
        resource.construct_path
        for violation in report.violations
        if violation.rule_name == "AwsSolutions-SMG4"
        for resource in violation.violating_resources
    }
    others = [secret for secret in certificates.all_secrets if secret is not certificates.ca_revocations]
    assert smg4 == {secret.node.default_child.node.path for secret in others}
    assert {v.rule_name for v in report.violations} == {"AwsSolutions-SMG4"}

    def acknowledged(construct) -> list:
        return [
            entry.data
            for entry in construct.node.metadata
            if entry.type == Validations.ACKNOWLEDGED_RULES_METADATA_KEY
        ]

    (reasons,) = acknowledged(certificates.ca_revocations)
    assert set(reasons) == {"Annotation::AwsSolutions-SMG4"}
    assert "certs revoke" in reasons["Annotation::AwsSolutions-SMG4"]
    for construct in (certificates, certificates.key, *others):
        assert acknowledged(construct) == [], construct.node.path


def test_grant_identity_changes_nothing_on_the_resource_side(granted):
    """Same key policy as without the grant, and no secret resource policy."""
    baseline, grants = granted["Baseline"]["template"], granted["Grants"]["template"]

    def key_policy(template: dict) -> dict:
        (key,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::KMS::Key"]
        return key["Properties"]["KeyPolicy"]

    assert key_policy(grants) == key_policy(baseline)
    types = {resource["Type"] for resource in grants["Resources"].values()}
    assert "AWS::SecretsManager::ResourcePolicy" not in types
