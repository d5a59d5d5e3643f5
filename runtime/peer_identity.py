"""Who called: the service named by a verified client certificate, and what it may do.

The certificate comes only from the ASGI TLS extension (`scope["extensions"]["tls"]`),
which only our TLS layer sets (`runtime.asgi_tls`): never from a header, an IP address or
`request.state`. The identity is the certificate's single SPIFFE URI SAN
`spiffe://hokusai/<env>/<service>`; the CN is a fallback for certificates issued without
SANs (imported CAs). Scopes come from configuration, so an unknown service gets nothing.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509

from runtime import names
from runtime.asgi_tls import TLS_EXTENSION
from runtime.inspection import uris
from runtime.names import ENV_SERVICE_SCOPES

DEFAULT_SERVICE_SCOPES: dict[str, tuple[str, ...]] = {
    names.API_SERVICE: ("mlflow:read", "mlflow:write"),
    names.WORKER_SERVICE: ("mlflow:read", "mlflow:write"),
}
"""The PRD's intent: the API and the workers use MLflow (logging a run reads, too)."""


@dataclass(frozen=True)
class ServiceIdentity:
    service: str
    environment: str | None
    uri: str | None
    scopes: tuple[str, ...]
    certificate: x509.Certificate


def peer_certificate_pem(scope: Mapping) -> str | None:
    """The PEM of this connection's verified client certificate, if the TLS layer put one there."""
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION)
    # `type(...) is dict` first: the ABC isinstance check alone costs more than the rest here.
    chain = tls.get("client_cert_chain") if type(tls) is dict or isinstance(tls, Mapping) else None
    return chain[0] if chain else None


def peer_certificate(scope: Mapping) -> x509.Certificate | None:
    """The verified client certificate of this connection, if the TLS layer put one there."""
    certificate_pem = peer_certificate_pem(scope)
    return None if certificate_pem is None else _parse(certificate_pem)


@functools.lru_cache(maxsize=256)
def _parse(certificate_pem: str) -> x509.Certificate:
    """Every request of a keep-alive connection carries the same PEM: parse it once."""
    return x509.load_pem_x509_certificate(certificate_pem.encode())


def _service_from_certificate(certificate: x509.Certificate) -> tuple[str | None, str | None, str | None]:
    """(service, environment, uri) from the SPIFFE URI SAN, else (CN, None, None)."""
    spiffe = [u for u in uris(certificate) if u.startswith(f"spiffe://{names.TRUST_DOMAIN}/")]
    if len(spiffe) == 1:  # SPIFFE: exactly one SPIFFE ID per certificate; more is ambiguous
        parts = spiffe[0].removeprefix(f"spiffe://{names.TRUST_DOMAIN}/").split("/")
        if len(parts) == 2 and all(parts):
            return parts[1], parts[0], spiffe[0]
        return None, None, spiffe[0]
    if spiffe:
        return None, None, None
    common_names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return (str(common_names[0].value) if common_names else None), None, None


class IdentityPolicy:
    """Maps a verified certificate to a known service of this environment and its scopes."""

    def __init__(self, environment: str, service_scopes: Mapping[str, Sequence[str]] | None = None) -> None:
        self.environment = names.check_environment(environment)
        scopes = DEFAULT_SERVICE_SCOPES if service_scopes is None else service_scopes
        for service, granted in scopes.items():
            if not isinstance(granted, list | tuple) or not all(isinstance(s, str) for s in granted):
                raise ValueError(f"{ENV_SERVICE_SCOPES}: scopes of {service!r} must be a list of strings")
        self.service_scopes = {service: tuple(granted) for service, granted in scopes.items()}
        # A keep-alive connection presents one certificate for every request: decide once.
        self.identify = functools.lru_cache(maxsize=256)(self._identify)
        self.identify_pem = functools.lru_cache(maxsize=256)(self._identify_pem)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> IdentityPolicy:
        raw = environ.get(ENV_SERVICE_SCOPES)
        try:
            scopes = json.loads(raw) if raw else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{ENV_SERVICE_SCOPES} is not valid JSON: {exc.msg}") from exc
        if scopes is not None and not isinstance(scopes, dict):
            raise ValueError(f"{ENV_SERVICE_SCOPES} must be a JSON object of service -> scopes")
        return cls(environ.get(names.ENV_ENVIRONMENT, ""), scopes)

    def _identify(self, certificate: x509.Certificate) -> ServiceIdentity | None:
        """The service, or None when the certificate names no service we grant anything to.

        A certificate of another environment (its SPIFFE ID says so) is not ours either, even
        if a shared CA signed it.
        """
        service, environment, uri = _service_from_certificate(certificate)
        if service is None or service not in self.service_scopes:
            return None
        if environment is not None and environment != self.environment:
            return None
        return ServiceIdentity(service, environment, uri, self.service_scopes[service], certificate)

    def _identify_pem(self, certificate_pem: str) -> ServiceIdentity | None:
        """`identify` for the PEM the TLS extension carries (`peer_certificate_pem`).

        Cached by the PEM string itself: the TLS layer builds it once per connection, so a
        request costs one dict lookup whose hash is already cached on the string, where
        hashing a `Certificate` for `identify`'s cache re-reads its DER every time.
        """
        return self._identify(_parse(certificate_pem))
