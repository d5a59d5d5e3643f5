"""Secrets as the CDK half creates them (empty shells), and reading them back, for the lifecycle tests."""

from __future__ import annotations

from runtime import names
from runtime.secret_store import SecretStore

ENVIRONMENT = "staging"
CERTIFICATE_SUFFIXES = (
    names.CA_KEY_SECRET,
    names.CA_BUNDLE_SECRET,
    *(identity.secret_suffix for identity in names.IDENTITIES),
)


def create_shells(client, environment: str = ENVIRONMENT) -> list[str]:
    """`secretsmanager.Secret` without a value, as the stack makes them: no version yet."""
    created = []
    for suffix in CERTIFICATE_SUFFIXES:
        secret_id = names.secret_name(environment, suffix)
        client.create_secret(Name=secret_id, Description="hokusai-mtls test shell")
        created.append(secret_id)
    return created


def version_counts(client, environment: str = ENVIRONMENT) -> dict[str, int]:
    return {
        suffix: len(
            client.list_secret_version_ids(SecretId=names.secret_name(environment, suffix))["Versions"]
        )
        for suffix in CERTIFICATE_SUFFIXES
    }


def store(client, environment: str = ENVIRONMENT) -> SecretStore:
    return SecretStore(environment, client=client)
