"""The `Secrets` stack: the KMS key, the mTLS certificate secrets of one environment and their
lifecycle (issuance custom resource, rotation schedules, expiry check): rotation must live in the
secrets' stack (cdk-nag SMG4 looks for the RotationSchedule there). With `apiKeyStore`, also the
API-key store's hashing secret (`constructs_lib.key_hash_secret`: retained, never rotated)."""

from __future__ import annotations

from typing import Any

from aws_cdk import RemovalPolicy, Stack
from constructs import Construct

from constructs_lib.certificate_lifecycle import CertificateLifecycle
from constructs_lib.certificate_secrets import CertificateSecrets
from constructs_lib.key_hash_secret import KeyHashSecret
from stacks.settings import EnvironmentSettings


class SecretsStack(Stack):
    """Attributes: `certificates` (CertificateSecrets), `lifecycle` (CertificateLifecycle) and
    `key_hash_secret` (KeyHashSecret, encrypted with the certificates' key; None without `apiKeyStore`)."""

    def __init__(
        self, scope: Construct, construct_id: str, *, settings: EnvironmentSettings, **kwargs: Any
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description=f"hokusai-mtls {settings.environment}: mTLS certificate secrets, issuance, rotation, expiry check",
            **kwargs,
        )
        removal_policy = RemovalPolicy.RETAIN if settings.retain else RemovalPolicy.DESTROY
        self.certificates = CertificateSecrets(
            self,
            "Certificates",
            environment=settings.environment,
            removal_policy=removal_policy,
            identities=settings.catalog.identities,
        )
        self.lifecycle = CertificateLifecycle(
            self,
            "Lifecycle",
            certificates=self.certificates,
            environment=settings.environment,
            leaf_lifetime_hours=settings.leaf_lifetime_hours,
            rotation_hours=settings.rotation_hours,
            key_type=settings.key_type,
            server_sans=settings.server_sans,
            ca_source=settings.ca_source,
            ca_rollover_start_days=settings.ca_rollover_start_days,
            ca_rollover_wait_days=settings.ca_rollover_wait_days,
            log_retention_days=settings.log_retention_days,
            removal_policy=removal_policy,
            catalog=settings.catalog,
        )
        self.key_hash_secret = (
            KeyHashSecret(
                self, "ApiKeyHashSecret", environment=settings.environment, key=self.certificates.key
            )
            if settings.api_key_store is not None
            else None
        )
