"""`routePolicies`: a server's route policy reaches that server's container, exactly, and nothing else changes.

An app of its own (cdk.json sets `routePolicies` nowhere): staging with a policy for mlflow only,
development with an audit policy for api only. Each Services template must equal the one cdk.json's
settings give, but for that one variable in that one container; cdk-nag runs on both stages.
"""

from __future__ import annotations

import copy
import json

import pytest

from runtime import names
from stacks.settings import CONTEXT_KEY, load_settings
from tests.support.cfn import container, environment_of, tasks_by_role
from tests.support.nag import nag_findings

pytestmark = pytest.mark.infra

POLICIES = {
    "staging": {
        names.MLFLOW_SERVICE: {
            "mode": "enforce",
            "rules": [
                {
                    "identities": ["worker"],
                    "methods": ["GET", "POST"],
                    "paths": ["/api/2.0/mlflow/runs/**", "/api/2.0/mlflow/experiments/*"],
                },
                {"identities": ["api"], "methods": ["*"], "paths": ["/api/2.0/mlflow/**"]},
                {"identities": ["*"], "methods": ["GET"], "paths": ["/health", "/version"]},
            ],
        }
    },
    "development": {
        names.API_SERVICE: {
            "mode": "audit",
            "rules": [{"identities": ["worker"], "methods": ["get"], "paths": ["/mlflow/**"]}],
        }
    },
}
SERVICE_OF_ROLE = {
    names.SERVER.role: names.MLFLOW_SERVICE,
    names.API.role: names.API_SERVICE,
    names.WORKER.role: names.WORKER_SERVICE,
}


def compact(document: dict) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


@pytest.fixture(scope="module")
def policy_settings(cdk_context) -> dict:
    raw = copy.deepcopy(cdk_context[CONTEXT_KEY])
    for env, policies in POLICIES.items():
        raw[env]["routePolicies"] = copy.deepcopy(policies)
    settings = load_settings(raw)
    return {env: settings[env] for env in POLICIES}


@pytest.fixture(scope="module")
def policy_app(tmp_path_factory, cdk_context, policy_settings):
    import aws_cdk as cdk
    from cdk_nag import AwsSolutionsChecks

    from stacks.stage import HokusaiStage

    app = cdk.App(context=cdk_context, outdir=str(tmp_path_factory.mktemp("route-policy.out")))
    stages = {env: HokusaiStage(app, settings=settings) for env, settings in policy_settings.items()}
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app, stages


@pytest.fixture(scope="module")
def policy_services(policy_app) -> dict:
    from aws_cdk.assertions import Template

    _, stages = policy_app
    return {env: Template.from_stack(stage.services).to_json() for env, stage in stages.items()}


@pytest.mark.parametrize("env", sorted(POLICIES))
def test_the_policy_reaches_only_its_servers_container_as_compact_json(policy_services, env):
    for role, (_, task) in tasks_by_role(policy_services[env]).items():
        service = SERVICE_OF_ROLE[role]
        variables = environment_of(task)
        if service in POLICIES[env]:
            assert variables[names.ENV_ROUTE_POLICY] == compact(POLICIES[env][service]), role
        else:
            assert names.ENV_ROUTE_POLICY not in variables, role
        secrets = {secret["Name"] for secret in container(task).get("Secrets", [])}
        assert names.ENV_ROUTE_POLICY not in secrets, role


@pytest.mark.parametrize("env", sorted(POLICIES))
def test_the_server_reads_the_policy_the_settings_checked(policy_services, policy_settings, env):
    from runtime.auth.route_policy import policy_from_environ

    for role, (_, task) in tasks_by_role(policy_services[env]).items():
        service = SERVICE_OF_ROLE[role]
        policy = policy_from_environ(environment_of(task))
        expected = policy_settings[env].route_policies.get(service)
        assert policy == (None if expected is None else expected.policy), role
    audit = {env: next(iter(s.route_policies.values())).policy.audit for env, s in policy_settings.items()}
    assert audit == {"staging": False, "development": True}


@pytest.mark.parametrize("env", sorted(POLICIES))
def test_nothing_else_changes_in_the_services_template(policy_services, services_templates, env):
    """The template of cdk.json's settings, once this one variable is taken out again."""
    changed = copy.deepcopy(policy_services[env])
    for _, task in tasks_by_role(changed).values():
        definition = container(task)
        definition["Environment"] = [
            item for item in definition["Environment"] if item["Name"] != names.ENV_ROUTE_POLICY
        ]
    assert changed == services_templates[env].to_json()


def test_cdk_json_sets_no_route_policy_so_no_container_gets_the_variable(
    services_templates, cdk_json_settings
):
    assert all(not s.route_policies for s in load_settings(cdk_json_settings).values())
    for env, template in services_templates.items():
        for role, (_, task) in tasks_by_role(template.to_json()).items():
            assert names.ENV_ROUTE_POLICY not in environment_of(task), (env, role)


def test_stages_with_route_policies_synthesize_and_pass_cdk_nag(policy_app):
    app, stages = policy_app
    app.synth()  # the registered cdk-nag plugin raises here on a finding
    for stage in stages.values():
        for stack in (stage.secrets, stage.network, stage.services, stage.monitoring):
            assert nag_findings(app, stack) == [], stack.stack_name
