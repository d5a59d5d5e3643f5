"""The `Secrets` stack: the KMS key and the (empty) mTLS certificate secrets of one environment."""

from __future__ import annotations

from typing import Any

from aws_cdk import RemovalPolicy, Stack
from constructs import Construct

from constructs_lib.certificate_secrets import CertificateSecrets
from stacks.settings import EnvironmentSettings


class SecretsStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, settings: EnvironmentSettings, **kwargs: Any
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description=f"hokusai-mtls {settings.environment}: KMS key and mTLS certificate secrets",
            **kwargs,
        )
        self.certificates = CertificateSecrets(
            self,
            "Certificates",
            environment=settings.environment,
            removal_policy=RemovalPolicy.RETAIN if settings.retain else RemovalPolicy.DESTROY,
        )
