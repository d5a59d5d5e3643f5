"""Secrets Manager rotation for one `hokusai/<env>/mlflow/<identity>-identity` secret.

Secrets Manager calls `handler` four times per rotation with the same ClientRequestToken:

- createSecret  issue a fresh key and certificate from the CA in `ca-key`; store it as AWSPENDING
                under the token (once: a retried step finds it there and does nothing)
- setSecret     nothing: unlike a database password, a certificate has no second copy elsewhere to
                change. Services pick the new version up from the secret itself (loader, reload).
- testSecret    the pending pair must verify (`verify_for`) against the current `ca-cert` bundle and
                complete a real mutual TLS handshake with a throwaway peer from the same CA;
                any failure raises, and Secrets Manager stops with AWSCURRENT untouched
- finishSecret  move AWSCURRENT to the token's version and take AWSPENDING off it

Checks follow the AWS rotation template: rotation enabled, the token is a version of the secret,
the version is AWSPENDING (or already AWSCURRENT: a retried step that has nothing left to do).

Environment: `runtime.lifecycle.ENV_LEAF_LIFETIME_DAYS`, `ENV_KEY_TYPE`, `ENV_SERVER_SANS`.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509

from runtime import names, pem
from runtime.certset import verify_for
from runtime.errors import CertificateError, MtlsError, SecretStoreError
from runtime.files import PRIVATE_FILE_MODE, write_file_atomic
from runtime.identity import TLSIdentity
from runtime.issuance import CertificateAuthority, KeyType
from runtime.lifecycle import ENV_KEY_TYPE, ENV_LEAF_LIFETIME_DAYS, ENV_SERVER_SANS
from runtime.lifecycle.clients import secrets_client
from runtime.secret_store import SecretStore, translate

log = logging.getLogger("hokusai_mtls")

CURRENT, PENDING = "AWSCURRENT", "AWSPENDING"
STEPS = ("createSecret", "setSecret", "testSecret", "finishSecret")
_IDENTITY_SECRET = re.compile(
    rf"^hokusai/(?P<environment>[a-z]+)/mlflow/(?P<name>[a-z0-9-]+){names.IDENTITY_SECRET_SUFFIX}$"
)
_HANDSHAKE_ROUNDS = 10


class RotationError(MtlsError):
    """A rotation step refused or failed; Secrets Manager stops the rotation on it."""

    code = "rotation-failed"


@dataclass(frozen=True)
class Target:
    """The identity secret being rotated, as its name tells."""

    secret_id: str
    environment: str
    identity: names.Identity

    @classmethod
    def from_name(cls, secret_name: str) -> Target:
        match = _IDENTITY_SECRET.match(secret_name)
        try:
            if match is None:
                raise ValueError("not an identity secret")
            environment = names.check_environment(match["environment"])
            identity = names.identity_by_name(match["name"])
        except ValueError as exc:
            raise RotationError(
                f"refusing to rotate {secret_name}: this function rotates only "
                f"hokusai/<env>/mlflow/<identity>{names.IDENTITY_SECRET_SUFFIX} secrets ({exc})"
            ) from None
        return cls(secret_name, environment, identity)


def handler(event, context, *, client=None) -> None:
    """Secrets Manager's rotation entry point: {"Step", "SecretId", "ClientRequestToken"}."""
    step, secret_arn, token = event["Step"], event["SecretId"], event["ClientRequestToken"]
    if step not in STEPS:
        raise RotationError(f"unknown rotation step {step!r}; expected one of {', '.join(STEPS)}")
    client = client or secrets_client()
    metadata = _call(secret_arn, client.describe_secret, SecretId=secret_arn)
    target = Target.from_name(metadata["Name"])
    if not metadata.get("RotationEnabled"):
        raise RotationError(f"secret {target.secret_id}: rotation is not enabled")
    versions = metadata.get("VersionIdsToStages", {})
    if token not in versions:
        raise RotationError(f"secret {target.secret_id}: version {token} has no stage for rotation")
    if CURRENT in versions[token]:
        log.info("%s %s: version %s is already AWSCURRENT", step, target.secret_id, token)
        if step == "finishSecret" and PENDING in versions[token]:
            _remove_pending(client, target, token)
        return
    if PENDING not in versions[token]:
        raise RotationError(f"secret {target.secret_id}: version {token} is not AWSPENDING")
    store = SecretStore(target.environment, client=client)
    if step == "createSecret":
        create_secret(client, store, target, token)
    elif step == "testSecret":
        test_secret(client, store, target, token)
    elif step == "finishSecret":
        finish_secret(client, target, token, versions)
    # setSecret: nothing to set (module docstring).
    log.info("%s %s: done for version %s", step, target.secret_id, token)


# --- the steps ---------------------------------------------------------------------------
def create_secret(client, store: SecretStore, target: Target, token: str) -> None:
    if _pending_value(client, target, token) is not None:
        log.info("createSecret %s: version %s already holds a value", target.secret_id, token)
        return
    ca = store.fetch_ca()
    options = {"key_type": _key_type(), "lifetime_days": _lifetime_days()}
    if target.identity.kind is names.Kind.SERVER:
        options["extra_sans"] = _server_sans()
    tls = ca.issue(target.environment, target.identity, **options)
    _call(
        target.secret_id,
        client.put_secret_value,
        SecretId=target.secret_id,
        ClientRequestToken=token,
        SecretString=tls.to_secret_string(),
        VersionStages=[PENDING],
    )
    log.info(
        "createSecret %s: issued serial %x, valid until %s",
        target.secret_id,
        tls.certificate.serial_number,
        tls.certificate.not_valid_after_utc.isoformat(),
    )


def test_secret(client, store: SecretStore, target: Target, token: str) -> None:
    value = _pending_value(client, target, token)
    if value is None:
        raise RotationError(f"secret {target.secret_id}: version {token} holds no value to test")
    try:
        pending = TLSIdentity.from_secret_string(value, f"{target.secret_id} (AWSPENDING {token})")
        bundle = store.fetch_trust_bundle()
        verify_for(target.identity, pending, bundle, target.environment)
        handshake(target.identity, pending, store.fetch_ca(), bundle, target.environment)
    except (CertificateError, SecretStoreError, ssl.SSLError) as exc:
        raise RotationError(f"testSecret {target.secret_id}: the new certificate fails: {exc}") from exc


def finish_secret(client, target: Target, token: str, versions: dict[str, list[str]]) -> None:
    current = next((v for v, stages in versions.items() if CURRENT in stages), None)
    moves = {"MoveToVersionId": token}
    if current is not None:
        moves["RemoveFromVersionId"] = current
    _call(
        target.secret_id,
        client.update_secret_version_stage,
        SecretId=target.secret_id,
        VersionStage=CURRENT,
        **moves,
    )
    _remove_pending(client, target, token)
    log.info("finishSecret %s: version %s is AWSCURRENT (was %s)", target.secret_id, token, current)


# --- the handshake ------------------------------------------------------------------------
def handshake(
    identity: names.Identity,
    tls: TLSIdentity,
    ca: CertificateAuthority,
    bundle: Sequence[x509.Certificate],
    environment: str,
) -> None:
    """A full mutual TLS handshake between `tls` and a throwaway peer that `ca` issues.

    OpenSSL runs both ends over memory BIOs: the same handshake as over loopback, including the
    server's check of the client certificate (EKU, chain) and the client's of the server name,
    but with no port to bind and no thread in the Lambda. Keys touch disk only because
    `load_cert_chain` reads files: a private temporary directory, removed at once.
    """
    throwaway = {"lifetime_days": 1}
    if identity.kind is names.Kind.SERVER:
        server, client = tls, ca.issue_client(environment, "rotation-test", **throwaway)
    else:
        server, client = ca.issue_server(environment, **throwaway), tls
    hostname = names.mlflow_hostname(environment)
    cadata = pem.bundle_pem(list(bundle)).decode()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with tempfile.TemporaryDirectory(prefix="hokusai-mtls-rotation-") as directory:
        for context, pair, name in ((server_context, server, "server"), (client_context, client, "client")):
            path = write_file_atomic(Path(directory) / f"{name}.pem", pair.combined_pem(), PRIVATE_FILE_MODE)
            context.load_cert_chain(path)
            context.load_verify_locations(cadata=cadata)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server = _End(server_context, server_side=True)
    client = _End(client_context, server_hostname=hostname)
    _complete(server, client)


class _End:
    """One end of the in-memory connection: its TLS object and the two buffers it reads and writes."""

    def __init__(self, context: ssl.SSLContext, **options) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, **options)


def _complete(server: _End, client: _End) -> None:
    """Pump bytes between the two ends until both finished the handshake and one byte went across."""
    done: set[int] = set()
    for _ in range(_HANDSHAKE_ROUNDS):
        for end in (client, server):
            if id(end) not in done:
                try:
                    end.tls.do_handshake()
                    done.add(id(end))
                except ssl.SSLWantReadError:
                    pass
        _pump(client, server)
        if len(done) == 2:
            break
    else:
        raise ssl.SSLError("the test handshake did not complete")
    if not server.tls.getpeercert(binary_form=True):
        raise ssl.SSLError("the test server saw no client certificate")
    client.tls.write(b"\x00")
    _pump(client, server)
    if server.tls.read(1) != b"\x00":
        raise ssl.SSLError("no data crossed the test connection")


def _pump(client: _End, server: _End) -> None:
    server.incoming.write(client.outgoing.read())
    client.incoming.write(server.outgoing.read())


# --- helpers -------------------------------------------------------------------------------
def _bios(end: ssl.SSLObject) -> tuple[ssl.MemoryBIO, ssl.MemoryBIO]:
    return _BIOS[id(end)]


_BIOS: dict[int, tuple[ssl.MemoryBIO, ssl.MemoryBIO]] = {}


def _pending_value(client, target: Target, token: str) -> str | None:
    """The token's AWSPENDING value, or None while the version has none (as rotate_secret leaves it)."""
    try:
        response = client.get_secret_value(SecretId=target.secret_id, VersionId=token, VersionStage=PENDING)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return None
        raise translate(target.secret_id, exc) from exc
    except BotoCoreError as exc:
        raise translate(target.secret_id, exc) from exc
    return response.get("SecretString")


def _remove_pending(client, target: Target, token: str) -> None:
    _call(
        target.secret_id,
        client.update_secret_version_stage,
        SecretId=target.secret_id,
        VersionStage=PENDING,
        RemoveFromVersionId=token,
    )


def _call(secret_id: str, method, **arguments):
    try:
        return method(**arguments)
    except (ClientError, BotoCoreError) as exc:
        raise translate(secret_id, exc) from exc


def _lifetime_days() -> int | None:
    value = os.environ.get(ENV_LEAF_LIFETIME_DAYS, "").strip()
    if not value:
        return None  # the runtime's per-environment default
    try:
        return int(value)
    except ValueError:
        raise RotationError(f"{ENV_LEAF_LIFETIME_DAYS}={value!r} is not a whole number of days") from None


def _key_type() -> KeyType:
    value = os.environ.get(ENV_KEY_TYPE, "").strip() or KeyType.ECDSA_P256.value
    try:
        return KeyType(value)
    except ValueError:
        choices = ", ".join(k.value for k in KeyType)
        raise RotationError(f"{ENV_KEY_TYPE}={value!r}; expected one of {choices}") from None


def _server_sans() -> tuple[str, ...]:
    return tuple(s.strip() for s in os.environ.get(ENV_SERVER_SANS, "").split(",") if s.strip())
