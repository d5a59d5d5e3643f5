"""Secrets as the CDK half creates them (empty shells), reading them back, and rotating them
with our handler as the Lambda, for the lifecycle tests.

moto invokes a rotation Lambda only through Docker (docs/DESIGN.md), so `rotate` patches
`LambdaBackend.invoke` to call our handler with the events Secrets Manager sends.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from unittest import mock

import boto3

from runtime import names
from runtime.secrets.secret_store import SecretStore

ENVIRONMENT = "staging"
CERTIFICATE_SUFFIXES = (
    names.CA_KEY_SECRET,
    names.CA_BUNDLE_SECRET,
    names.CA_NEXT_SECRET,
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


def rotation_function(region: str, endpoint_url: str | None = None) -> str:
    """A Lambda function moto knows of (its code never runs: `rotate` runs ours in-process).

    `endpoint_url`: moto's server (`ThreadedMotoServer`) instead of the in-process mock; the
    server runs in this process, so `rotate`'s patch of `LambdaBackend.invoke` applies there too."""
    role = boto3.client("iam", region_name=region, endpoint_url=endpoint_url).create_role(
        RoleName="rotation",
        AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []}),
    )["Role"]["Arn"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("index.py", "def handler(event, context):\n    pass\n")
    return boto3.client("lambda", region_name=region, endpoint_url=endpoint_url).create_function(
        FunctionName="rotation",
        Runtime="python3.13",
        Role=role,
        Handler="index.handler",
        Code={"ZipFile": archive.getvalue()},
    )["FunctionArn"]


def rotate(
    client,
    function: str,
    secret_id: str,
    handler: Callable,
    *,
    before_step: Callable[[str], None] | None = None,
    **handler_options,
) -> dict[str, dict]:
    """rotate_secret with `handler` as the Lambda; returns, in the order run, each step's event
    and the secret's stages right after it (moto itself moves AWSCURRENT after the last step, so
    the stages after finishSecret show what our handler did)."""
    steps = {}

    def invoke(backend, function_name, qualifier, body, headers, response_headers):
        event = json.loads(body)
        if before_step:
            before_step(event["Step"])
        handler(event, None, client=client, **handler_options)
        steps[event["Step"]] = {"event": event, "stages": stages(client, secret_id)}
        return b""

    with mock.patch("moto.awslambda.models.LambdaBackend.invoke", invoke):
        client.rotate_secret(
            SecretId=secret_id, RotationLambdaARN=function, RotationRules={"AutomaticallyAfterDays": 30}
        )
    return steps


def stages(client, secret_id: str) -> dict[str, list[str]]:
    return client.describe_secret(SecretId=secret_id)["VersionIdsToStages"]


def current_version(client, secret_id: str) -> str:
    return next(v for v, s in stages(client, secret_id).items() if "AWSCURRENT" in s)
