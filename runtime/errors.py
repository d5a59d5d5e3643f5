"""One exception per failure mode, each naming what is wrong and where.

Every error carries a short `code` (printed by the CLI, listed in
docs/MTLS_CERTIFICATE_MANAGEMENT.md) so scripts and people can tell failures apart
without parsing prose. Errors are raised `from` their cause so it survives.
"""

from __future__ import annotations


class MtlsError(Exception):
    """Base of every error hokusai-mtls raises on purpose."""

    code = "mtls-error"


# --- certificates ------------------------------------------------------------------
class CertificateError(MtlsError):
    code = "certificate-error"


class PemError(CertificateError):
    """Not parseable PEM: empty, truncated, corrupted base64 or DER."""

    code = "malformed-pem"


class WrongPemTypeError(PemError):
    """Valid PEM of the wrong kind, e.g. a private key where a certificate belongs."""

    code = "wrong-pem-type"


class KeyMismatchError(CertificateError):
    """The private key is not the key of the certificate."""

    code = "key-mismatch"


class UntrustedCertificateError(CertificateError):
    """No CA in the trust bundle issued the certificate."""

    code = "untrusted-issuer"


class CertificateExpiredError(CertificateError):
    code = "certificate-expired"


class CertificateNotYetValidError(CertificateError):
    code = "certificate-not-yet-valid"


class WrongUsageError(CertificateError):
    """The certificate's extended key usage or CA flag does not fit its role."""

    code = "wrong-usage"


class HostnameMismatchError(CertificateError):
    code = "hostname-mismatch"


class IdentityMismatchError(CertificateError):
    """The certificate names another service (URI SAN) than the one it is stored for."""

    code = "identity-mismatch"


class WeakKeyError(CertificateError):
    """A key our TLS stacks refuse (OpenSSL's default security level): RSA below 2048 bits, odd curves."""

    code = "weak-key"


class NotACertificateAuthorityError(CertificateError):
    code = "not-a-ca"


class ChainVerificationError(CertificateError):
    """The RFC 5280 path validation of `cryptography.x509.verification` refused the chain."""

    code = "chain-invalid"


class LifetimeError(CertificateError):
    """A requested lifetime is impossible, e.g. a leaf that would outlive its CA."""

    code = "invalid-lifetime"


class RevocationListError(CertificateError):
    """A revocation list (`ca-crl`) is unreadable or not signed by the CA it speaks for."""

    code = "revocation-list-invalid"


class CertificateSetError(CertificateError):
    """A certificate set (directory or upload) is incomplete."""

    code = "incomplete-set"


# --- Secrets Manager ------------------------------------------------------------------
class SecretStoreError(MtlsError):
    """A Secrets Manager call failed; `secret_id` names the secret."""

    code = "secret-error"

    def __init__(self, secret_id: str, message: str) -> None:
        super().__init__(f"secret {secret_id}: {message}")
        self.secret_id = secret_id


class SecretNotFoundError(SecretStoreError):
    code = "secret-not-found"


class SecretAccessDeniedError(SecretStoreError):
    code = "secret-access-denied"


class SecretDecryptionError(SecretStoreError):
    """KMS refused to decrypt the secret (key disabled, or no kms:Decrypt via Secrets Manager)."""

    code = "secret-kms-decrypt-failed"


class SecretThrottledError(SecretStoreError):
    code = "secret-throttled"


class SecretUnavailableError(SecretStoreError):
    """Secrets Manager could not be reached, or no credentials/region are configured."""

    code = "secret-store-unavailable"


class SecretContentError(SecretStoreError):
    """The secret exists but its value is not what hokusai-mtls stores there."""

    code = "secret-content-invalid"


# --- loading ----------------------------------------------------------------------------
class LoadError(MtlsError):
    """A role's certificates could not be loaded, and this environment may not degrade."""

    code = "load-failed"


class RefreshError(LoadError):
    """A refresh could not fetch or verify a new set: the running service keeps the one it has.

    Raised in every environment: the development fallback is for start-up only (a fresh
    development CA in the middle of a Secrets Manager outage would break every client).
    """

    code = "refresh-failed"


# --- serving --------------------------------------------------------------------------------
class WorkerError(MtlsError):
    """A worker process of serve-mlflow or serve-api could not start or kept dying: the task stops
    (and ECS replaces it) instead of serving on fewer cores than it was given, unnoticed."""

    code = "worker-failed"


class OutputExistsError(MtlsError):
    """Refusing to overwrite certificates or keys that are already there."""

    code = "output-exists"


class UnexpectedError(MtlsError):
    """A failure no check of ours names (a bug, or input we did not foresee): reported with its
    type and message, never as a traceback, and counted as a failure like any other."""

    code = "unexpected-error"


# --- clients ------------------------------------------------------------------------------
class ClientConfigError(MtlsError):
    """The loader's variables do not give the client what its security level needs (a file missing,
    unreadable or not PEM, or no level at all): the client refuses to start rather than downgrade."""

    code = "client-config"


# --- API keys ---------------------------------------------------------------------------
class KeyNotFoundError(MtlsError):
    """No API key with this id (or none the caller may see: another user's is not found either)."""

    code = "key-not-found"


class KeyStoreError(MtlsError):
    """The key store is not configured, cannot be reached, or is not at this version's migration."""

    code = "key-store"


class AuthServiceUnavailable(MtlsError):
    """The external auth service could not answer (down, slow, malformed): requests fail closed.

    Names the service's URL and the cause, never the API key.
    """

    code = "auth-service-unavailable"

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"auth service {url}: {message}")
        self.url = url
