"""The certificate secrets in AWS Secrets Manager: fetch with named errors, upload idempotently.

The caller may pass its own boto3 client (tests pass moto's); otherwise one is made
with botocore's *standard* retry mode, which backs off on throttling and transient
errors for us. Every failure names the secret and the cause.

A read may carry a deadline (the loader's budget, HOKUSAI_MTLS_SECRETS_BUDGET_SECONDS): the
call then runs in a daemon thread and is abandoned when the deadline passes, because botocore
has per-attempt timeouts but no total one (5 attempts of a hung endpoint add up). The abandoned
call ends by botocore's own timeouts; its result is discarded.

Secret values (see README "Secrets"):
  ca-cert            PEM trust bundle (one or more CAs)
  ca-key             JSON {schema, certificate, private_key}: the issuing CA
  <id>-identity      JSON {schema, certificate, private_key}: one service's identity
  ca-crl             PEM revocation lists (X509 CRL), signed by the CA each names; read by servers
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError
from cryptography import x509

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.issuance import CertificateAuthority
from runtime.certificates.revocation import Revocations
from runtime.certificates.verification import check_trust_bundle
from runtime.errors import (
    CertificateError,
    SecretAccessDeniedError,
    SecretContentError,
    SecretDecryptionError,
    SecretNotFoundError,
    SecretStoreError,
    SecretThrottledError,
    SecretUnavailableError,
)
from runtime.service_catalog import Catalog, catalog_from_environ

RETRY_ATTEMPTS = 5
"""Total attempts per call under botocore's standard retry mode (exponential backoff, jitter)."""
CONNECT_TIMEOUT_SECONDS = 3
READ_TIMEOUT_SECONDS = 5
"""Per attempt: GetSecretValue answers in milliseconds; a hung endpoint should cost an attempt, not 15 s."""

_CLIENT_ERRORS: dict[str, tuple[type[SecretStoreError], str]] = {
    "ResourceNotFoundException": (SecretNotFoundError, "not found"),
    "AccessDeniedException": (SecretAccessDeniedError, "access denied"),
    "DecryptionFailure": (SecretDecryptionError, "KMS could not decrypt the value"),
    "KMSAccessDeniedException": (SecretDecryptionError, "KMS denied decrypting the value"),
    "ThrottlingException": (SecretThrottledError, f"throttled after {RETRY_ATTEMPTS} attempts"),
    "TooManyRequestsException": (SecretThrottledError, f"throttled after {RETRY_ATTEMPTS} attempts"),
    "RequestLimitExceeded": (SecretThrottledError, f"throttled after {RETRY_ATTEMPTS} attempts"),
}


def make_client(region: str | None = None):
    """A Secrets Manager client with standard retries; honours AWS_ENDPOINT_URL_SECRETS_MANAGER."""
    config = Config(
        retries={"mode": "standard", "total_max_attempts": RETRY_ATTEMPTS},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
    )
    # ECS sets AWS_REGION; botocore itself reads only AWS_DEFAULT_REGION and the config file.
    region = region or os.environ.get("AWS_REGION") or None
    return boto3.session.Session().client("secretsmanager", region_name=region, config=config)


def translate(secret_id: str, exc: Exception) -> SecretStoreError:
    """Map a botocore failure to our named error (the AWS message is kept; it holds no secret)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        kind, what = _CLIENT_ERRORS.get(error.get("Code", ""), (SecretStoreError, error.get("Code", "error")))
        return kind(secret_id, f"{what}: {error.get('Message', exc)}")
    if isinstance(exc, NoCredentialsError | NoRegionError):
        return SecretUnavailableError(secret_id, f"{exc} (set AWS credentials and AWS_REGION)")
    return SecretUnavailableError(secret_id, f"Secrets Manager unreachable: {exc}")


def _before(deadline: float | None, secret_id: str, call):
    """`call()`, abandoned with `SecretUnavailableError` if it has not answered by `deadline`."""
    if deadline is None:
        return call()
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise SecretUnavailableError(
            secret_id, f"not read: the {names.ENV_SECRETS_BUDGET_SECONDS} budget is spent"
        )
    outcome: dict = {}
    answered = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the waiting thread as is
            outcome["error"] = exc
        finally:
            answered.set()

    threading.Thread(target=run, name=f"hokusai-mtls-read {secret_id}", daemon=True).start()
    if not answered.wait(remaining):
        raise SecretUnavailableError(
            secret_id,
            f"Secrets Manager did not answer within the time left of the load's budget "
            f"({names.ENV_SECRETS_BUDGET_SECONDS}); the call is abandoned",
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass(frozen=True)
class UploadResult:
    secret_id: str
    action: str
    """`created`, `updated` (a new version became AWSCURRENT) or `unchanged`."""


class SecretStore:
    """One environment's certificate secrets under `hokusai/<env>/mlflow/`."""

    def __init__(
        self, environment: str, *, client=None, region: str | None = None, catalog: Catalog | None = None
    ) -> None:
        """`catalog`: the declared services whose identities live here; default HOKUSAI_MTLS_SERVICES's
        (the stacks set it in every Lambda), else our three."""
        self.environment = names.check_environment(environment)
        self.catalog = catalog or catalog_from_environ(os.environ)
        if client is None:
            try:
                client = make_client(region)
            except BotoCoreError as exc:  # e.g. no region configured
                raise translate(self.name(""), exc) from exc
        self._client = client

    def name(self, suffix: str) -> str:
        return names.secret_name(self.environment, suffix)

    # --- reading ----------------------------------------------------------------------
    def _get(self, secret_id: str, deadline: float | None = None) -> str:
        try:
            # AWSCURRENT is GetSecretValue's default; named, so a read during a rotation's
            # finishSecret sees the version just promoted in moto too (it keeps its own default).
            response = _before(
                deadline,
                secret_id,
                lambda: self._client.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT"),
            )
        except (ClientError, BotoCoreError) as exc:
            raise translate(secret_id, exc) from exc
        if "SecretString" not in response:
            raise SecretContentError(secret_id, "holds binary data; expected text (PEM or JSON)")
        return response["SecretString"]

    def fetch_trust_bundle(
        self, secret_id: str | None = None, *, deadline: float | None = None
    ) -> list[x509.Certificate]:
        """The CA bundle from `ca-cert` (or `secret_id`), checked to hold CA certificates only.

        `deadline` (`time.monotonic()`): fail with `secret-store-unavailable` once it passes.
        """
        secret_id = secret_id or self.name(names.CA_BUNDLE_SECRET)
        value = self._get(secret_id, deadline)
        try:
            bundle = pem.load_certificates(value, "SecretString")
            check_trust_bundle(bundle, "SecretString")
        except CertificateError as exc:
            raise SecretContentError(secret_id, str(exc)) from exc
        return bundle

    def fetch_revocations(
        self, bundle: Sequence[x509.Certificate], *, deadline: float | None = None
    ) -> list[x509.CertificateRevocationList]:
        """The revocation lists in `ca-crl`, each checked to be signed by the CA of `bundle` it names
        (`runtime.certificates.revocation`); none while the secret has no value (nothing revoked yet)."""
        secret_id = self.name(names.CA_REVOCATIONS_SECRET)
        try:
            value = self._get(secret_id, deadline)
        except SecretNotFoundError:
            return []
        try:
            crls = pem.load_crls(value, "SecretString")
            Revocations.verified(crls, bundle, "SecretString")
        except CertificateError as exc:
            raise SecretContentError(secret_id, str(exc)) from exc
        return crls

    def _fetch_pair(self, secret_id: str, deadline: float | None = None) -> TLSIdentity:
        value = self._get(secret_id, deadline)
        try:
            parsed = TLSIdentity.from_secret_string(value, "SecretString")
        except CertificateError as exc:
            raise SecretContentError(secret_id, str(exc)) from exc
        return dataclasses.replace(parsed, source=secret_id)  # later errors name the secret

    def fetch_identity(
        self, identity: names.Identity, secret_id: str | None = None, *, deadline: float | None = None
    ) -> TLSIdentity:
        """One service's certificate and key from `<identity>-identity` (or `secret_id`)."""
        return self._fetch_pair(secret_id or self.name(identity.secret_suffix), deadline)

    def fetch_ca(self) -> CertificateAuthority:
        secret_id = self.name(names.CA_KEY_SECRET)
        try:
            return CertificateAuthority(self._fetch_pair(secret_id))
        except CertificateError as exc:
            raise SecretContentError(secret_id, str(exc)) from exc

    # --- writing ----------------------------------------------------------------------
    def upload(self, certificates: CertificateSet, *, kms_key_id: str | None = None) -> list[UploadResult]:
        """Verify the whole set, then store it: bundle first, so no service sees a leaf it cannot trust.

        Idempotent: a secret whose current value is already this value gets no new version.
        """
        if certificates.environment != self.environment:
            raise ValueError(
                f"the set is for {certificates.environment}, the store for {self.environment}; refusing to mix"
            )
        certificates.verify()
        values: list[tuple[str, str, str, x509.Certificate | None]] = [
            (names.CA_BUNDLE_SECRET, pem.bundle_pem(certificates.trust_bundle).decode(), "trust-bundle", None)
        ]
        if certificates.ca is not None:
            ca = certificates.ca.identity
            values.append((names.CA_KEY_SECRET, ca.to_secret_string(), "ca-key", ca.certificate))
        for identity in certificates.expected:  # the declared identities; verify() found each
            tls = certificates.identities[identity.name]
            values.append(
                (identity.secret_suffix, tls.to_secret_string(), f"identity:{identity.name}", tls.certificate)
            )
        return [
            self._put(self.name(suffix), value, content, cert, kms_key_id)
            for suffix, value, content, cert in values
        ]

    def _tags(self, content: str, certificate: x509.Certificate | None) -> list[dict[str, str]]:
        prefix = names.SECRET_TAG_PREFIX
        tags = {
            f"{prefix}environment": self.environment,
            f"{prefix}content": content.replace(":", "/"),
            f"{prefix}managed-by": "hokusai-mtls",
        }
        if certificate is not None:
            tags[f"{prefix}not-after"] = certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    def _put(
        self, secret_id: str, value: str, content: str, certificate, kms_key_id: str | None
    ) -> UploadResult:
        tags = self._tags(content, certificate)
        try:
            try:
                current = self._get(secret_id)
            except SecretNotFoundError:
                current = None  # no secret, or a secret without a current version (a fresh CDK shell)
            if current == value:
                action = "unchanged"
            elif current is None and self._create(secret_id, value, tags, kms_key_id):
                return UploadResult(secret_id, "created")
            else:
                self._client.put_secret_value(SecretId=secret_id, SecretString=value)
                action = "updated"
            self._client.tag_resource(SecretId=secret_id, Tags=tags)
        except (ClientError, BotoCoreError) as exc:
            raise translate(secret_id, exc) from exc
        return UploadResult(secret_id, action)

    def _create(self, secret_id: str, value: str, tags, kms_key_id: str | None) -> bool:
        """Create the secret with its first value; False if it already exists (without a value)."""
        options = {"KmsKeyId": kms_key_id} if kms_key_id else {}
        try:
            self._client.create_secret(
                Name=secret_id,
                SecretString=value,
                Tags=tags,
                Description=f"hokusai-mtls {self.environment}: managed by `hokusai-mtls certs upload`",
                **options,
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceExistsException":
                return False
            raise
        return True
