"""The variant app (tests/infra/conftest.py): permissive mode, imported network, registry images, a proxy.

cdk.json runs strict mode, creates everything and keeps the default task sizes; these are the settings it
does not exercise.
"""

from __future__ import annotations

import json

import pytest

from runtime import names
from tests.support.cfn import (
    as_list,
    container,
    environment_of,
    ingress_rules,
    ref_id,
    resources,
    role_statements,
    security_group_of,
    service_of,
    tasks_by_role,
)
from tests.support.nag import nag_findings
from tests.support.variant import (
    VARIANT_AUTH_SERVICE_URL,
    VARIANT_CORS_ORIGINS,
    VARIANT_ENVIRONMENT,
    VARIANT_IMAGES,
    VARIANT_IMPORTS,
    VARIANT_REDIS_URL_SECRET,
    VARIANT_SERVICE_SCOPES,
    VARIANT_TASK_SIZES,
    VARIANT_TRUSTED_PROXIES,
    VARIANT_WORKERS,
)

pytestmark = pytest.mark.infra

ENV = VARIANT_ENVIRONMENT


@pytest.fixture(scope="module")
def templates(variant_stage) -> dict:
    from aws_cdk.assertions import Template

    return {
        name: Template.from_stack(getattr(variant_stage, name)).to_json() for name in ("secrets", "services")
    }


def test_variant_app_synthesizes_and_passes_cdk_nag(variant_app, variant_stage, variant_assembly):
    (nested,) = variant_assembly.nested_assemblies
    assert {stack.stack_name for stack in nested.nested_assembly.stacks} == {
        f"Hokusai-{ENV}-Secrets",
        f"Hokusai-{ENV}-Services",
        f"Hokusai-{ENV}-Monitoring",
    }
    for stack in (variant_stage.secrets, variant_stage.services, variant_stage.monitoring):
        assert nag_findings(variant_app, stack) == [], stack.stack_name


def test_permissive_mode_needs_no_extra_port(templates):
    """Old plain-HTTP clients and migrated mTLS clients share MLflow's one port."""
    template = templates["services"]
    mlflow, api, worker = (
        security_group_of(template, i.role) for i in (names.SERVER, names.API, names.WORKER)
    )
    mlflow_rules = {rule for rule in ingress_rules(template) if rule[0] == mlflow}
    assert mlflow_rules == {
        (mlflow, ("sg", client), names.MLFLOW_PORT, names.MLFLOW_PORT) for client in (api, worker)
    }
    _, task = tasks_by_role(template)[names.SERVER.role]
    assert [m["ContainerPort"] for m in container(task)["PortMappings"]] == [names.MLFLOW_PORT]


def test_permissive_mode_keeps_mtls_enabled_and_tells_the_containers(templates):
    for _, task in tasks_by_role(templates["services"]).values():
        variables = environment_of(task)
        assert variables[names.ENV_MTLS_MODE] == names.MTLS_MODE_PERMISSIVE
        assert variables[names.ENV_ENABLE_MTLS] == "true"


def test_trusted_proxies_reach_the_api_port_and_nothing_else(templates):
    template = templates["services"]
    api = security_group_of(template, names.API.role)
    api_rules = {rule for rule in ingress_rules(template) if rule[0] == api}
    assert api_rules == {
        (api, ("cidr", cidr), names.API_PORT, names.API_PORT) for cidr in VARIANT_TRUSTED_PROXIES
    }
    worker = security_group_of(template, names.WORKER.role)
    assert {rule for rule in ingress_rules(template) if rule[0] == worker} == set()


def test_imported_network_creates_no_network_stack_and_no_network_resources(variant_stage, templates):
    assert variant_stage.network is None
    created = {
        resource["Type"] for template in templates.values() for resource in template["Resources"].values()
    }
    assert not created & {
        "AWS::EC2::VPC",
        "AWS::EC2::Subnet",
        "AWS::EC2::FlowLog",
        "AWS::ECS::Cluster",
        "AWS::ServiceDiscovery::PrivateDnsNamespace",
    }


def test_services_use_the_imported_subnets_cluster_and_namespace(templates):
    template = templates["services"]
    imported = VARIANT_IMPORTS
    for identity in names.IDENTITIES:
        properties = service_of(template, identity.role)["Properties"]
        assert properties["Cluster"] == imported["cluster"]["import"]["clusterName"]
        subnets = properties["NetworkConfiguration"]["AwsvpcConfiguration"]["Subnets"]
        assert subnets == imported["vpc"]["import"]["privateSubnetIds"]
    ((_, discovery),) = resources(template, "AWS::ServiceDiscovery::Service").items()
    assert discovery["Properties"]["NamespaceId"] == imported["namespace"]["import"]["namespaceId"]
    for group in resources(template, "AWS::EC2::SecurityGroup").values():
        assert group["Properties"]["VpcId"] == imported["vpc"]["import"]["vpcId"]


def test_registry_images_and_their_pull_permissions(templates):
    template = templates["services"]
    tasks = tasks_by_role(template)

    _, api = tasks[names.API.role]
    image = json.dumps(container(api)["Image"])
    assert "123456789012.dkr.ecr.eu-west-1." in image and "/hokusai/api:1.4.2" in image
    api_pull = [
        s
        for s in role_statements(template, ref_id(api["Properties"]["ExecutionRoleArn"]))
        if "ecr:BatchGetImage" in as_list(s["Action"])
    ]
    (statement,) = api_pull
    assert ":ecr:eu-west-1:123456789012:repository/hokusai/api" in json.dumps(statement["Resource"])

    _, worker = tasks[names.WORKER.role]
    assert container(worker)["Image"] == VARIANT_IMAGES["worker"]["uri"]
    worker_actions = {
        action
        for s in role_statements(template, ref_id(worker["Properties"]["ExecutionRoleArn"]))
        for action in as_list(s["Action"])
    }
    assert not any(action.startswith("ecr:") for action in worker_actions)


# --- authentication settings: authServiceUrl, redisUrlSecretName, serviceScopes ---------------------

SERVERS = (names.SERVER.role, names.API.role)
"""The two containers that serve (and so run the API-key path); the worker serves nothing."""


def test_auth_service_url_and_scopes_reach_mlflow_and_api_only(templates):
    from runtime.auth.peer_identity import IdentityPolicy

    for role, (_, task) in tasks_by_role(templates["services"]).items():
        variables = environment_of(task)
        if role not in SERVERS:
            assert not {names.ENV_AUTH_SERVICE_URL, names.ENV_SERVICE_SCOPES} & set(variables), role
            continue
        assert variables[names.ENV_AUTH_SERVICE_URL] == VARIANT_AUTH_SERVICE_URL
        assert json.loads(variables[names.ENV_SERVICE_SCOPES]) == VARIANT_SERVICE_SCOPES
        # ...in the form the runtime reads.
        policy = IdentityPolicy.from_environ({names.ENV_ENVIRONMENT: ENV, **variables})
        assert policy.service_scopes == {s: tuple(scopes) for s, scopes in VARIANT_SERVICE_SCOPES.items()}


def test_edge_settings_reach_the_servers_in_the_form_the_runtime_reads(templates):
    from runtime.auth.middleware import options_from_environ

    for role, (_, task) in tasks_by_role(templates["services"]).items():
        variables = environment_of(task)
        edge = {names.ENV_PROXY_KIND, names.ENV_CORS_ALLOWED_ORIGINS, names.ENV_CN_FALLBACK}
        if role not in SERVERS:
            assert not edge & set(variables), role
            continue
        options = options_from_environ(variables)
        assert options["cors_allowed_origins"] == VARIANT_CORS_ORIGINS
        assert variables[names.ENV_CN_FALLBACK] == "true"
        # only the API is behind the ALB: MLflow believes no forwarded certificate
        expected_kind = names.PROXY_KIND_ALB if role == names.API.role else names.PROXY_KIND_NONE
        assert options["proxy_kind"] == expected_kind, role


def test_redis_url_is_injected_from_its_secret_into_mlflow_and_api_only(templates):
    for role, (_, task) in tasks_by_role(templates["services"]).items():
        assert names.ENV_REDIS_URL not in environment_of(task), role
        secrets = {secret["Name"]: secret["ValueFrom"] for secret in container(task).get("Secrets", [])}
        if role not in SERVERS:
            assert secrets == {}, role
            continue
        assert f":secret:{VARIANT_REDIS_URL_SECRET}" in json.dumps(secrets[names.ENV_REDIS_URL]), role
        expected = {names.ENV_REDIS_URL} | (
            {names.ENV_MLFLOW_BACKEND_STORE_URI} if role == names.SERVER.role else set()
        )
        assert set(secrets) == expected, role


def test_only_the_servers_execution_roles_read_the_redis_secret(templates):
    """CDK's grant for `secrets=`: GetSecretValue and DescribeSecret on `secret:<name>-??????`, on the
    execution role (ECS reads it to start the task); the application's task role gets nothing."""
    template = templates["services"]
    redis_arn = f":secret:{VARIANT_REDIS_URL_SECRET}-??????"
    for role, (_, task) in tasks_by_role(template).items():
        for role_arn in ("ExecutionRoleArn", "TaskRoleArn"):
            reads = [
                s
                for s in role_statements(template, ref_id(task["Properties"][role_arn]))
                if redis_arn in json.dumps(s["Resource"])
            ]
            if role in SERVERS and role_arn == "ExecutionRoleArn":
                (statement,) = reads
                assert set(as_list(statement["Action"])) == {
                    "secretsmanager:GetSecretValue",
                    "secretsmanager:DescribeSecret",
                }, role
            else:
                assert reads == [], (role, role_arn)


# --- task sizes: taskSizes -----------------------------------------------------------------------

SERVICE_OF_ROLE = {
    names.SERVER.role: names.MLFLOW_SERVICE,
    names.API.role: names.API_SERVICE,
    names.WORKER.role: names.WORKER_SERVICE,
}


def test_task_definitions_carry_the_configured_cpu_and_memory(templates):
    for role, (_, task) in tasks_by_role(templates["services"]).items():
        size = VARIANT_TASK_SIZES[SERVICE_OF_ROLE[role]]
        assert (task["Properties"]["Cpu"], task["Properties"]["Memory"]) == (
            str(size["cpu"]),
            str(size["memoryMiB"]),
        ), role


def test_worker_counts_are_set_or_one_per_vcpu_in_mlflow_and_api_and_absent_in_the_worker(templates):
    """mlflow: no `workers`, 4 vCPU -> 4; api: `workers` 6 wins over its 2 vCPU; the worker: none."""
    found = {
        SERVICE_OF_ROLE[role]: environment_of(task).get(names.ENV_WORKERS)
        for role, (_, task) in tasks_by_role(templates["services"]).items()
    }
    assert found == {**VARIANT_WORKERS, names.WORKER_SERVICE: None}
