#!/usr/bin/env python3
"""CDK entry point: one Stage (`Hokusai-<env>`) per environment in cdk.json's context.

`make synth` runs this through the pinned CDK CLI; tests call `build_app()` directly.
cdk-nag's AwsSolutions pack runs on every synth: an unacknowledged finding fails it.
"""

from __future__ import annotations

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from stacks.settings import CONTEXT_KEY, SERVICES_KEY, load_services, load_settings
from stacks.stage import HokusaiStage


def build_app(app: cdk.App | None = None) -> cdk.App:
    """Add every environment's stage and the cdk-nag checks to `app` (a new App by default)."""
    app = app if app is not None else cdk.App()
    services = load_services(app.node.try_get_context(SERVICES_KEY))  # checked before any environment
    for settings in load_settings(app.node.try_get_context(CONTEXT_KEY), services).values():
        HokusaiStage(app, settings=settings)
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app


if __name__ == "__main__":
    build_app().synth()
