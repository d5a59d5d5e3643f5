"""One Stage per environment (`Hokusai-<env>`), holding that environment's stacks."""

from __future__ import annotations

from aws_cdk import Environment, Stage
from constructs import Construct

from stacks.secrets_stack import SecretsStack
from stacks.settings import EnvironmentSettings


class HokusaiStage(Stage):
    def __init__(self, scope: Construct, *, settings: EnvironmentSettings) -> None:
        env = None
        if settings.account is not None or settings.region is not None:
            env = Environment(account=settings.account, region=settings.region)
        super().__init__(scope, settings.stage_name, env=env)
        self.settings = settings
        self.secrets = SecretsStack(self, "Secrets", settings=settings)
