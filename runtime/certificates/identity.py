"""`TLSIdentity`: a certificate and its private key, kept together from birth to disk.

Keeping both in one value (and in one secret) means nothing downstream can pair a
rotated certificate with a stale key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from runtime import json_input
from runtime.certificates import pem
from runtime.errors import KeyMismatchError, PemError
from runtime.names import SECRET_SCHEMA_VERSION


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, repr=False)
class TLSIdentity:
    """A certificate with the private key that belongs to it (checked on construction)."""

    certificate: x509.Certificate
    private_key: pem.PrivateKey
    source: str = "identity"

    def __post_init__(self) -> None:
        if _public_der(self.certificate.public_key()) != _public_der(self.private_key.public_key()):
            raise KeyMismatchError(
                f"{self.source}: the private key does not belong to the certificate "
                f"{self.certificate.subject.rfc4514_string()} (serial {self.certificate.serial_number:x})"
            )

    def __repr__(self) -> str:  # never the key, not even its object
        return f"TLSIdentity({self.certificate.subject.rfc4514_string()!r}, source={self.source!r})"

    # --- leaving memory ---------------------------------------------------------
    def certificate_pem(self) -> bytes:
        return pem.certificate_pem(self.certificate)

    def private_key_pem(self) -> bytes:
        return pem.private_key_pem(self.private_key)

    def combined_pem(self) -> bytes:
        """Certificate then key in one file: what MLflow's `MLFLOW_TRACKING_CLIENT_CERT_PATH` wants."""
        return self.certificate_pem() + self.private_key_pem()

    def to_secret_string(self) -> str:
        """The JSON document stored in an `<identity>-identity` secret."""
        return json.dumps(
            {
                "schema": SECRET_SCHEMA_VERSION,
                "certificate": self.certificate_pem().decode(),
                "private_key": self.private_key_pem().decode(),
            }
        )

    # --- entering memory -------------------------------------------------------
    @classmethod
    def from_pem(cls, certificate: bytes | str, private_key: bytes | str, source: str) -> TLSIdentity:
        return cls(
            pem.load_certificate(certificate, f"{source} (certificate)"),
            pem.load_private_key(private_key, f"{source} (private key)"),
            source,
        )

    @classmethod
    def from_secret_string(cls, text: str, source: str) -> TLSIdentity:
        """Parse what `to_secret_string` wrote; errors name the missing or bad field."""
        try:
            document = json_input.loads(text)
        except ValueError as exc:
            raise PemError(f"{source}: {exc}") from None
        if not isinstance(document, dict):
            raise PemError(f"{source}: expected a JSON object with certificate and private_key")
        missing = [f for f in ("certificate", "private_key") if not isinstance(document.get(f), str)]
        if missing:
            raise PemError(f"{source}: JSON field(s) {', '.join(missing)} missing or not a string")
        schema = document.get("schema", SECRET_SCHEMA_VERSION)
        if type(schema) is not int or schema != SECRET_SCHEMA_VERSION:
            shown = (
                repr(schema)
                if isinstance(schema, int | str) and len(str(schema)) <= 20
                else type(schema).__name__
            )
            raise PemError(f"{source}: unsupported schema {shown}; expected {SECRET_SCHEMA_VERSION}")
        return cls.from_pem(document["certificate"], document["private_key"], source)
