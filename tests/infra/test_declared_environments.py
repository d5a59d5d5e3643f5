"""Environments are data (issue 15): an environment named `qa` synthesizes like any other, cdk-nag clean,
and whether a service may degrade is the `mayDegrade` setting written into every container."""

from __future__ import annotations

import copy

import pytest

from runtime import names
from stacks.settings import CONTEXT_KEY
from tests.support.cfn import environment_of, resources
from tests.support.nag import nag_findings

pytestmark = pytest.mark.infra


@pytest.fixture(scope="module")
def qa_stage(cdk_context, tmp_path_factory):
    import aws_cdk as cdk

    from app import build_app

    staging = copy.deepcopy(cdk_context[CONTEXT_KEY]["staging"])
    staging["vpc"]["create"]["cidr"] = staging["internalCidrs"][0] = "10.40.0.0/16"
    staging["mlflow"] = {
        "backendStoreSecretName": "hokusai/qa/mlflow-backend-store-uri",
        "artifactsDestination": "s3://hokusai-qa-mlflow-artifacts/mlflow",
    }
    context = {**cdk_context, CONTEXT_KEY: {"qa": staging}}
    app = build_app(cdk.App(context=context, outdir=str(tmp_path_factory.mktemp("qa.out"))))
    stage = app.node.find_child("Hokusai-qa")
    assert nag_findings(app, stage) == []
    app.synth()  # and cdk-nag runs again here: a finding raises
    return stage


def test_an_environment_named_qa_synthesizes_with_its_own_names(qa_stage):
    from aws_cdk.assertions import Template

    secrets = Template.from_stack(qa_stage.secrets).to_json()
    secret_names = {
        r["Properties"].get("Name") for r in resources(secrets, "AWS::SecretsManager::Secret").values()
    }
    for identity in names.IDENTITIES:
        assert names.identity_secret_name("qa", identity) in secret_names
    services = Template.from_stack(qa_stage.services).to_json()
    tasks = resources(services, "AWS::ECS::TaskDefinition").values()
    assert {environment_of(task)[names.ENV_ENVIRONMENT] for task in tasks} == {"qa"}
    assert {environment_of(task)[names.ENV_MAY_DEGRADE] for task in tasks} == {"false"}


def test_only_an_environment_that_may_degrade_tells_its_containers_so(stages):
    from aws_cdk.assertions import Template

    for env, expected in (("development", "true"), ("staging", "false"), ("production", "false")):
        template = Template.from_stack(stages[env].services).to_json()
        tasks = resources(template, "AWS::ECS::TaskDefinition").values()
        assert {environment_of(task)[names.ENV_MAY_DEGRADE] for task in tasks} == {expected}, env
