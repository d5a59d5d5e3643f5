"""`apiKeyStore`: the key store's URL secret and the hashing secret reach the api's container and nothing else.

An app of its own (cdk.json sets `apiKeyStore` nowhere): development, whose `removalPolicy` is
`destroy`, with the store and a Redis URL secret, so the least-privilege checks see secrets that
mlflow's execution role does read next to the two it must not.

Who may read a secret is decided from the templates alone: every IAM statement of every role in
every stack of the stage, its actions and resources rendered to strings and matched against the
secret's ARN as IAM matches wildcards (`*`, `?`), so a grant by pattern counts as well as one by name.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runtime import names
from stacks.settings import CONTEXT_KEY, load_settings
from tests.support.cfn import (
    as_list,
    container,
    environment_of,
    ref_id,
    resolve_output,
    resources,
    role_statements,
    tasks_by_role,
)
from tests.support.nag import nag_findings

pytestmark = pytest.mark.infra

ENV = "development"
URL_SECRET = "hokusai/development/api-key-store-url"
REDIS_SECRET = "hokusai/development/redis-url"
RETENTION_DAYS = 30
HASH_SECRET = names.key_hash_secret_name(ENV)

REGION, ACCOUNT, SUFFIX = "eu-west-1", "123456789012", "AbCdEf"
"""What the rendered ARNs use for the pseudo parameters and the six characters Secrets Manager appends."""
PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::Region": REGION,
    "AWS::AccountId": ACCOUNT,
    "AWS::URLSuffix": "amazonaws.com",
}
READ_ACTION = "secretsmanager:GetSecretValue"
LAMBDA_BASIC = {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"}
"""The only managed policy any role here has (logs only): managed policies are not otherwise followed."""


def store_settings_context(context: dict) -> dict:
    raw = copy.deepcopy(context[CONTEXT_KEY])
    raw[ENV]["apiKeyStore"] = {"urlSecretName": URL_SECRET, "usageRetentionDays": RETENTION_DAYS}
    raw[ENV]["redisUrlSecretName"] = REDIS_SECRET
    return raw


@pytest.fixture(scope="module")
def store_settings(cdk_context):
    return load_settings(store_settings_context(cdk_context))[ENV]


@pytest.fixture(scope="module")
def store_app(tmp_path_factory, cdk_context, store_settings):
    import aws_cdk as cdk
    from cdk_nag import AwsSolutionsChecks

    from stacks.stage import HokusaiStage

    app = cdk.App(context=cdk_context, outdir=str(tmp_path_factory.mktemp("key-store.out")))
    stage = HokusaiStage(app, settings=store_settings)
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app, stage


@pytest.fixture(scope="module")
def store_assembly(store_app):
    """Synthesized once: the registered cdk-nag plugin raises here on a finding."""
    app, _ = store_app
    return app.synth()


@pytest.fixture(scope="module")
def stage(store_app):
    return store_app[1]


@pytest.fixture(scope="module")
def templates(stage) -> dict[str, dict]:
    """stack name -> template, every stack of the stage."""
    from aws_cdk.assertions import Template

    stacks = [stage.secrets, stage.network, stage.services, stage.monitoring]
    return {stack.stack_name: Template.from_stack(stack).to_json() for stack in stacks}


@pytest.fixture(scope="module")
def secrets_template(stage, templates) -> dict:
    return templates[stage.secrets.stack_name]


@pytest.fixture(scope="module")
def services_template(stage, templates) -> dict:
    return templates[stage.services.stack_name]


def hash_secret_resource(template: dict) -> tuple[str, dict]:
    (found,) = [
        (logical_id, secret)
        for logical_id, secret in resources(template, "AWS::SecretsManager::Secret").items()
        if secret["Properties"]["Name"] == HASH_SECRET
    ]
    return found


# --- the hashing secret --------------------------------------------------------------------------


def test_the_stage_synthesizes_and_passes_cdk_nag(store_app, store_assembly, stage):
    app, _ = store_app
    (nested,) = store_assembly.nested_assemblies
    assert len(nested.nested_assembly.stacks) == 4
    for stack in (stage.secrets, stage.services):
        assert nag_findings(app, stack) == [], stack.stack_name


def test_the_hashing_secret_is_generated_under_the_certificates_key_with_its_name_from_runtime_names(
    secrets_template,
):
    _, secret = hash_secret_resource(secrets_template)
    properties = secret["Properties"]
    assert properties["Name"] == "hokusai/development/api-keys/hash-secret"
    # Pinned: CloudFormation generates a NEW value when GenerateSecretString changes (every key invalid).
    assert properties["GenerateSecretString"] == {
        "ExcludePunctuation": True,
        "IncludeSpace": False,
        "PasswordLength": 64,
    }
    assert "SecretString" not in properties
    (key_id,) = [
        logical_id
        for logical_id, key in resources(secrets_template, "AWS::KMS::Key").items()
        if "certificate secrets" in key["Properties"]["Description"]
    ]
    assert properties["KmsKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}


def test_the_hashing_secret_is_kept_even_where_the_removal_policy_is_destroy(
    store_settings, secrets_template
):
    assert store_settings.removal_policy == "destroy"
    _, secret = hash_secret_resource(secrets_template)
    assert (secret["DeletionPolicy"], secret["UpdateReplacePolicy"]) == ("RetainExceptOnCreate", "Retain")
    certificates = [
        s for s in resources(secrets_template, "AWS::SecretsManager::Secret").values() if s is not secret
    ]
    assert {s["DeletionPolicy"] for s in certificates} == {"Delete"}, "the rest follows removalPolicy"
    # The key that encrypts it is kept too (a kept secret without its key could not be read); the
    # lifecycle logs' key still follows removalPolicy.
    keys = {
        "secrets" if "certificate secrets" in key["Properties"]["Description"] else "logs": key
        for key in resources(secrets_template, "AWS::KMS::Key").values()
    }
    assert (keys["secrets"]["DeletionPolicy"], keys["secrets"]["UpdateReplacePolicy"]) == (
        "RetainExceptOnCreate",
        "Retain",
    )
    assert keys["logs"]["DeletionPolicy"] == "Delete"


def test_the_hashing_secret_keeps_its_logical_id(secrets_template):
    """A new logical id would make CloudFormation create a second secret of the same name (the update
    fails) and leave the old one behind: the construct's id and path are part of the contract."""
    logical_id, _ = hash_secret_resource(secrets_template)
    assert logical_id == "ApiKeyHashSecret9D9BF799"


def test_the_hashing_secret_has_no_rotation_and_no_resource_policy(secrets_template):
    logical_id, _ = hash_secret_resource(secrets_template)
    rotated = {
        ref_id(schedule["Properties"]["SecretId"])
        for schedule in resources(secrets_template, "AWS::SecretsManager::RotationSchedule").values()
    }
    assert rotated, "the certificate secrets rotate"
    assert logical_id not in rotated
    for template_type in (
        "AWS::SecretsManager::ResourcePolicy",
        "AWS::SecretsManager::SecretTargetAttachment",
    ):
        assert resources(secrets_template, template_type) == {}, template_type


def test_only_the_hashing_secret_is_added(secrets_template):
    found = {
        s["Properties"]["Name"] for s in resources(secrets_template, "AWS::SecretsManager::Secret").values()
    }
    certificates = {
        names.secret_name(ENV, s)
        for s in (
            names.CA_BUNDLE_SECRET,
            names.CA_KEY_SECRET,
            names.CA_NEXT_SECRET,
            names.CA_REVOCATIONS_SECRET,
        )
    }
    certificates |= {names.identity_secret_name(ENV, identity) for identity in names.IDENTITIES}
    assert found == certificates | {HASH_SECRET}


def test_the_hashing_secret_is_outside_every_prefix_the_certificates_use():
    for env in names.ENVIRONMENTS:
        name = names.key_hash_secret_name(env)
        assert name == f"hokusai/{env}/api-keys/hash-secret"
        assert not name.startswith(names.secret_prefix(env))
        assert name.startswith(names.api_keys_secret_prefix(env))


def test_a_generated_value_is_a_hashing_secret_the_runtime_accepts():
    """64 letters and digits (what GenerateSecretString asks for) read as base64: 48 bytes, above 32."""
    from constructs_lib.key_hash_secret import SECRET_LENGTH
    from runtime.keys.hashing import MIN_SECRET_BYTES
    from runtime.keys.opening import hash_secret

    alphabet = string.ascii_letters + string.digits
    for _ in range(20):
        value = "".join(secrets.choice(alphabet) for _ in range(SECRET_LENGTH))
        assert len(hash_secret(value)) >= MIN_SECRET_BYTES


# --- containers ------------------------------------------------------------------------------------


def injected(task: dict) -> dict[str, Any]:
    return {secret["Name"]: secret["ValueFrom"] for secret in container(task).get("Secrets", [])}


def test_only_the_api_container_gets_the_store_url_and_the_hashing_secret(services_template, templates):
    tasks = tasks_by_role(services_template)
    expected = {
        names.SERVER.role: {names.ENV_MLFLOW_BACKEND_STORE_URI, names.ENV_REDIS_URL},
        names.API.role: {names.ENV_REDIS_URL, names.ENV_KEY_STORE_URL, names.ENV_KEY_HASH_SECRET},
        names.WORKER.role: set(),
    }
    assert {role: set(injected(task)) for role, (_, task) in tasks.items()} == expected
    api = injected(tasks[names.API.role][1])
    assert f":secret:{URL_SECRET}" in json.dumps(api[names.ENV_KEY_STORE_URL])
    stack_name, value = resolve_output(api[names.ENV_KEY_HASH_SECRET], templates)
    secret = templates[stack_name]["Resources"][ref_id(value)]
    assert secret["Properties"]["Name"] == HASH_SECRET
    for role, (_, task) in tasks.items():
        variables = environment_of(task)
        assert not {names.ENV_KEY_STORE_URL, names.ENV_KEY_HASH_SECRET} & set(variables), role


def test_the_usage_retention_reaches_the_api_only_in_the_form_the_runtime_reads(services_template):
    import datetime as dt

    from runtime.keys.usage import retention_from_environ

    for role, (_, task) in tasks_by_role(services_template).items():
        variables = environment_of(task)
        if role != names.API.role:
            assert names.ENV_KEY_USAGE_RETENTION_DAYS not in variables, role
            continue
        assert variables[names.ENV_KEY_USAGE_RETENTION_DAYS] == str(RETENTION_DAYS)
        assert retention_from_environ(variables) == dt.timedelta(days=RETENTION_DAYS)


def test_the_settings_bound_on_retention_is_the_runtimes():
    from runtime.keys import usage
    from stacks.settings_services import MAX_KEY_USAGE_RETENTION_DAYS

    assert MAX_KEY_USAGE_RETENTION_DAYS == usage.MAX_RETENTION_DAYS


# --- least privilege: every role of every stack ------------------------------------------------------


def render(expression: Any, templates: dict[str, dict], template: dict) -> str:
    """A policy's resource as a string: pseudo parameters filled in, cross-stack outputs followed,
    references to secrets as their ARN; anything else as a placeholder that matches nothing real."""
    if isinstance(expression, str):
        return expression
    if isinstance(expression, dict):
        if "Fn::GetStackOutput" in expression:
            stack_name, value = resolve_output(expression, templates)
            return render(value, templates, templates[stack_name])
        if "Fn::Join" in expression:
            separator, parts = expression["Fn::Join"]
            return separator.join(render(part, templates, template) for part in parts)
        if "Fn::Sub" in expression and isinstance(expression["Fn::Sub"], str):
            return re.sub(r"\$\{([^}]+)\}", lambda m: PSEUDO.get(m[1], f"<{m[1]}>"), expression["Fn::Sub"])
        if "Ref" in expression:
            target = expression["Ref"]
            if target in PSEUDO:
                return PSEUDO[target]
            resource = template["Resources"].get(target, {})
            if resource.get("Type") == "AWS::SecretsManager::Secret":
                return secret_arn(resource["Properties"]["Name"])
            return f"<ref:{target}>"
        if "Fn::GetAtt" in expression:
            return f"<getatt:{'.'.join(expression['Fn::GetAtt'])}>"
    return f"<{json.dumps(expression)}>"


def secret_arn(name: str) -> str:
    return f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{name}-{SUFFIX}"


def iam_matches(pattern: str, value: str, *, case_sensitive: bool) -> bool:
    """IAM's wildcards: `*` any run of characters, `?` exactly one; nothing else is special."""
    regex = ".*".join(".".join(re.escape(piece) for piece in part.split("?")) for part in pattern.split("*"))
    return re.fullmatch(regex, value, 0 if case_sensitive else re.IGNORECASE) is not None


def can_read(statement: dict, arn: str, templates: dict[str, dict], template: dict) -> bool:
    """Whether an Allow statement lets its principal GetSecretValue on `arn` (NotAction or NotResource:
    assume it does)."""
    if statement["Effect"] != "Allow":
        return False
    if "NotAction" in statement or "NotResource" in statement:
        return True
    actions = as_list(statement["Action"])
    if not any(iam_matches(action, READ_ACTION, case_sensitive=False) for action in actions):
        return False
    return any(
        iam_matches(render(resource, templates, template), arn, case_sensitive=True)
        for resource in as_list(statement["Resource"])
    )


def readers(templates: dict[str, dict], arn: str) -> set[tuple[str, str]]:
    """(stack name, role logical id) of every role that may read `arn`."""
    found = set()
    for stack_name, template in templates.items():
        assert resources(template, "AWS::IAM::ManagedPolicy") == {}, stack_name
        assert resources(template, "AWS::IAM::User") == resources(template, "AWS::IAM::Group") == {}
        for role_id, role in resources(template, "AWS::IAM::Role").items():
            for managed in role["Properties"].get("ManagedPolicyArns", []):
                assert managed == LAMBDA_BASIC, (stack_name, role_id, managed)
            statements = role_statements(template, role_id)
            if any(can_read(s, arn, templates, template) for s in statements):
                found.add((stack_name, role_id))
    return found


def execution_roles(stage, services_template) -> dict[str, tuple[str, str]]:
    """role (`HOKUSAI_MTLS_ROLE`) -> (stack name, its execution role's logical id)."""
    return {
        role: (stage.services.stack_name, ref_id(task["Properties"]["ExecutionRoleArn"]))
        for role, (_, task) in tasks_by_role(services_template).items()
    }


def test_the_matcher_finds_the_readers_it_should(stage, templates, services_template, store_settings):
    """Positive controls: the secrets that are granted (by name, by ARN through an output) are found
    on exactly their roles, and IAM's wildcards match as IAM matches them."""
    execution = execution_roles(stage, services_template)
    assert readers(templates, secret_arn(REDIS_SECRET)) == {
        execution[names.SERVER.role],
        execution[names.API.role],
    }
    backend = store_settings.mlflow.backend_store_secret_name
    assert readers(templates, secret_arn(backend)) == {execution[names.SERVER.role]}
    api_identity = readers(templates, secret_arn(names.identity_secret_name(ENV, names.API)))
    _, api_task = tasks_by_role(services_template)[names.API.role]
    assert (stage.services.stack_name, ref_id(api_task["Properties"]["TaskRoleArn"])) in api_identity
    hash_arn = secret_arn(HASH_SECRET)
    assert iam_matches("arn:aws:secretsmanager:*:*:secret:hokusai/*", hash_arn, case_sensitive=True)
    assert not iam_matches(
        f"arn:aws:secretsmanager:*:*:secret:hokusai/{ENV}/mlflow/*", hash_arn, case_sensitive=True
    )
    assert iam_matches("secretsmanager:get*", READ_ACTION, case_sensitive=False)
    assert iam_matches("a[b]", "a[b]", case_sensitive=True), "no character classes in IAM"
    url_pattern = f"arn:aws:secretsmanager:*:*:secret:{URL_SECRET}-??????"
    assert iam_matches(url_pattern, secret_arn(URL_SECRET), case_sensitive=True)
    assert not iam_matches(url_pattern, secret_arn(URL_SECRET + "-old"), case_sensitive=True)


@pytest.mark.parametrize("secret", [HASH_SECRET, URL_SECRET], ids=["hash-secret", "url-secret"])
def test_only_the_api_execution_role_can_read_the_store_secrets(stage, templates, services_template, secret):
    """No task role (not even the api's), no other execution role, no Lambda of the lifecycle."""
    assert readers(templates, secret_arn(secret)) == {
        execution_roles(stage, services_template)[names.API.role]
    }


def test_only_the_api_execution_role_decrypts_and_only_through_secrets_manager(
    stage, templates, services_template
):
    for role, (_, role_id) in execution_roles(stage, services_template).items():
        statements = role_statements(services_template, role_id)
        kms = [s for s in statements if any(a.startswith("kms:") for a in as_list(s["Action"]))]
        if role != names.API.role:
            assert kms == [], role
            continue
        (statement,) = kms
        assert statement["Action"] == "kms:Decrypt"
        stack_name, value = resolve_output(statement["Resource"], templates)
        key = templates[stack_name]["Resources"][ref_id(value)]
        assert key["Type"] == "AWS::KMS::Key" and "certificate secrets" in key["Properties"]["Description"]
        assert statement["Condition"] == {
            "StringEquals": {
                "kms:ViaService": {
                    "Fn::Join": ["", ["secretsmanager.", {"Ref": "AWS::Region"}, ".amazonaws.com"]]
                }
            }
        }


def test_the_key_policy_names_no_role_of_the_services_stack(stage, secrets_template):
    """The decrypt grant is on the role: the Secrets stack refers to nothing of the Services stack."""
    text = json.dumps(secrets_template)
    assert "Fn::GetStackOutput" not in text
    assert stage.services.stack_name not in text


@pytest.mark.slow
def test_the_templates_pass_cfn_lint(store_assembly):
    """`DeletionPolicy: RetainExceptOnCreate` included."""
    paths = [
        stack.template_full_path
        for nested in store_assembly.nested_assemblies
        for stack in nested.nested_assembly.stacks
    ]
    assert len(paths) == 4
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), "--format", "parseable", *paths],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
