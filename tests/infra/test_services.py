"""The Services stack of every environment: who may read which secret, what the containers get,
who may reach MLflow, Cloud Map, logs, images.

Tasks are found by the `HOKUSAI_MTLS_ROLE` their container runs with and secrets by the `Name`
of the resource a policy points at (through the cross-stack output), see tests/support/cfn.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime import names
from stacks.settings import RETAINED_ENVIRONMENTS, SERVICES_KEY, load_settings
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
    service_of,
    statements_with,
    tasks_by_role,
)

pytestmark = pytest.mark.infra

ENVIRONMENTS = pytest.mark.parametrize("env", names.ENVIRONMENTS)
IDENTITIES = pytest.mark.parametrize("identity", names.IDENTITIES, ids=lambda identity: identity.name)
SERVICE_OF_ROLE = {
    names.SERVER.role: names.MLFLOW_SERVICE,
    names.API.role: names.API_SERVICE,
    names.WORKER.role: names.WORKER_SERVICE,
}
READ_ACTIONS = {"secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"}


@pytest.fixture(scope="module")
def settings(cdk_json_settings) -> dict:
    return load_settings(cdk_json_settings)


@pytest.fixture(scope="module")
def by_stack_name(stages, secrets_templates, network_templates, services_templates) -> dict:
    """environment -> {stack name: template dict}, to follow cross-stack outputs."""
    return {
        env: {
            stage.secrets.stack_name: secrets_templates[env].to_json(),
            stage.network.stack_name: network_templates[env].to_json(),
            stage.services.stack_name: services_templates[env].to_json(),
        }
        for env, stage in stages.items()
    }


@pytest.fixture(scope="module")
def services(services_templates) -> dict:
    return {env: template.to_json() for env, template in services_templates.items()}


def secret_names(statements: list[dict], templates: dict) -> set[str]:
    """The `Name` of every secret the statements' resources point at (others as their repr)."""
    found = set()
    for statement in statements:
        for resource in as_list(statement["Resource"]):
            resolved = resolve_output(resource, templates)
            if resolved is None:
                found.add(json.dumps(resource))
                continue
            stack_name, value = resolved
            secret = templates[stack_name]["Resources"][ref_id(value)]
            assert secret["Type"] == "AWS::SecretsManager::Secret"
            found.add(secret["Properties"]["Name"])
    return found


def task_role_of(template: dict, identity: names.Identity) -> str:
    _, task = tasks_by_role(template)[identity.role]
    return ref_id(task["Properties"]["TaskRoleArn"])


def readable_secrets(env: str, identity: names.Identity, services: dict, by_stack_name: dict) -> set[str]:
    statements = role_statements(services[env], task_role_of(services[env], identity))
    return secret_names(statements_with(statements, "secretsmanager:GetSecretValue"), by_stack_name[env])


# --- IAM ---------------------------------------------------------------------------------------


def certificate_secrets_of(env: str, identity: names.Identity) -> set[str]:
    """What `identity`'s task loads: its identity secret, the CA bundle and, if it serves, the
    revocation lists it checks client certificates against."""
    expected = {names.identity_secret_name(env, identity), names.secret_name(env, names.CA_BUNDLE_SECRET)}
    if identity.serves:
        expected.add(names.secret_name(env, names.CA_REVOCATIONS_SECRET))
    return expected


@ENVIRONMENTS
@IDENTITIES
def test_task_role_reads_exactly_its_identity_and_the_ca_bundle(services, by_stack_name, env, identity):
    """...and, for the MLflow server only, the revocation lists (`ca-crl`)."""
    assert readable_secrets(env, identity, services, by_stack_name) == certificate_secrets_of(env, identity)
    statements = role_statements(services[env], task_role_of(services[env], identity))
    secret_actions = {a for s in statements for a in as_list(s["Action"]) if a.startswith("secretsmanager:")}
    assert secret_actions == READ_ACTIONS


@ENVIRONMENTS
def test_api_role_cannot_read_the_server_identity_or_the_ca_key(services, by_stack_name, env):
    readable = readable_secrets(env, names.API, services, by_stack_name)
    assert names.identity_secret_name(env, names.SERVER) not in readable
    assert names.identity_secret_name(env, names.WORKER) not in readable
    assert names.secret_name(env, names.CA_KEY_SECRET) not in readable


@ENVIRONMENTS
def test_only_the_mlflow_server_reads_the_revocation_lists(services, by_stack_name, env):
    """Servers refuse revoked client certificates; clients (api, worker) check no revocation, so they get
    no read on `ca-crl` (least privilege)."""
    crl = names.secret_name(env, names.CA_REVOCATIONS_SECRET)
    assert crl == f"hokusai/{env}/mlflow/ca-crl"
    assert names.SERVER.serves
    assert crl in readable_secrets(env, names.SERVER, services, by_stack_name)
    for client in (names.API, names.WORKER):
        assert not client.serves
        assert crl not in readable_secrets(env, client, services, by_stack_name), client.name
    statements = role_statements(services[env], task_role_of(services[env], names.SERVER))
    (read,) = [
        s
        for s in statements_with(statements, "secretsmanager:GetSecretValue")
        if crl in secret_names([s], by_stack_name[env])
    ]
    assert set(as_list(read["Action"])) == READ_ACTIONS and read["Effect"] == "Allow"


@ENVIRONMENTS
def test_no_role_in_any_stack_writes_the_revocation_lists(services, by_stack_name, env):
    """Only an operator's `hokusai-mtls certs revoke` writes `ca-crl`: no task, lifecycle or other role
    holds anything on it but the servers' reads."""
    crl = names.secret_name(env, names.CA_REVOCATIONS_SECRET)
    templates = by_stack_name[env]

    def named_secrets(template: dict, statement: dict) -> set[str]:
        """Secret names a statement points at, in its own stack (`Ref`) or through an output."""
        found = set()
        for resource in as_list(statement["Resource"]):
            resolved = resolve_output(resource, templates)
            owner, value = (templates[resolved[0]], resolved[1]) if resolved else (template, resource)
            target = owner["Resources"].get(ref_id(value), {}) if isinstance(value, dict) else {}
            if target.get("Type") == "AWS::SecretsManager::Secret":
                found.add(target["Properties"]["Name"])
            elif not isinstance(value, dict) or "Ref" not in value:
                found.add(json.dumps(value))
        return found

    holders, seen = set(), set()
    for template in templates.values():
        for role_id in resources(template, "AWS::IAM::Role"):
            for statement in role_statements(template, role_id):
                actions = [a for a in as_list(statement["Action"]) if a.startswith("secretsmanager:")]
                targets = named_secrets(template, statement) if actions else set()
                assert not any("*" in t for t in targets), (role_id, targets)  # a wildcard would cover it
                seen |= targets
                if crl in targets:
                    assert set(actions) <= READ_ACTIONS, (role_id, actions)
                    holders.add(role_id)
    assert holders == {task_role_of(services[env], names.SERVER)}
    # The Secrets stack's own references were followed too (the lifecycle roles hold the CA key).
    assert names.secret_name(env, names.CA_KEY_SECRET) in seen


@ENVIRONMENTS
def test_no_role_anywhere_reads_the_ca_key_or_any_secret_by_wildcard(by_stack_name, env):
    ca_key = names.secret_name(env, names.CA_KEY_SECRET)
    for template in by_stack_name[env].values():
        for role_id in resources(template, "AWS::IAM::Role"):
            reads = statements_with(role_statements(template, role_id), "secretsmanager:GetSecretValue")
            found = secret_names(reads, by_stack_name[env])
            assert ca_key not in found, role_id
            assert '"*"' not in found, role_id


@ENVIRONMENTS
@IDENTITIES
def test_task_role_decrypts_with_the_secrets_key_only_through_secrets_manager(
    services, by_stack_name, env, identity
):
    statements = role_statements(services[env], task_role_of(services[env], identity))
    kms = [s for s in statements if any(a.startswith("kms:") for a in as_list(s["Action"]))]
    assert len(kms) == 1
    (statement,) = kms
    assert as_list(statement["Action"]) == ["kms:Decrypt"]
    stack_name, value = resolve_output(statement["Resource"], by_stack_name[env])
    key = by_stack_name[env][stack_name]["Resources"][ref_id(value)]
    assert key["Type"] == "AWS::KMS::Key"
    secrets = resources(by_stack_name[env][stack_name], "AWS::SecretsManager::Secret")
    assert {ref_id(s["Properties"]["KmsKeyId"]) for s in secrets.values()} == {ref_id(value)}
    assert statement["Condition"] == {
        "StringEquals": {
            "kms:ViaService": {
                "Fn::Join": ["", ["secretsmanager.", {"Ref": "AWS::Region"}, ".amazonaws.com"]]
            }
        }
    }


@ENVIRONMENTS
@IDENTITIES
def test_task_roles_name_no_wildcard_resource(services, env, identity):
    for statement in role_statements(services[env], task_role_of(services[env], identity)):
        assert "*" not in as_list(statement["Resource"]), statement


@ENVIRONMENTS
def test_only_mlflow_reaches_the_artifact_store_and_only_under_its_prefix(services, settings, env):
    stores = settings[env].mlflow
    bucket = {"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, f":s3:::{stores.bucket}"]]}
    objects = {
        "Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, f":s3:::{stores.bucket}/{stores.prefix}/*"]]
    }
    for identity in names.IDENTITIES:
        statements = role_statements(services[env], task_role_of(services[env], identity))
        s3 = [s for s in statements if any(a.startswith("s3:") for a in as_list(s["Action"]))]
        if identity is not names.SERVER:
            assert s3 == [], identity.name
            continue
        assert sorted(s3, key=lambda s: len(as_list(s["Action"]))) == [
            {
                "Action": "s3:ListBucket",
                "Condition": {"StringLike": {"s3:prefix": [stores.prefix, f"{stores.prefix}/*"]}},
                "Effect": "Allow",
                "Resource": bucket,
            },
            {
                "Action": ["s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:PutObject"],
                "Effect": "Allow",
                "Resource": objects,
            },
        ]


@ENVIRONMENTS
def test_execution_roles_are_separate_and_only_mlflows_reads_the_backend_store(
    services, by_stack_name, settings, env
):
    template = services[env]
    backend = settings[env].mlflow.backend_store_secret_name
    for role, (_, task) in tasks_by_role(template).items():
        task_role = ref_id(task["Properties"]["TaskRoleArn"])
        execution_role = ref_id(task["Properties"]["ExecutionRoleArn"])
        assert task_role != execution_role
        reads = statements_with(role_statements(template, execution_role), "secretsmanager:GetSecretValue")
        found = secret_names(reads, by_stack_name[env])
        if role == names.SERVER.role:
            (only,) = found
            assert f":secret:{backend}-??????" in only
        else:
            assert found == set()


@ENVIRONMENTS
def test_backend_store_uri_is_injected_as_a_secret_never_as_a_variable(services, settings, env):
    _, task = tasks_by_role(services[env])[names.SERVER.role]
    (secret,) = container(task)["Secrets"]
    assert secret["Name"] == names.ENV_MLFLOW_BACKEND_STORE_URI
    assert f":secret:{settings[env].mlflow.backend_store_secret_name}" in json.dumps(secret["ValueFrom"])
    assert names.ENV_MLFLOW_BACKEND_STORE_URI not in environment_of(task)


# --- containers --------------------------------------------------------------------------------


@ENVIRONMENTS
@IDENTITIES
def test_container_environment_is_the_documented_contract(services, settings, cdk_context, env, identity):
    _, task = tasks_by_role(services[env])[identity.role]
    expected = {
        names.ENV_ENVIRONMENT: env,
        names.ENV_ENABLE_MTLS: "true",
        names.ENV_ROLE: identity.role,
        names.ENV_MTLS_MODE: names.MTLS_MODE_STRICT,
        names.ENV_MAY_DEGRADE: "true" if env == "development" else "false",  # cdk.json's mayDegrade
        names.ENV_CERT_DIR: identity.default_cert_dir,
        names.ENV_CA_BUNDLE_SECRET: names.secret_name(env, names.CA_BUNDLE_SECRET),
        names.ENV_IDENTITY_SECRET: names.identity_secret_name(env, identity),
    }
    if identity is names.SERVER:
        expected[names.ENV_MLFLOW_ARTIFACTS_DESTINATION] = settings[env].mlflow.artifacts_destination
    if identity is not names.WORKER:  # the two servers tell internal callers from external ones
        expected[names.ENV_INTERNAL_CIDRS] = ",".join(settings[env].internal_cidrs)
        expected[names.ENV_TRUSTED_PROXY_CIDRS] = ",".join(settings[env].trusted_proxy_cidrs)
        if settings[env].auth_service_url is not None:
            expected[names.ENV_AUTH_SERVICE_URL] = settings[env].auth_service_url
        if settings[env].service_scopes is not None:
            expected[names.ENV_SERVICE_SCOPES] = json.dumps(
                {service: list(scopes) for service, scopes in settings[env].service_scopes.items()},
                separators=(",", ":"),
            )
    if identity is names.API:  # only the API sits behind the platform's proxy
        expected[names.ENV_PROXY_KIND] = settings[env].trusted_proxy_kind
    if identity is not names.WORKER:  # cdk.json sets no `workers`: mlflow's 1 vCPU and api's 0.5 run 1 each
        expected[names.ENV_WORKERS] = "1"
    variables = environment_of(task)
    # Every container knows the declared services: cdk.json's `hokusai:services`, as compact JSON.
    assert json.loads(variables.pop(names.ENV_SERVICES)) == cdk_context[SERVICES_KEY]
    assert variables == expected


def test_cdk_json_sets_the_auth_service_where_it_should(settings):
    """The fixtures below rely on it: development without the auth service, staging and production with."""
    assert {env: s.auth_service_url for env, s in settings.items()} == {
        "development": None,
        "staging": "https://auth.hokus.ai",
        "production": "https://auth.hokus.ai",
    }
    assert all(s.redis_url_secret_name is None and s.service_scopes is None for s in settings.values())
    assert all(s.api_key_store is None for s in settings.values()), "tests/infra/test_api_key_store.py has it"


@ENVIRONMENTS
def test_auth_service_url_reaches_mlflow_and_api_exactly_when_set(services, settings, env):
    tasks = tasks_by_role(services[env])
    for role, (_, task) in tasks.items():
        variables = environment_of(task)
        if role == names.WORKER.role or settings[env].auth_service_url is None:
            assert names.ENV_AUTH_SERVICE_URL not in variables, role
        else:
            assert variables[names.ENV_AUTH_SERVICE_URL] == settings[env].auth_service_url, role
        # serviceScopes unset in cdk.json: no variable, so the runtime's default scopes apply.
        assert names.ENV_SERVICE_SCOPES not in variables, role


@ENVIRONMENTS
def test_no_redis_url_without_its_secret_and_never_in_the_environment(services, env):
    for role, (_, task) in tasks_by_role(services[env]).items():
        injected = {secret["Name"] for secret in container(task).get("Secrets", [])}
        assert injected == ({names.ENV_MLFLOW_BACKEND_STORE_URI} if role == names.SERVER.role else set()), (
            role
        )
        assert names.ENV_REDIS_URL not in environment_of(task), role


@ENVIRONMENTS
def test_no_key_store_without_its_setting(services, by_stack_name, env):
    """Without `apiKeyStore` no task learns of a store and no hashing secret exists: the api keeps asking
    the auth service (AUTH_SERVICE_URL) as before."""
    store = {names.ENV_KEY_STORE_URL, names.ENV_KEY_HASH_SECRET, names.ENV_KEY_USAGE_RETENTION_DAYS}
    for role, (_, task) in tasks_by_role(services[env]).items():
        injected = {secret["Name"] for secret in container(task).get("Secrets", [])}
        assert not store & (injected | set(environment_of(task))), role
    for template in by_stack_name[env].values():
        assert names.api_keys_secret_prefix(env) not in json.dumps(template)


@ENVIRONMENTS
@IDENTITIES
def test_the_secrets_named_in_the_environment_are_the_ones_the_role_reads(
    services, by_stack_name, env, identity
):
    _, task = tasks_by_role(services[env])[identity.role]
    variables = environment_of(task)
    readable = readable_secrets(env, identity, services, by_stack_name)
    named = {variables[names.ENV_IDENTITY_SECRET], variables[names.ENV_CA_BUNDLE_SECRET]}
    # The revocation lists' name is derived from HOKUSAI_MTLS_ENVIRONMENT by the runtime
    # (`names.secret_name(env, names.CA_REVOCATIONS_SECRET)`): no variable names it.
    derived = {names.secret_name(variables[names.ENV_ENVIRONMENT], names.CA_REVOCATIONS_SECRET)}
    assert named | (derived if identity.serves else set()) == readable
    assert not derived & set(variables.values())


@ENVIRONMENTS
@IDENTITIES
def test_root_filesystem_is_read_only_with_task_local_writable_volumes(services, env, identity):
    _, task = tasks_by_role(services[env])[identity.role]
    definition = container(task)
    assert definition["ReadonlyRootFilesystem"] is True
    volumes = {volume["Name"]: volume for volume in task["Properties"]["Volumes"]}
    assert all(set(volume) == {"Name"} for volume in volumes.values()), "only empty task-local bind volumes"
    mounts = {mount["ContainerPath"]: mount for mount in definition["MountPoints"]}
    assert set(mounts) == {"/tmp", identity.default_cert_dir} - {names.CLIENT_CERT_DIR}
    assert all(m["ReadOnly"] is False and m["SourceVolume"] in volumes for m in mounts.values())
    cert_dir = environment_of(task)[names.ENV_CERT_DIR]
    assert any(cert_dir == path or cert_dir.startswith(f"{path}/") for path in mounts)


@ENVIRONMENTS
def test_health_checks_use_the_loopback_health_command(services, env):
    tasks = tasks_by_role(services[env])
    expected = {
        names.SERVER.role: ["CMD", "hokusai-mtls", "health", "--port", str(names.MLFLOW_HEALTH_PORT)],
        names.API.role: ["CMD", "hokusai-mtls", "health", "--port", str(names.API_PORT)],
        names.WORKER.role: None,
    }
    for role, command in expected.items():
        health = container(tasks[role][1]).get("HealthCheck")
        assert (health and health["Command"]) == command, role


@ENVIRONMENTS
def test_port_mappings_in_strict_mode(services, env):
    tasks = tasks_by_role(services[env])
    ports = {
        role: [m["ContainerPort"] for m in container(task).get("PortMappings", [])]
        for role, (_, task) in tasks.items()
    }
    assert ports == {
        names.SERVER.role: [names.MLFLOW_PORT],
        names.API.role: [names.API_PORT],
        names.WORKER.role: [],
    }


@ENVIRONMENTS
def test_each_service_logs_to_its_own_encrypted_log_group(services, settings, env):
    template = services[env]
    groups = resources(template, "AWS::Logs::LogGroup")
    (key_id,) = resources(template, "AWS::KMS::Key")
    for role, (_, task) in tasks_by_role(template).items():
        options = container(task)["LogConfiguration"]["Options"]
        group = groups[ref_id(options["awslogs-group"])]["Properties"]
        assert group["LogGroupName"] == f"/hokusai/{env}/ecs/{SERVICE_OF_ROLE[role]}"
        assert group["RetentionInDays"] == settings[env].log_retention_days
        assert ref_id(group["KmsKeyId"]) == key_id


@ENVIRONMENTS
def test_log_key_rotates_and_lets_cloudwatch_logs_use_it_for_these_log_groups_only(services, env):
    template = services[env]
    ((_, key),) = resources(template, "AWS::KMS::Key").items()
    assert key["Properties"]["EnableKeyRotation"] is True
    (statement,) = [
        s
        for s in key["Properties"]["KeyPolicy"]["Statement"]
        if "Service" in s["Principal"] and "logs." in json.dumps(s["Principal"])
    ]
    assert "kms:Decrypt" in statement["Action"] and "kms:GenerateDataKey" in statement["Action"]
    condition = json.dumps(statement["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"])
    assert f":log-group:/hokusai/{env}/ecs/*" in condition


# --- network -----------------------------------------------------------------------------------


@ENVIRONMENTS
def test_only_the_api_and_worker_security_groups_reach_mlflow(services, env):
    template = services[env]
    mlflow, api, worker = (
        security_group_of(template, i.role) for i in (names.SERVER, names.API, names.WORKER)
    )
    assert len({mlflow, api, worker}) == 3
    port = names.MLFLOW_PORT
    assert ingress_rules(template) == {
        (mlflow, ("sg", api), port, port),
        (mlflow, ("sg", worker), port, port),
    }


@ENVIRONMENTS
def test_servers_reach_the_auth_service_and_redis_outbound_without_any_new_ingress(services, env):
    """AUTH_SERVICE_URL and REDIS_URL are outbound calls: every task security group allows all
    outbound traffic, and the only ingress rules are MLflow's (asserted above) and the proxies'."""
    template = services[env]
    for identity in names.IDENTITIES:
        group = template["Resources"][security_group_of(template, identity.role)]["Properties"]
        assert group["SecurityGroupEgress"] == [
            {
                "CidrIp": "0.0.0.0/0",
                "Description": "Allow all outbound traffic by default",
                "IpProtocol": "-1",
            }
        ], identity.name
    assert resources(template, "AWS::EC2::SecurityGroupEgress") == {}


@ENVIRONMENTS
def test_no_ingress_from_everywhere(by_stack_name, env):
    for template in by_stack_name[env].values():
        for rule in ingress_rules(template):
            assert rule[1] not in {("cidr", "0.0.0.0/0"), ("cidr", "::/0")}, rule


@ENVIRONMENTS
def test_services_run_in_private_subnets_without_public_addresses(by_stack_name, stages, services, env):
    network = by_stack_name[env][stages[env].network.stack_name]
    for identity in names.IDENTITIES:
        configuration = service_of(services[env], identity.role)["Properties"]["NetworkConfiguration"]
        assert configuration["AwsvpcConfiguration"]["AssignPublicIp"] == "DISABLED"
        for subnet in configuration["AwsvpcConfiguration"]["Subnets"]:
            _, value = resolve_output(subnet, by_stack_name[env])
            tags = {t["Key"]: t["Value"] for t in network["Resources"][ref_id(value)]["Properties"]["Tags"]}
            assert tags["aws-cdk:subnet-type"] == "Private"


@ENVIRONMENTS
def test_mlflow_registers_its_a_record_in_the_environments_namespace(by_stack_name, stages, services, env):
    template = services[env]
    ((discovery_id, discovery),) = resources(template, "AWS::ServiceDiscovery::Service").items()
    properties = discovery["Properties"]
    assert [record["Type"] for record in properties["DnsConfig"]["DnsRecords"]] == ["A"]
    _, value = resolve_output(properties["NamespaceId"], by_stack_name[env])
    network = by_stack_name[env][stages[env].network.stack_name]
    namespace = network["Resources"][ref_id(value)]
    assert namespace["Type"] == "AWS::ServiceDiscovery::PrivateDnsNamespace"
    assert f"{properties['Name']}.{namespace['Properties']['Name']}" == names.mlflow_hostname(env)
    registries = {
        identity.role: service_of(template, identity.role)["Properties"].get("ServiceRegistries", [])
        for identity in names.IDENTITIES
    }
    assert registries == {
        names.SERVER.role: [{"RegistryArn": {"Fn::GetAtt": [discovery_id, "Arn"]}}],
        names.API.role: [],
        names.WORKER.role: [],
    }


# --- per environment ---------------------------------------------------------------------------


@ENVIRONMENTS
def test_desired_counts_and_removal_policies_follow_the_settings(services, settings, env):
    template = services[env]
    for identity in names.IDENTITIES:
        count = service_of(template, identity.role)["Properties"]["DesiredCount"]
        assert count == settings[env].desired_counts[SERVICE_OF_ROLE[identity.role]]
    expected = "Retain" if env in RETAINED_ENVIRONMENTS else "Delete"
    kept = {**resources(template, "AWS::KMS::Key"), **resources(template, "AWS::Logs::LogGroup")}
    assert len(kept) == 4
    assert {resource["DeletionPolicy"] for resource in kept.values()} == {expected}


TODAYS_TASK_SIZES = {
    names.SERVER.role: {"Cpu": "1024", "Memory": "2048"},
    names.API.role: {"Cpu": "512", "Memory": "1024"},
    names.WORKER.role: {"Cpu": "512", "Memory": "1024"},
}
"""The sizes the services had before `taskSizes` existed: cdk.json keeps them in every environment."""


@ENVIRONMENTS
def test_task_sizes_follow_the_settings_and_keep_the_sizes_of_before(services, settings, env):
    for role, (_, task) in tasks_by_role(services[env]).items():
        size = settings[env].task_sizes[SERVICE_OF_ROLE[role]]
        rendered = {key: task["Properties"][key] for key in ("Cpu", "Memory")}
        assert rendered == {"Cpu": str(size.cpu), "Memory": str(size.memory_mib)}, role
        assert rendered == TODAYS_TASK_SIZES[role], role
        assert task["Properties"]["RequiresCompatibilities"] == ["FARGATE"], role


@ENVIRONMENTS
def test_serving_containers_run_one_worker_per_whole_vcpu_and_the_worker_service_none(services, env):
    """HOKUSAI_MTLS_WORKERS follows the task's cpu (1024 units = 1 vCPU, at least 1) in mlflow and api;
    the data-pipeline worker service serves nothing and gets no such variable."""
    for role, (_, task) in tasks_by_role(services[env]).items():
        variables = environment_of(task)
        if role == names.WORKER.role:
            assert names.ENV_WORKERS not in variables
            continue
        assert variables[names.ENV_WORKERS] == str(max(1, int(task["Properties"]["Cpu"]) // 1024)), role
        assert variables[names.ENV_WORKERS] == "1", role


def test_the_environments_differ_where_the_settings_say(services, settings):
    retention = {
        env: {
            g["Properties"]["RetentionInDays"]
            for g in resources(services[env], "AWS::Logs::LogGroup").values()
        }
        for env in names.ENVIRONMENTS
    }
    assert retention == {"development": {14}, "staging": {90}, "production": {365}}
    removal = {
        env: {k["DeletionPolicy"] for k in resources(services[env], "AWS::KMS::Key").values()}
        for env in names.ENVIRONMENTS
    }
    assert removal == {"development": {"Delete"}, "staging": {"Delete"}, "production": {"Retain"}}
    assert [settings[env].leaf_lifetime_hours for env in names.ENVIRONMENTS] == [168, 24, 24]


# --- images ------------------------------------------------------------------------------------


def docker_assets(cloud_assembly, env: str) -> dict[str, dict]:
    """dockerFile -> asset source, from the stage's asset manifests."""
    (nested,) = [a for a in cloud_assembly.nested_assemblies if a.display_name == f"Hokusai-{env}"]
    directory = Path(nested.nested_assembly.directory)
    found = {}
    for manifest in directory.glob("*.assets.json"):
        for asset in json.loads(manifest.read_text()).get("dockerImages", {}).values():
            found[asset["source"]["dockerFile"]] = {**asset["source"], "root": directory}
    return found


@ENVIRONMENTS
def test_images_are_assets_built_from_docker_with_a_small_context(cloud_assembly, env):
    assets = docker_assets(cloud_assembly, env)
    assert set(assets) == {f"docker/Dockerfile.{service}" for service in SERVICE_OF_ROLE.values()}
    for dockerfile, source in assets.items():
        context = (source["root"] / source["directory"]).resolve()
        staged = {str(p.relative_to(context)) for p in context.rglob("*")}
        assert {dockerfile, "docker/entrypoint.sh", "pyproject.toml", "runtime/names.py"} <= staged
        tops = {path.split("/")[0] for path in staged}
        assert tops <= {".dockerignore", "docker", "pyproject.toml", "runtime"}, tops
        assert not any("__pycache__" in path for path in staged)
        assert source.get("platform") == "linux/amd64"


def test_each_image_is_the_same_asset_in_every_environment(cloud_assembly):
    directories = {
        env: {f: s["directory"] for f, s in docker_assets(cloud_assembly, env).items()}
        for env in names.ENVIRONMENTS
    }
    assert directories["development"] == directories["staging"] == directories["production"]
