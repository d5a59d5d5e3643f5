"""One Stage per environment (`Hokusai-<env>`), holding that environment's stacks."""

from __future__ import annotations

from aws_cdk import Environment, RemovalPolicy, Stage
from constructs import Construct

from stacks.monitoring_stack import MonitoringStack
from stacks.network_stack import NetworkStack
from stacks.secrets_stack import SecretsStack
from stacks.services_stack import ServicesStack
from stacks.settings import EnvironmentSettings


class HokusaiStage(Stage):
    """`Secrets` (key, certificate secrets; with `apiKeyStore` the API-key hashing secret), `Network`
    (VPC, cluster, namespace; absent when all of them are imported), `Services` (Fargate services,
    roles, security groups, logs) and `Monitoring` (dashboard, alarms, the encrypted alarm topic)."""

    def __init__(
        self, scope: Construct, *, settings: EnvironmentSettings, stage_id: str | None = None
    ) -> None:
        """`stage_id` defaults to `Hokusai-<env>`; another id lets one app hold more copies (benchmarks)."""
        env = None
        if settings.account is not None or settings.region is not None:
            env = Environment(account=settings.account, region=settings.region)
        super().__init__(scope, stage_id or settings.stage_name, env=env)
        self.settings = settings
        self.secrets = SecretsStack(self, "Secrets", settings=settings)
        # A stack without resources cannot deploy: with vpc, cluster and namespace all
        # imported there is no Network stack and the Services stack imports them itself.
        self.network = NetworkStack(self, "Network", settings=settings) if settings.creates_network else None
        self.services = ServicesStack(
            self,
            "Services",
            settings=settings,
            certificates=self.secrets.certificates,
            key_hash_secret=self.secrets.key_hash_secret,
            network=self.network.network if self.network else None,
        )
        self.monitoring = MonitoringStack(
            self,
            "Monitoring",
            environment=settings.environment,
            alarm_emails=list(settings.alarm_emails),
            leaf_lifetime_hours=settings.leaf_lifetime_hours,
            mtls_failure_rate_percent=settings.mtls_failure_rate_percent,
            mtls_failure_min_requests=settings.mtls_failure_min_requests,
            removal_policy=RemovalPolicy.RETAIN if settings.retain else RemovalPolicy.DESTROY,
            catalog=settings.catalog,
        )
