"""Secrets Manager rotation for one `hokusai/<env>/mlflow/<identity>-identity` secret.

The four steps (`runtime.lifecycle.rotation_steps`), for a leaf:

- createSecret  issue a fresh key and certificate from the CA in `ca-key` (AWSPENDING)
- testSecret    the pending pair must verify (`verify_for`) against the current `ca-cert` bundle and
                complete a real mutual TLS handshake with a throwaway peer from the same CA
- finishSecret  AWSCURRENT moves to it; services load it within their refresh interval

Environment: `runtime.lifecycle.ENV_LEAF_LIFETIME_HOURS`, `ENV_KEY_TYPE`, `ENV_SERVER_SANS`.
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

from cryptography import x509

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import verify_for
from runtime.certificates.files import PRIVATE_FILE_MODE, write_file_atomic
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.issuance import CertificateAuthority, KeyType, check_leaf_lifetime
from runtime.errors import CertificateError, LifetimeError, SecretStoreError
from runtime.lifecycle import ENV_KEY_TYPE, ENV_LEAF_LIFETIME_HOURS, ENV_SERVER_SANS
from runtime.lifecycle.clients import secrets_client
from runtime.lifecycle.rotation_steps import STEPS, RotationError, run_step
from runtime.secrets.secret_store import SecretStore
from runtime.service_catalog import catalog_from_environ

__all__ = ["STEPS", "RotationError", "handler", "handshake", "leaf_lifetime_hours"]

log = logging.getLogger("hokusai_mtls")

_IDENTITY_SECRET = re.compile(
    rf"^hokusai/(?P<environment>[a-z0-9-]+)/mlflow/(?P<name>[a-z0-9-]+){names.IDENTITY_SECRET_SUFFIX}$"
)
_HANDSHAKE_ROUNDS = 10


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
            identity = catalog_from_environ(os.environ).identity_by_name(match["name"])
        except ValueError as exc:
            raise RotationError(
                f"refusing to rotate {secret_name}: this function rotates only "
                f"hokusai/<env>/mlflow/<identity>{names.IDENTITY_SECRET_SUFFIX} secrets ({exc})"
            ) from None
        return cls(secret_name, environment, identity)


def handler(event, context, *, client=None) -> None:
    """Secrets Manager's rotation entry point: {"Step", "SecretId", "ClientRequestToken"}."""
    client = client or secrets_client()
    run_step(event, client, lambda name: IdentityRotation(Target.from_name(name), client))


class IdentityRotation:
    """A fresh key and leaf for one identity, issued by the CA in `ca-key`."""

    def __init__(self, target: Target, client) -> None:
        self.target = target
        self.secret_id = target.secret_id
        self._store = SecretStore(target.environment, client=client)

    def create(self) -> str:
        ca = self._store.fetch_ca()
        environment, identity = self.target.environment, self.target.identity
        key_type, lifetime_hours = _key_type(), leaf_lifetime_hours()
        extra = {"extra_sans": _server_sans()} if identity.serves else {}
        tls = ca.issue(environment, identity, key_type=key_type, lifetime_hours=lifetime_hours, **extra)
        log.info(
            "createSecret %s: issued serial %x, valid until %s",
            self.secret_id,
            tls.certificate.serial_number,
            tls.certificate.not_valid_after_utc.isoformat(),
        )
        return tls.to_secret_string()

    def test(self, value: str, token: str) -> None:
        try:
            pending = TLSIdentity.from_secret_string(value, f"{self.secret_id} (AWSPENDING {token})")
            bundle = self._store.fetch_trust_bundle()
            verify_for(self.target.identity, pending, bundle, self.target.environment)
            handshake(self.target.identity, pending, self._store.fetch_ca(), bundle, self.target.environment)
        except (CertificateError, SecretStoreError, ssl.SSLError) as exc:
            raise RotationError(f"testSecret {self.secret_id}: the new certificate fails: {exc}") from exc

    def after_finish(self) -> None:
        """Nothing follows: the leaf is the whole change."""


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
    throwaway_hours = 1
    if identity.serves:  # a server (or both: verify_for checked its client usage) serves the handshake
        server, client = tls, ca.issue_client(environment, "rotation-test", lifetime_hours=throwaway_hours)
        hostname = identity.hostname(environment)
    else:
        server, client = ca.issue_server(environment, lifetime_hours=throwaway_hours), tls
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
    _complete(_End(server_context, server_side=True), _End(client_context, server_hostname=hostname))


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


# --- settings from the environment -----------------------------------------------------
def leaf_lifetime_hours() -> float | None:
    """ENV_LEAF_LIFETIME_HOURS, or None for the runtime's per-environment default."""
    value = os.environ.get(ENV_LEAF_LIFETIME_HOURS, "").strip()
    if not value:
        return None  # the runtime's per-environment default
    try:
        return check_leaf_lifetime(float(value))
    except (ValueError, LifetimeError):
        raise RotationError(
            f"{ENV_LEAF_LIFETIME_HOURS}={value!r} is not a leaf lifetime in hours (at least 1/60)"
        ) from None


def _key_type() -> KeyType:
    value = os.environ.get(ENV_KEY_TYPE, "").strip() or KeyType.ECDSA_P256.value
    try:
        return KeyType(value)
    except ValueError:
        choices = ", ".join(k.value for k in KeyType)
        raise RotationError(f"{ENV_KEY_TYPE}={value!r}; expected one of {choices}") from None


def _server_sans() -> tuple[str, ...]:
    return tuple(s.strip() for s in os.environ.get(ENV_SERVER_SANS, "").split(",") if s.strip())
