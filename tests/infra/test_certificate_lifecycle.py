"""The certificate lifecycle in each Secrets stack: functions, rotation schedules, IAM exactness.

Bundling is off in the session app (conftest); `test_real_bundle_*` builds the asset for real.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from runtime import lifecycle, names
from runtime.service_catalog import DEFAULT_CATALOG

pytestmark = pytest.mark.infra

ENVIRONMENTS = pytest.mark.parametrize("env", names.ENVIRONMENTS)
HANDLERS = {
    "issuance": "runtime.lifecycle.issuance.handler",
    "rotation": "runtime.lifecycle.rotation.handler",
    "ca_rotation": "runtime.lifecycle.ca_rotation.handler",
    "expiry": "runtime.lifecycle.expiry.handler",
}


def by_type(template, kind: str) -> dict:
    return template.find_resources(kind)


def logical_id(construct) -> str:
    from aws_cdk import Stack

    return Stack.of(construct).resolve(Stack.of(construct).get_logical_id(construct.node.default_child))


def role_statements(template: dict, function) -> list[dict]:
    """Every statement of every policy attached to the function's role, Sids and order aside."""
    role_id = logical_id(function.role)
    statements = []
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role_id} in resource["Properties"]["Roles"]:
            statements += resource["Properties"]["PolicyDocument"]["Statement"]
    role = template["Resources"][role_id]["Properties"]
    assert "ManagedPolicyArns" not in role and "Policies" not in role
    return statements


def granted(statements: list[dict]) -> dict[str, set[str]]:
    """secret logical id -> the secretsmanager actions on it."""
    out: dict[str, set[str]] = {}
    for statement in statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = (
            statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        )
        for action in actions:
            if action.startswith("secretsmanager:"):
                for resource in resources:
                    out.setdefault(resource["Ref"], set()).add(action)
    return out


def secret_ids(stage) -> dict[str, str]:
    """The secrets the lifecycle manages, by suffix or identity name: every one but `ca-crl`."""
    certificates = stage.secrets.certificates
    ids = {
        "ca-key": logical_id(certificates.ca_key),
        "ca-cert": logical_id(certificates.ca_bundle),
        "ca-key-next": logical_id(certificates.ca_key_next),
    }
    ids.update({name: logical_id(secret) for name, secret in certificates.identities.items()})
    return ids


@ENVIRONMENTS
def test_functions_run_python_3_13_with_the_runtime_handlers(secrets_templates, env):
    functions = by_type(secrets_templates[env], "AWS::Lambda::Function")
    python = {
        k: f["Properties"] for k, f in functions.items() if f["Properties"]["Runtime"].startswith("python")
    }
    handlers = sorted(p["Handler"] for p in python.values())
    expected = [
        HANDLERS["expiry"],
        HANDLERS["issuance"],
        HANDLERS["ca_rotation"],
        *[HANDLERS["rotation"]] * 3,
    ]
    assert handlers == sorted(expected)
    for properties in python.values():
        assert properties["Runtime"] == "python3.13"
        assert properties["Architectures"] == ["x86_64"]


@ENVIRONMENTS
def test_issuance_custom_resource_gets_the_settings_and_waits_for_every_secret(
    stages, secrets_templates, env
):
    settings = stages[env].settings
    (resource,) = by_type(secrets_templates[env], "Custom::HokusaiMtlsCertificates").values()
    properties = dict(resource["Properties"])
    properties.pop("ServiceToken")
    assert properties == {
        "Environment": env,
        "LeafLifetimeHours": str(settings.leaf_lifetime_hours),
        "ServerSans": list(settings.server_sans),
        "KeyType": settings.key_type,
        "CaSource": settings.ca_source,
        "Identities": [identity.name for identity in names.IDENTITIES],
    }
    assert sorted(resource["DependsOn"]) == sorted(secret_ids(stages[env]).values())


@ENVIRONMENTS
def test_every_identity_secret_has_a_rotation_schedule_with_its_own_function(stages, secrets_templates, env):
    stage, template = stages[env], secrets_templates[env]
    lifecycle_construct = stage.secrets.lifecycle
    schedules = by_type(template, "AWS::SecretsManager::RotationSchedule")
    ids = secret_ids(stage)
    by_secret = {s["Properties"]["SecretId"]["Ref"]: s for s in schedules.values()}
    assert set(by_secret) == set(ids.values())  # every managed secret, the CA's too: no SMG4 acknowledgment
    custom_id = logical_id(lifecycle_construct.certificates_resource)
    permissions = by_type(template, "AWS::Lambda::Permission")
    for identity in names.IDENTITIES:
        schedule = by_secret[ids[identity.name]]
        function_id = logical_id(lifecycle_construct.rotation[identity.name])
        assert schedule["Properties"]["RotationLambdaARN"] == {"Fn::GetAtt": [function_id, "Arn"]}
        expected_rate = {
            "development": "rate(2 days)",
            "staging": "rate(8 hours)",
            "production": "rate(8 hours)",
        }
        assert schedule["Properties"]["RotationRules"] == {
            "ScheduleExpression": expected_rate[env],
            "Duration": "1h",  # the window: a leaf is renewed within rotationHours + 1 of the last
        }
        assert schedule["Properties"]["RotateImmediatelyOnUpdate"] is False
        assert custom_id in schedule["DependsOn"]
        (invoke,) = [
            p["Properties"]
            for p in permissions.values()
            if p["Properties"]["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
        ]
        assert invoke["Principal"] == "secretsmanager.amazonaws.com"
        assert invoke["SourceArn"] == {"Ref": ids[identity.name]}
        variables = template.to_json()["Resources"][function_id]["Properties"]["Environment"]["Variables"]
        assert variables[lifecycle.ENV_LEAF_LIFETIME_HOURS] == str(stage.settings.leaf_lifetime_hours)
        assert variables[lifecycle.ENV_KEY_TYPE] == stage.settings.key_type


@ENVIRONMENTS
def test_the_ca_secrets_rotate_every_wait_period_with_the_ca_rotation_function(
    stages, secrets_templates, env
):
    stage, template = stages[env], secrets_templates[env]
    lc = stage.secrets.lifecycle
    ids = secret_ids(stage)
    function_id = logical_id(lc.ca_rotation)
    schedules = {
        s["Properties"]["SecretId"]["Ref"]: s["Properties"]
        for s in by_type(template, "AWS::SecretsManager::RotationSchedule").values()
    }
    invokes = {
        p["Properties"]["SourceArn"]["Ref"]
        for p in by_type(template, "AWS::Lambda::Permission").values()
        if p["Properties"]["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
    }
    ca_secrets = {ids["ca-key-next"], ids["ca-key"], ids["ca-cert"]}
    assert invokes == ca_secrets
    for secret_id in ca_secrets:
        assert schedules[secret_id]["RotationLambdaARN"] == {"Fn::GetAtt": [function_id, "Arn"]}
        assert schedules[secret_id]["RotationRules"] == {
            "AutomaticallyAfterDays": stage.settings.ca_rollover_wait_days
        }
    variables = template.to_json()["Resources"][function_id]["Properties"]["Environment"]["Variables"]
    assert variables == {
        lifecycle.ENV_CA_SOURCE: stage.settings.ca_source,
        lifecycle.ENV_CA_ROLLOVER_START_DAYS: str(stage.settings.ca_rollover_start_days),
        lifecycle.ENV_CA_ROLLOVER_WAIT_DAYS: str(stage.settings.ca_rollover_wait_days),
        lifecycle.ENV_LEAF_LIFETIME_HOURS: str(stage.settings.leaf_lifetime_hours),
        names.ENV_SERVICES: DEFAULT_CATALOG.to_json(),
    }


@ENVIRONMENTS
def test_the_monitoring_stack_watches_every_rotation_function_by_its_deployed_name(
    stages, secrets_templates, env
):
    """The rotation alarms name functions as strings (no cross-stack export): they must be these."""
    template = secrets_templates[env].to_json()
    lc = stages[env].secrets.lifecycle
    deployed = {
        resource["Properties"]["FunctionName"]
        for logical, resource in template["Resources"].items()
        if logical in {logical_id(f) for f in (lc.ca_rotation, *lc.rotation.values())}
    }
    alarms = stages[env].monitoring.alarms.rotation_failures.values()
    watched = {alarm.node.default_child.dimensions[0].value for alarm in alarms}
    assert watched == deployed and len(deployed) == len(names.IDENTITIES) + 1


@ENVIRONMENTS
def test_every_lifecycle_log_group_is_encrypted_with_its_own_key(stages, secrets_templates, env):
    template = secrets_templates[env].to_json()
    log_key = logical_id(stages[env].secrets.lifecycle.log_key.key)
    groups = [r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::Logs::LogGroup"]
    assert len(groups) == 7  # issuance, its provider, expiry, CA rotation, three identity rotations
    for group in groups:
        assert group["KmsKeyId"] == {"Fn::GetAtt": [log_key, "Arn"]}
        assert group["LogGroupName"].startswith(f"/hokusai/{env}/lifecycle/")
        assert group["RetentionInDays"] == stages[env].settings.log_retention_days


@ENVIRONMENTS
def test_each_function_holds_exactly_its_secrets(stages, secrets_templates, env):
    stage = stages[env]
    template = secrets_templates[env].to_json()
    ids = secret_ids(stage)
    lc = stage.secrets.lifecycle
    issue = {"secretsmanager:GetSecretValue", "secretsmanager:PutSecretValue"}
    read = {"secretsmanager:GetSecretValue"}
    rotate = {
        "secretsmanager:DescribeSecret",
        "secretsmanager:GetSecretValue",
        "secretsmanager:PutSecretValue",
        "secretsmanager:UpdateSecretVersionStage",
    }
    assert granted(role_statements(template, lc.issuance)) == dict.fromkeys(ids.values(), issue)
    assert granted(role_statements(template, lc.ca_rotation)) == {
        **{ids[ca]: rotate for ca in ("ca-key-next", "ca-key", "ca-cert")},
        **{ids[identity.name]: issue for identity in names.IDENTITIES},
    }
    for identity in names.IDENTITIES:
        assert granted(role_statements(template, lc.rotation[identity.name])) == {
            ids[identity.name]: rotate,
            ids["ca-key"]: read,
            ids["ca-cert"]: read,
        }
    assert granted(role_statements(template, lc.expiry)) == {
        ids["ca-cert"]: read,
        **{ids[identity.name]: read for identity in names.IDENTITIES},
    }


@ENVIRONMENTS
def test_the_revocation_lists_are_outside_the_lifecycle(stages, secrets_templates, env):
    """`ca-crl` is written by an operator's `certs revoke` only: no rotation schedule or invoke permission
    names it, no lifecycle role holds anything on it, the issuance custom resource does not wait for it;
    every other certificate secret still rotates."""
    stage, template = stages[env], secrets_templates[env]
    certificates = stage.secrets.certificates
    crl = logical_id(certificates.ca_revocations)
    assert template.to_json()["Resources"][crl]["Properties"]["Name"] == names.secret_name(
        env, names.CA_REVOCATIONS_SECRET
    )
    schedules = by_type(template, "AWS::SecretsManager::RotationSchedule").values()
    rotated = {s["Properties"]["SecretId"]["Ref"] for s in schedules}
    assert crl not in rotated
    assert rotated == {
        logical_id(s) for s in certificates.all_secrets if s is not certificates.ca_revocations
    }
    permissions = by_type(template, "AWS::Lambda::Permission").values()
    assert crl not in json.dumps([p["Properties"] for p in permissions])
    policies = by_type(template, "AWS::IAM::Policy").values()
    assert crl not in json.dumps([p["Properties"]["PolicyDocument"] for p in policies])
    (resource,) = by_type(template, "Custom::HokusaiMtlsCertificates").values()
    assert crl not in resource["DependsOn"]


@ENVIRONMENTS
def test_only_issuance_and_ca_rotation_write_ca_key(stages, secrets_templates, env):
    stage = stages[env]
    template = secrets_templates[env].to_json()
    ca_key = secret_ids(stage)["ca-key"]
    writers = set()
    for policy_id, resource in template["Resources"].items():
        if resource["Type"] != "AWS::IAM::Policy":
            continue
        for statement in resource["Properties"]["PolicyDocument"]["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            resources = json.dumps(statement["Resource"])
            if ca_key in resources and any(a != "secretsmanager:GetSecretValue" for a in actions):
                writers.update(r["Ref"] for r in resource["Properties"]["Roles"])
            assert statement["Resource"] != "*" or actions == ["cloudwatch:PutMetricData"], policy_id
    lc = stage.secrets.lifecycle
    assert writers == {logical_id(lc.issuance.role), logical_id(lc.ca_rotation.role)}


@ENVIRONMENTS
def test_kms_through_secrets_manager_only_and_metrics_in_our_namespace_only(stages, secrets_templates, env):
    template = secrets_templates[env].to_json()
    lc = stages[env].secrets.lifecycle
    for function in (lc.issuance, lc.expiry, lc.ca_rotation, *lc.rotation.values()):
        for statement in role_statements(template, function):
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            if any(a.startswith("kms:") for a in actions):
                assert "kms:ViaService" in statement["Condition"]["StringEquals"]
            if "cloudwatch:PutMetricData" in actions:
                assert function is lc.expiry
                assert statement["Condition"] == {
                    "StringEquals": {"cloudwatch:namespace": names.METRIC_NAMESPACE}
                }


@ENVIRONMENTS
def test_expiry_check_runs_every_hour_for_its_environment(stages, secrets_templates, env):
    template = secrets_templates[env]
    (rule,) = by_type(template, "AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == "rate(1 hour)"
    expiry_id = logical_id(stages[env].secrets.lifecycle.expiry)
    assert rule["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [expiry_id, "Arn"]}
    variables = template.to_json()["Resources"][expiry_id]["Properties"]["Environment"]["Variables"]
    assert variables == {names.ENV_ENVIRONMENT: env, names.ENV_SERVICES: DEFAULT_CATALOG.to_json()}


def test_rotation_must_renew_a_leaf_before_half_its_life(cdk_json_settings):
    from stacks.settings import SettingsError, load_settings

    raw = json.loads(json.dumps(cdk_json_settings))
    raw["staging"]["rotationHours"] = 12  # 24-hour leaves: 12 + the 1-hour window is past half-life
    with pytest.raises(SettingsError, match=r"staging\.rotationHours: 12 is too slow.*use at most 8"):
        load_settings(raw)
    raw["staging"].update(leafLifetimeHours=48, rotationHours=12)
    assert load_settings(raw)["staging"].rotation_hours == 12


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"caSource": "borrowed"}, r"staging\.caSource: .*borrowed"),
        ({"caRolloverWaitDays": 0}, r"staging\.caRolloverWaitDays: 0 is outside 1\.\.90"),
        (
            {"caRolloverStartDays": 88},
            r"staging\.caRolloverStartDays: 88 is too late.*retire the old CA.*at least 89",
        ),
        (
            {"leafLifetimeHours": 90 * 24, "caRolloverStartDays": 100},
            r"staging\.caRolloverStartDays: 100 is too late.*outlive a leaf.*at least 112",
        ),
        ({"caRolloverStartDays": 1825}, r"staging\.caRolloverStartDays: 1825 is outside 1\.\.1824"),
    ],
)
def test_ca_rollover_settings_are_checked(cdk_json_settings, changes, message):
    from stacks.settings import SettingsError, load_settings

    raw = json.loads(json.dumps(cdk_json_settings))
    # 7-day wait: begin >= 60 + 4 x 7 + 1 days out (done before the CA alarm), with 90-day leaves >= 112
    raw["staging"].update(changes)
    with pytest.raises(SettingsError, match=message):
        load_settings(raw)


def test_ca_rollover_is_done_before_the_ca_alarm_by_default(cdk_json_settings):
    from stacks.settings import load_settings

    settings = load_settings(cdk_json_settings)
    # 60 days (the CA alarm) + 5 waits of 7 days + the leaf lifetime in days (1; a week in development)
    assert [settings[env].ca_rollover_start_days for env in names.ENVIRONMENTS] == [102, 96, 96]
    for env in names.ENVIRONMENTS:
        assert settings[env].ca_source == lifecycle.CA_SOURCE_ISSUED


def test_key_types_are_the_runtime_key_types():
    from runtime.certificates.issuance import KeyType
    from stacks.settings import KEY_TYPES

    assert set(KEY_TYPES) == {key.value for key in KeyType}


def test_asset_hash_follows_runtime_sources_and_the_lock(tmp_path, monkeypatch):
    from constructs_lib import lambda_bundle

    first = lambda_bundle.asset_hash()
    assert lambda_bundle.asset_hash() == first
    lock = tmp_path / "requirements.lock"
    lock.write_text(lambda_bundle.LOCK_FILE.read_text() + "six==1.17.0\n")
    monkeypatch.setattr(lambda_bundle, "LOCK_FILE", lock)
    assert lambda_bundle.asset_hash() != first


@pytest.mark.slow
def test_real_bundle_has_cp313_manylinux_x86_64_cryptography_and_the_runtime(tmp_path):
    """Runs the ILocalBundling for real (pip installs from .wheels/lambda, no index): no Docker anywhere."""
    import aws_cdk as cdk
    from aws_cdk import aws_lambda as lambda_

    from constructs_lib import lambda_bundle

    bindir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    app = cdk.App(outdir=str(tmp_path / "out"))  # bundling on: no aws:cdk:bundling-stacks
    stack = cdk.Stack(app, "Bundle")
    function = lambda_.Function(
        stack,
        "Fn",
        runtime=lambda_bundle.PYTHON_RUNTIME,
        handler=HANDLERS["rotation"],
        code=lambda_bundle.lifecycle_code(),
    )
    assert function.runtime.name == "python3.13"
    app.synth()
    (asset,) = [p for p in (tmp_path / "out").glob("asset.*") if p.is_dir()]
    assert (asset / "runtime" / "lifecycle" / "rotation.py").is_file()
    assert not list(asset.rglob("__pycache__"))
    (dist_info,) = asset.glob("cryptography-*.dist-info")
    tags = [
        line.split(": ", 1)[1]
        for line in (dist_info / "WHEEL").read_text().splitlines()
        if line.startswith("Tag: ")
    ]
    # cryptography ships abi3 wheels (cp311-abi3: any CPython >= 3.11, so 3.13 too) for manylinux x86_64.
    assert tags and all(t.split("-")[2].startswith("manylinux") and t.endswith("x86_64") for t in tags)
    assert all(t.split("-")[1] == "abi3" and int(t.split("-")[0][2:]) <= 313 for t in tags)
    assert (asset / "cryptography" / "hazmat" / "bindings" / "_rust.abi3.so").is_file()
    (cffi_so,) = asset.glob("_cffi_backend.*.so")
    assert cffi_so.name == "_cffi_backend.cpython-313-x86_64-linux-gnu.so"
