"""Services are data (issue 15): seed 003's five services declared next to ours in cdk.json synthesize,
cdk-nag clean, with their own identity secret, rotation, alarms, dashboard row, task, security group,
Cloud Map name and least privilege: adding a service is a cdk.json edit.

The expected sets below are written out by hand from the declaration (who calls whom), not computed
by the code under test.
"""

from __future__ import annotations

import copy
import json

import pytest

from runtime import names
from runtime.service_catalog import catalog_from_environ
from stacks.settings import CONTEXT_KEY, SERVICES_KEY, SettingsError, load_services, load_settings
from tests.support.cfn import (
    as_list,
    container,
    environment_of,
    ingress_rules,
    ref_id,
    resolve_output,
    resources,
    role_statements,
    security_group_of,
    statements_with,
    tasks_by_role,
)
from tests.support.nag import nag_findings

pytestmark = pytest.mark.infra

ENV = "staging"
ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
OURS = {
    "mlflow": {
        "runtime": "mlflow",
        "serves": "mtls",
        "port": 5000,
        "callers": ["api", "worker", "email-parser"],
        "identity": "server",
        "role": "mlflow-server",
    },
    "api": {"runtime": "api", "serves": "proxied", "port": 8000},
    "worker": {},
}
BASE = {**OURS, "mlflow": {**OURS["mlflow"], "callers": ["api", "worker"]}}
"""Our three as declared by default: the start of every refused declaration below."""
SEED_003 = {
    "document-converter": {
        "serves": "mtls",
        "port": 8443,
        "callers": ["api", "worker"],
        "image": {"uri": f"{ECR}/document-converter:1.4.2"},
        "desiredCount": 2,
    },
    "email-classifier": {
        "serves": "mtls",
        "port": 8443,
        "callers": ["api", "email-parser"],
        "image": {"uri": f"{ECR}/email-classifier:2.0.0"},
        "taskSize": {"cpu": 1024, "memoryMiB": 4096},
    },
    "streaming": {
        "serves": "mtls",
        "port": 9443,
        "callers": ["worker"],
        "image": {"uri": "ghcr.io/hokusai/streaming:0.9.1"},
    },
    "image-classifier": {
        "serves": "mtls",
        "port": 8443,
        "callers": ["document-converter"],
        "image": {"uri": f"{ECR}/image-classifier:3.1.0"},
    },
    "email-parser": {"image": {"uri": f"{ECR}/email-parser:1.0.0"}},
}
DECLARATION = {**OURS, **SEED_003}

# role -> (identity name, the secret suffix) and who reaches whose port, by hand.
IDENTITY_OF_ROLE = {
    "mlflow-server": "server",
    "api": "api",
    "worker": "worker",
    "document-converter": "document-converter",
    "email-classifier": "email-classifier",
    "streaming": "streaming",
    "image-classifier": "image-classifier",
    "email-parser": "email-parser",
}
REACHES = {
    ("mlflow-server", 5000): {"api", "worker", "email-parser"},
    ("document-converter", 8443): {"api", "worker"},
    ("email-classifier", 8443): {"api", "email-parser"},
    ("streaming", 9443): {"worker"},
    ("image-classifier", 8443): {"document-converter"},
}
CLOUD_MAP_NAMES = {"mlflow", "document-converter", "email-classifier", "streaming", "image-classifier"}
SERVING_ROLES = {"mlflow-server", "document-converter", "email-classifier", "streaming", "image-classifier"}
"""The roles that serve mTLS: they, and only they, read the revocation lists (`ca-crl`)."""


def _context(cdk_context: dict) -> dict:
    staging = copy.deepcopy(cdk_context[CONTEXT_KEY][ENV])
    staging["routePolicies"] = {
        **staging.get("routePolicies", {}),
        "streaming": {
            "mode": "enforce",
            "rules": [{"identities": ["worker"], "methods": ["GET"], "paths": ["/stream/metrics"]}],
        },
    }
    return {**cdk_context, CONTEXT_KEY: {ENV: staging}, SERVICES_KEY: DECLARATION}


@pytest.fixture(scope="module")
def platform(cdk_context, tmp_path_factory):
    """The staging stage of an eight-service platform, checked by cdk-nag, and its templates by stack."""
    import aws_cdk as cdk
    from aws_cdk.assertions import Template

    from app import build_app

    app = build_app(cdk.App(context=_context(cdk_context), outdir=str(tmp_path_factory.mktemp("eight.out"))))
    stage = app.node.find_child(f"Hokusai-{ENV}")
    assert nag_findings(app, stage) == []
    app.synth()  # cdk-nag runs again here: a finding raises
    stacks = {
        name: Template.from_stack(getattr(stage, name)).to_json()
        for name in ("secrets", "network", "services", "monitoring")
    }
    by_name = {getattr(stage, name).stack_name: template for name, template in stacks.items()}
    return stacks, by_name


def _secret_names(statements: list[dict], by_name: dict) -> set[str]:
    found = set()
    for statement in statements:
        for resource in as_list(statement["Resource"]):
            resolved = resolve_output(resource, by_name)
            assert resolved is not None, f"a secret not from the Secrets stack: {resource}"
            stack_name, value = resolved
            found.add(by_name[stack_name]["Resources"][ref_id(value)]["Properties"]["Name"])
    return found


def test_every_identity_has_its_secret_rotation_and_alarms(platform):
    stacks, _ = platform
    secrets = stacks["secrets"]
    declared = set(IDENTITY_OF_ROLE.values())
    secret_ids = {
        r["Properties"]["Name"]: logical_id
        for logical_id, r in resources(secrets, "AWS::SecretsManager::Secret").items()
    }
    for identity in declared:
        assert f"hokusai/{ENV}/mlflow/{identity}-identity" in secret_ids
    rotated = {
        ref_id(schedule["Properties"]["SecretId"])
        for schedule in resources(secrets, "AWS::SecretsManager::RotationSchedule").values()
    }
    for identity in declared:
        assert secret_ids[f"hokusai/{ENV}/mlflow/{identity}-identity"] in rotated, identity
    alarm_names = {
        alarm["Properties"]["AlarmName"]
        for alarm in resources(stacks["monitoring"], "AWS::CloudWatch::Alarm").values()
    }
    for identity in declared:
        assert f"hokusai-mtls-{ENV}-certificate-expiry-{identity}" in alarm_names
        assert f"hokusai-mtls-{ENV}-certificate-check-failures-{identity}" in alarm_names
        assert f"hokusai-mtls-{ENV}-{identity}-rotation-failures" in alarm_names
    functions = {
        f["Properties"].get("FunctionName") for f in resources(secrets, "AWS::Lambda::Function").values()
    }
    assert f"hokusai-mtls-{ENV}-image-classifier-rotation" in functions


def test_the_lifecycle_lambdas_issue_exactly_the_declared_identities(platform):
    stacks, _ = platform
    secrets = stacks["secrets"]
    for function in resources(secrets, "AWS::Lambda::Function").values():
        variables = function["Properties"].get("Environment", {}).get("Variables", {})
        if function["Properties"]["Handler"].startswith("runtime.lifecycle."):
            catalog = catalog_from_environ(variables)
            assert {i.name for i in catalog.identities} == set(IDENTITY_OF_ROLE.values())
    (issuance,) = resources(secrets, "Custom::HokusaiMtlsCertificates").values()
    assert set(issuance["Properties"]["Identities"]) == set(IDENTITY_OF_ROLE.values())


def test_each_task_role_reads_only_its_own_identity_and_the_bundle(platform):
    """...and the revocation lists, for a server (the api serves proxied, not mTLS: a client here)."""
    stacks, by_name = platform
    services = stacks["services"]
    tasks = tasks_by_role(services)
    assert set(tasks) == set(IDENTITY_OF_ROLE)
    for role, (_, task) in tasks.items():
        statements = role_statements(services, ref_id(task["Properties"]["TaskRoleArn"]))
        readable = _secret_names(statements_with(statements, "secretsmanager:GetSecretValue"), by_name)
        assert readable == {
            f"hokusai/{ENV}/mlflow/{IDENTITY_OF_ROLE[role]}-identity",
            f"hokusai/{ENV}/mlflow/ca-cert",
            *([f"hokusai/{ENV}/mlflow/ca-crl"] if role in SERVING_ROLES else []),
        }, role
        actions = {a for s in statements for a in as_list(s["Action"])}
        assert actions <= {
            "secretsmanager:GetSecretValue",
            "secretsmanager:DescribeSecret",
            "kms:Decrypt",
        } | (
            {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
            if role == "mlflow-server"
            else set()
        ), role


def test_only_declared_callers_reach_a_servers_port(platform):
    stacks, _ = platform
    services = stacks["services"]
    group = {role: security_group_of(services, role) for role in IDENTITY_OF_ROLE}
    assert len(set(group.values())) == len(group)
    expected = {
        (group[server], ("sg", group[caller]), port, port)
        for (server, port), callers in REACHES.items()
        for caller in callers
    }
    assert ingress_rules(services) == expected


def test_mtls_servers_register_their_names_and_certificates_carry_them(platform):
    stacks, _ = platform
    discovered = {
        s["Properties"]["Name"]
        for s in resources(stacks["services"], "AWS::ServiceDiscovery::Service").values()
    }
    assert discovered == CLOUD_MAP_NAMES
    (namespace,) = resources(stacks["network"], "AWS::ServiceDiscovery::PrivateDnsNamespace").values()
    assert namespace["Properties"]["Name"] == f"hokusai-{ENV}.local"
    _, task = tasks_by_role(stacks["services"])["document-converter"]
    catalog = catalog_from_environ(environment_of(task))
    identity = catalog.identity_of("document-converter")
    assert identity.hostname(ENV) == f"document-converter.{namespace['Properties']['Name']}"
    assert identity.kind is names.Kind.BOTH  # it serves, and it calls image-classifier


def test_declared_containers_get_their_port_health_port_and_policy(platform):
    stacks, _ = platform
    tasks = tasks_by_role(stacks["services"])
    for role, (_, task) in tasks.items():
        assert json.loads(environment_of(task)[names.ENV_SERVICES]) == json.loads(
            catalog_from_environ(environment_of(task)).to_json()
        )
        assert set(json.loads(environment_of(task)[names.ENV_SERVICES])) == set(DECLARATION), role
    _, streaming = tasks["streaming"]
    variables = environment_of(streaming)
    assert variables[names.ENV_PORT] == "9443"
    assert variables[names.ENV_HEALTH_PORT] == "9444"
    assert container(streaming)["HealthCheck"]["Command"] == [
        "CMD",
        "hokusai-mtls",
        "health",
        "--port",
        "9444",
    ]
    assert [m["ContainerPort"] for m in container(streaming)["PortMappings"]] == [9443]
    assert json.loads(variables[names.ENV_ROUTE_POLICY])["rules"][0]["identities"] == ["worker"]
    assert names.ENV_SERVICE_SCOPES not in variables  # it identifies exactly its declared callers
    assert variables[names.ENV_ROLE] == "streaming"
    _, parser = tasks["email-parser"]
    assert "PortMappings" not in container(parser) or container(parser)["PortMappings"] == []
    assert names.ENV_PORT not in environment_of(parser)
    image = json.dumps(container(parser)["Image"])
    assert "123456789012.dkr.ecr.eu-west-1." in image and "/email-parser:1.0.0" in image


def test_counts_and_sizes_come_from_the_declaration(platform):
    stacks, _ = platform
    services = stacks["services"]
    tasks = tasks_by_role(services)
    counts = {
        ref_id(s["Properties"]["TaskDefinition"]): s["Properties"]["DesiredCount"]
        for s in resources(services, "AWS::ECS::Service").values()
    }
    assert counts[tasks["document-converter"][0]] == 2
    assert counts[tasks["streaming"][0]] == 1
    _, classifier = tasks["email-classifier"]
    assert (classifier["Properties"]["Cpu"], classifier["Properties"]["Memory"]) == ("1024", "4096")


def test_the_dashboard_has_a_row_per_declared_server(platform):
    stacks, _ = platform
    (dashboard,) = resources(stacks["monitoring"], "AWS::CloudWatch::Dashboard").values()
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for server in ("document-converter", "email-classifier", "streaming", "image-classifier"):
        assert f"{server}: mTLS handshakes" in body
    assert "email-parser: mTLS handshakes" not in body  # it serves nothing


# --- what the stacks refuse, naming the service and the field ---------------------------------------


def _refused(declaration: dict, environments: dict | None = None) -> str:
    def load() -> None:
        services = load_services(declaration)
        if environments is not None:
            load_settings(environments, services)

    with pytest.raises(SettingsError) as refused:
        load()
    return str(refused.value)


def test_a_service_without_an_image_is_refused(cdk_json_settings):
    declaration = {**BASE, "ocr": {"serves": "mtls", "port": 8443, "callers": ["worker"]}}
    message = _refused(declaration, cdk_json_settings)
    assert f"{CONTEXT_KEY}.development.images.ocr" in message and "no image" in message


def test_an_environment_may_give_the_image_instead(cdk_json_settings):
    environments = copy.deepcopy(cdk_json_settings)
    for settings in environments.values():
        settings.setdefault("images", {})["ocr"] = {"uri": "ghcr.io/hokusai/ocr:1.0.0"}
    declaration = {**BASE, "ocr": {"serves": "mtls", "port": 8443, "callers": ["worker"]}}
    loaded = load_settings(environments, load_services(declaration))
    assert loaded["production"].images["ocr"].uri == "ghcr.io/hokusai/ocr:1.0.0"


@pytest.mark.parametrize(
    ("declaration", "names_in_message"),
    [
        ({**BASE, "ocr": {"port": 1}}, ("hokusai:services.ocr",)),
        (
            {**BASE, "ocr": {"serves": "mtls", "port": 8443, "calers": ["api"]}},
            ("ocr.calers", "unknown field"),
        ),
        ({**BASE, "api": {"runtime": "api", "serves": "proxied", "port": 8001}}, ("hokusai:services.api",)),
        ({**BASE, "mlflow": {**BASE["mlflow"], "callers": ["api"]}}, ("mlflow.callers", "worker")),
        (
            {
                **BASE,
                "ocr": {"serves": "mtls", "port": 8443, "callers": ["mlflow"], "image": {"uri": "a.io/o:1"}},
            },
            ("ocr.callers", "mlflow"),
        ),
        ({**BASE, "ocr": {"image": {"uri": "a.io/o:1"}}}, ("hokusai:services.ocr", "no certificate")),
        (
            {
                **BASE,
                "ocr": {"serves": "mtls", "port": 65535, "callers": ["api"], "image": {"uri": "a.io/o:1"}},
            },
            ("ocr.port", "65534"),
        ),
        ({k: v for k, v in BASE.items() if k != "worker"}, ("worker",)),
        (
            {**BASE, "ocr": {"serves": "mtls", "port": 8443, "callers": ["api"], "desiredCount": 99}},
            ("ocr.desiredCount",),
        ),
    ],
    ids=[
        "port-without-serving",
        "unknown-field",
        "our-api-changed",
        "mlflow-loses-a-caller",
        "mlflow-as-a-caller",
        "no-certificate",
        "no-room-for-the-health-port",
        "worker-missing",
        "count-out-of-range",
    ],
)
def test_what_the_stacks_cannot_build_is_refused_by_name(declaration, names_in_message):
    message = _refused(declaration)
    for part in names_in_message:
        assert part in message, message


def test_a_route_policy_may_name_only_a_servers_declared_callers(cdk_json_settings):
    environments = copy.deepcopy(cdk_json_settings)
    declaration = {
        **BASE,
        "ocr": {"serves": "mtls", "port": 8443, "callers": ["worker"], "image": {"uri": "a.io/o:1"}},
    }
    rule = {"identities": ["api"], "methods": ["GET"], "paths": ["/a"]}
    environments["staging"]["routePolicies"] = {"ocr": {"mode": "enforce", "rules": [rule]}}
    message = _refused(declaration, {"staging": environments["staging"]})
    assert "routePolicies.ocr.rules[0].identities" in message and "'api'" in message
    rule["identities"] = ["worker"]
    loaded = load_settings({"staging": environments["staging"]}, load_services(declaration))
    assert "ocr" in loaded["staging"].route_policies


def test_a_name_too_long_for_its_rotation_function_is_refused(cdk_json_settings):
    environments = {"sandbox-alice-long-name1": copy.deepcopy(cdk_json_settings["development"])}
    name = "a-very-long-service-name-for-ocr"  # 32 characters, the most a name may have
    declaration = {
        **BASE,
        name: {"serves": "mtls", "port": 8443, "callers": ["api"], "image": {"uri": "a.io/o:1"}},
    }
    message = _refused(declaration, environments)
    assert f"hokusai-mtls-sandbox-alice-long-name1-{name}-rotation" in message and "64" in message
