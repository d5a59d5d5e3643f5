"""Secrets Manager's four-step rotation protocol, shared by the identity and the CA rotations.

Secrets Manager calls a rotation Lambda four times per rotation with the same ClientRequestToken:

- createSecret  make the new value and store it as AWSPENDING under the token (once: a retried
                step finds it there and does nothing)
- setSecret     nothing here: a certificate has no second copy elsewhere to change; services
                pick the new version up from the secret itself (loader, reload)
- testSecret    the pending value must pass the rotation's checks; any failure raises, and
                Secrets Manager stops with AWSCURRENT untouched
- finishSecret  move AWSCURRENT to the token's version, take AWSPENDING off it, then let the
                rotation complete what follows from the new value (`Rotation.after_finish`)

`run_step` does the protocol's bookkeeping the AWS rotation template does (rotation enabled, the
token is a version of the secret, the version is AWSPENDING or already AWSCURRENT: a retried step
with nothing left to do) and leaves only "what is the new value" and "is it good" to a `Rotation`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from botocore.exceptions import BotoCoreError, ClientError

from runtime.errors import MtlsError
from runtime.secrets.secret_store import translate

log = logging.getLogger("hokusai_mtls")

CURRENT, PENDING = "AWSCURRENT", "AWSPENDING"
STEPS = ("createSecret", "setSecret", "testSecret", "finishSecret")


class RotationError(MtlsError):
    """A rotation step refused or failed; Secrets Manager stops the rotation on it."""

    code = "rotation-failed"


class Rotation(Protocol):
    """One rotation of one secret: what its new value is, and whether a value is good."""

    secret_id: str

    def create(self) -> str:
        """The new value (AWSPENDING); raise `RotationError` to stop the rotation."""

    def test(self, value: str, token: str) -> None:
        """Raise `RotationError` if `value` (the token's AWSPENDING version) must not become current."""

    def after_finish(self) -> None:
        """Complete what follows once the new value is AWSCURRENT (idempotent: a retry runs it again)."""


def run_step(event, client, resolve: Callable[[str], Rotation]) -> None:
    """Carry out one step of `event` ({"Step", "SecretId", "ClientRequestToken"}) for `resolve(name)`."""
    step, secret_arn, token = event["Step"], event["SecretId"], event["ClientRequestToken"]
    if step not in STEPS:
        raise RotationError(f"unknown rotation step {step!r}; expected one of {', '.join(STEPS)}")
    metadata = call(secret_arn, client.describe_secret, SecretId=secret_arn)
    rotation = resolve(metadata["Name"])
    secret_id = rotation.secret_id
    if not metadata.get("RotationEnabled"):
        raise RotationError(f"secret {secret_id}: rotation is not enabled")
    versions = metadata.get("VersionIdsToStages", {})
    if token not in versions:
        raise RotationError(f"secret {secret_id}: version {token} has no stage for rotation")
    if CURRENT in versions[token]:
        log.info("%s %s: version %s is already AWSCURRENT", step, secret_id, token)
        if step == "finishSecret":
            if PENDING in versions[token]:
                _remove_pending(client, secret_id, token)
            rotation.after_finish()
        return
    if PENDING not in versions[token]:
        raise RotationError(f"secret {secret_id}: version {token} is not AWSPENDING")
    if step == "createSecret":
        if pending_value(client, secret_id, token) is not None:
            log.info("createSecret %s: version %s already holds a value", secret_id, token)
            return
        value = rotation.create()
        call(
            secret_id,
            client.put_secret_value,
            SecretId=secret_id,
            ClientRequestToken=token,
            SecretString=value,
            VersionStages=[PENDING],
        )
    elif step == "testSecret":
        pending = pending_value(client, secret_id, token)
        if pending is None:
            raise RotationError(f"secret {secret_id}: version {token} holds no value to test")
        rotation.test(pending, token)
    elif step == "finishSecret":
        _promote(client, secret_id, token, versions)
        rotation.after_finish()
    # setSecret: nothing to set (module docstring).
    log.info("%s %s: done for version %s", step, secret_id, token)


def pending_value(client, secret_id: str, token: str) -> str | None:
    """The token's AWSPENDING value, or None while the version has none (as rotate_secret leaves it)."""
    try:
        response = client.get_secret_value(SecretId=secret_id, VersionId=token, VersionStage=PENDING)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return None
        raise translate(secret_id, exc) from exc
    except BotoCoreError as exc:
        raise translate(secret_id, exc) from exc
    return response.get("SecretString")


def current_value(client, secret_id: str) -> str:
    response = call(secret_id, client.get_secret_value, SecretId=secret_id, VersionStage=CURRENT)
    return response["SecretString"]


def call(secret_id: str, method, **arguments):
    """A Secrets Manager call whose failure names the secret (`runtime.secrets.secret_store.translate`)."""
    try:
        return method(**arguments)
    except (ClientError, BotoCoreError) as exc:
        raise translate(secret_id, exc) from exc


def _promote(client, secret_id: str, token: str, versions: dict[str, list[str]]) -> None:
    current = next((v for v, stages in versions.items() if CURRENT in stages), None)
    moves = {"MoveToVersionId": token}
    if current is not None:
        moves["RemoveFromVersionId"] = current
    call(secret_id, client.update_secret_version_stage, SecretId=secret_id, VersionStage=CURRENT, **moves)
    _remove_pending(client, secret_id, token)
    log.info("finishSecret %s: version %s is AWSCURRENT (was %s)", secret_id, token, current)


def _remove_pending(client, secret_id: str, token: str) -> None:
    call(
        secret_id,
        client.update_secret_version_stage,
        SecretId=secret_id,
        VersionStage=PENDING,
        RemoveFromVersionId=token,
    )
