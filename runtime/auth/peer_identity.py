"""Who called: the service named by a verified client certificate, and what it may do.

The certificate comes only from the ASGI TLS extension (`scope["extensions"]["tls"]`),
which only our TLS layer sets (`runtime.serving.asgi_tls`), or from the one header the configured
proxy writes (`runtime.auth.proxy_certificate`): never from any other header, an IP address or
`request.state`. The identity is the certificate's SPIFFE ID `spiffe://hokusai/<env>/<service>`,
read strictly (`runtime.certificates.spiffe`): a certificate whose URI SANs break the SPIFFE rules names no
one, and one of another environment is not ours. Only with `HOKUSAI_MTLS_CN_FALLBACK=true`
(an imported CA that cannot write URI SANs) does a certificate WITHOUT any SPIFFE URI count by
its CN, and then only a CN `<service>.hokusai-<env>.local` of this environment. Scopes come
from configuration, so an unknown service gets nothing.

Certificates are hostile input even after the handshake verified them: `cryptography` parses
extensions lazily and raises more than ValueError, so any failure to read one refuses it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509

from runtime import json_input, names
from runtime.certificates.inspection import uris
from runtime.certificates.spiffe import looks_like_spiffe, parse_spiffe_id
from runtime.names import ENV_SERVICE_SCOPES
from runtime.security_level import parse_flag
from runtime.service_catalog import RUNTIME_MLFLOW, Catalog, catalog_from_environ
from runtime.serving.asgi_tls import TLS_EXTENSION

log = logging.getLogger("hokusai_mtls.auth")

DEFAULT_SERVICE_SCOPES: dict[str, tuple[str, ...]] = {
    names.API_SERVICE: ("mlflow:read", "mlflow:write"),
    names.WORKER_SERVICE: ("mlflow:read", "mlflow:write"),
}


def declared_scopes(catalog: Catalog, server: str) -> dict[str, tuple[str, ...]]:
    """The scopes a declared server grants its declared callers (and no one else): MLflow's read and
    write to each caller of MLflow; `<server>:call` to each caller of any other server."""
    declaration = catalog.service(server)
    granted = (
        ("mlflow:read", "mlflow:write") if declaration.runtime == RUNTIME_MLFLOW else (f"{server}:call",)
    )
    return dict.fromkeys(declaration.callers, granted)


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


def _service_from_certificate(
    certificate: x509.Certificate, *, cn_fallback: bool
) -> tuple[str | None, str | None, str | None]:
    """(service, environment, uri); (None, None, None) when the certificate names no one.

    SPIFFE (X509-SVID §2): exactly one URI SAN, a valid SPIFFE ID in our trust domain with the
    path `/<env>/<service>`. A certificate that claims the spiffe scheme anywhere never falls
    back to its CN; the CN counts only with `cn_fallback` and no URI SAN at all.
    """
    all_uris = uris(certificate)
    claimed = [u for u in all_uris if looks_like_spiffe(u)]
    if claimed:
        if len(all_uris) != 1:
            return None, None, None
        try:
            spiffe = parse_spiffe_id(claimed[0])
        except ValueError:
            return None, None, None
        if spiffe.trust_domain != names.TRUST_DOMAIN or len(spiffe.segments) != 2:
            return None, None, None
        environment, service = spiffe.segments
        return service, environment, claimed[0]
    if not cn_fallback or all_uris:
        return None, None, None
    common_names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if len(common_names) != 1:
        return None, None, None
    match = _CN_IDENTITY.fullmatch(str(common_names[0].value))
    return (match["service"], match["environment"], None) if match else (None, None, None)


_CN_IDENTITY = re.compile(
    r"(?P<service>[a-z0-9][a-z0-9_-]{0,62})\.hokusai-(?P<environment>[a-z0-9-]+)\.local"
)
"""The CN an imported CA writes instead of a SPIFFE ID: `<service>.hokusai-<env>.local`
(the service's name in the environment's Cloud Map namespace), so it still names both."""


class IdentityPolicy:
    """Maps a verified certificate to a known service of this environment and its scopes."""

    def __init__(
        self,
        environment: str,
        service_scopes: Mapping[str, Sequence[str]] | None = None,
        *,
        cn_fallback: bool = False,
    ) -> None:
        self.environment = names.check_environment(environment)
        self.cn_fallback = cn_fallback
        scopes = DEFAULT_SERVICE_SCOPES if service_scopes is None else service_scopes
        for service, granted in scopes.items():
            if not isinstance(granted, list | tuple) or not all(isinstance(s, str) for s in granted):
                raise ValueError(f"{ENV_SERVICE_SCOPES}: scopes of {service!r} must be a list of strings")
        self.service_scopes = {service: tuple(granted) for service, granted in scopes.items()}
        # A keep-alive connection presents one certificate for every request: decide once.
        self.identify = functools.lru_cache(maxsize=256)(self._identify)
        self.identify_pem = functools.lru_cache(maxsize=256)(self._identify_pem)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] = os.environ, *, server: str | None = None
    ) -> IdentityPolicy:
        """HOKUSAI_MTLS_SERVICE_SCOPES, else, for a declared `server` (`runtime.service_catalog`), the scopes
        it grants its declared callers (`declared_scopes`), else `DEFAULT_SERVICE_SCOPES`."""
        raw = environ.get(ENV_SERVICE_SCOPES)
        try:
            scopes = json_input.loads(raw) if raw else None
        except ValueError as exc:
            raise ValueError(f"{ENV_SERVICE_SCOPES}: {exc}") from None
        if scopes is not None and not isinstance(scopes, dict):
            raise ValueError(f"{ENV_SERVICE_SCOPES} must be a JSON object of service -> scopes")
        if scopes is None and server is not None:
            scopes = declared_scopes(catalog_from_environ(environ), server)
        cn_fallback = parse_flag(names.ENV_CN_FALLBACK, environ.get(names.ENV_CN_FALLBACK), default=False)
        return cls(environ.get(names.ENV_ENVIRONMENT, ""), scopes, cn_fallback=cn_fallback)

    def _identify(self, certificate: x509.Certificate) -> ServiceIdentity | None:
        """The service, or None when the certificate names no service we grant anything to.

        A certificate of another environment (its SPIFFE ID or CN says so) is not ours either,
        even if a shared CA signed it. A certificate that cannot be read names no one.
        """
        try:
            service, environment, uri = _service_from_certificate(certificate, cn_fallback=self.cn_fallback)
        except Exception as exc:  # lazily parsed extensions raise many types: all refuse
            log.info("a client certificate could not be read, refused: %s: %s", type(exc).__name__, exc)
            return None
        if service is None or service not in self.service_scopes or environment != self.environment:
            return None
        return ServiceIdentity(service, environment, uri, self.service_scopes[service], certificate)

    def _identify_pem(self, certificate_pem: str) -> ServiceIdentity | None:
        """`identify` for the PEM the TLS extension carries (`peer_certificate_pem`).

        Cached by the PEM string itself: the TLS layer builds it once per connection, so a
        request costs one dict lookup whose hash is already cached on the string, where
        hashing a `Certificate` for `identify`'s cache re-reads its DER every time.
        """
        try:
            certificate = _parse(certificate_pem)
        except ValueError:
            return None
        return self._identify(certificate)
