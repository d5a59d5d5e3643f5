"""HTTP clients for internal calls (API service -> MLflow) built from what the loader exported.

Seed 003 found "security theater": services that said mTLS but passed `verify=False`. Here the
loader's security level decides what the client *presents*, never whether it *verifies*:

- MTLS: trusts only the CA bundle (`MLFLOW_TRACKING_SERVER_CERT_PATH`) and presents the
  combined certificate+key PEM (`MLFLOW_TRACKING_CLIENT_CERT_PATH`), the files MLflow's own
  client uses, so both clients of one process connect the same way.
- TLS: trusts only the CA bundle and presents no certificate (development fallback).
- INSECURE: plain `http://` is expected; an `https://` URL is still verified, against the
  system trust store.

Every level verifies the server certificate and its hostname (CERT_REQUIRED, check_hostname).
A file the level needs that is missing, unreadable or not PEM raises `ClientConfigError`: the
service refuses to start rather than quietly downgrade. Callers cannot pass `verify`, `cert`,
`transport` or `mounts`, the ways httpx offers to bypass this context.

>>> client = create_adaptive_client(base_url="https://mlflow.hokusai-staging.local:5000")
"""

from __future__ import annotations

import http.cookiejar
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from runtime import names
from runtime.errors import ClientConfigError
from runtime.security_level import SecurityLevel

log = logging.getLogger("hokusai_mtls")

DEFAULT_TIMEOUT = httpx.Timeout(connect=2.0, read=30.0, write=30.0, pool=5.0)
"""A dead or unroutable server fails in 2 s; MLflow calls that do real work get 30 s."""
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0)
"""Keep-alive pooling; idle connections expire before uvicorn's 5 s keep-alive timeout on the
server closes them, so a request never lands on a connection the server is just dropping."""

_RESERVED_OPTIONS = frozenset({"verify", "cert", "transport", "mounts"})


@dataclass(frozen=True)
class ClientTLS:
    """The verifying SSL context for one security level, and the files it was built from."""

    level: SecurityLevel
    context: ssl.SSLContext
    ca_bundle: Path | None = None
    """None: the system trust store (INSECURE level)."""
    client_certificate: Path | None = None
    """The combined certificate+key PEM presented to the server (MTLS level only)."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str | None] = os.environ) -> ClientTLS:
        """Read HOKUSAI_MTLS_SECURITY_LEVEL and the files that level needs; raise ClientConfigError."""
        level = _level(environ)
        if level is SecurityLevel.INSECURE:
            return cls(level, _verifying(ssl.create_default_context()))
        ca_bundle = _required_file(environ, names.ENV_MLFLOW_SERVER_CERT, names.ENV_CA_BUNDLE_FILE, level)
        try:
            context = ssl.create_default_context(cafile=str(ca_bundle))  # this CA only, no system CAs
        except (OSError, ssl.SSLError) as exc:
            raise ClientConfigError(f"CA bundle {ca_bundle} is not a usable PEM bundle: {exc}") from exc
        if level is SecurityLevel.TLS:
            return cls(level, _verifying(context), ca_bundle)
        certificate = _required_file(environ, names.ENV_MLFLOW_CLIENT_CERT, None, level)
        try:
            context.load_cert_chain(certificate)
        except (OSError, ssl.SSLError) as exc:
            raise ClientConfigError(
                f"client certificate {certificate} ({names.ENV_MLFLOW_CLIENT_CERT}) must hold the "
                f"certificate and its unencrypted key in one PEM file: {exc}"
            ) from exc
        return cls(level, _verifying(context), ca_bundle, certificate)

    def reload(self) -> None:
        """Take up the files the loader has just rewritten, in the live context.

        New handshakes present the new certificate (`load_cert_chain` replaces it) and trust
        the bundle's CAs (`load_verify_locations` adds; a CA removed after a rollover stays
        trusted by this client until it restarts, which only widens whom it trusts as server
        during the last rollover step). Open keep-alive connections keep their handshake.
        """
        if self.ca_bundle is not None:
            self.context.load_verify_locations(cafile=str(self.ca_bundle))
        if self.client_certificate is not None:
            self.context.load_cert_chain(self.client_certificate)

    def describe(self) -> str:
        if self.level is SecurityLevel.MTLS:
            return f"client certificate {self.client_certificate}, CA bundle {self.ca_bundle}"
        if self.level is SecurityLevel.TLS:
            return f"CA bundle {self.ca_bundle}, no client certificate: the server sees an anonymous caller"
        return "plain HTTP expected; an https:// server is verified against the system trust store"


def _level(environ: Mapping[str, str | None]) -> SecurityLevel:
    value = (environ.get(names.ENV_SECURITY_LEVEL) or "").strip()
    if not value:
        raise ClientConfigError(
            f"{names.ENV_SECURITY_LEVEL} is not set: run the certificate loader "
            f'(`eval "$(hokusai-mtls load-certs ...)"`) before starting the service'
        )
    try:
        return SecurityLevel(value.upper())
    except ValueError:
        choices = ", ".join(level.value for level in SecurityLevel)
        raise ClientConfigError(
            f"{names.ENV_SECURITY_LEVEL}={value!r} is not a security level; expected one of {choices}"
        ) from None


def _required_file(
    environ: Mapping[str, str | None], variable: str, fallback: str | None, level: SecurityLevel
) -> Path:
    """The file named by `variable` (or `fallback`), which must exist and be readable."""
    name, value = variable, environ.get(variable)
    if not value and fallback:
        name, value = fallback, environ.get(fallback)
    if not value:
        raise ClientConfigError(f"security level {level.value} needs {variable}, which is not set")
    path = Path(value)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ClientConfigError(
            f"security level {level.value} needs {name}={path}, which cannot be read: {exc.strerror}"
        ) from exc
    return path


def _verifying(context: ssl.SSLContext) -> ssl.SSLContext:
    """Pin what `create_default_context` promises, and check it: raise, never assert (python -O)."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname:
        raise ClientConfigError("refusing an SSL context that does not verify the server and its name")
    return context


def _no_cookies() -> http.cookiejar.CookieJar:
    """A jar that accepts nothing: a service client must not carry one caller's cookies to the next."""
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def _options(tls: ClientTLS, base_url: str, httpx_options: dict) -> dict:
    reserved = sorted(_RESERVED_OPTIONS & httpx_options.keys())
    if reserved:
        raise ValueError(
            f"{', '.join(reserved)} cannot be passed: the security level decides TLS "
            f"({names.ENV_SECURITY_LEVEL}, set by the certificate loader)"
        )
    url = httpx.URL(base_url)
    where = f"{url.scheme}://{url.netloc.decode()}" if url.scheme else "(no base URL)"  # no userinfo
    if tls.level is not SecurityLevel.INSECURE and url.scheme == "http":
        log.warning(
            "HTTP client for %s: security level %s but a plain http:// URL, so no certificate is used",
            where,
            tls.level.value,
        )
    log_at = logging.INFO if tls.level is SecurityLevel.MTLS else logging.WARNING
    log.log(log_at, "HTTP client for %s: security level %s (%s)", where, tls.level.value, tls.describe())
    return {
        "timeout": DEFAULT_TIMEOUT,
        "limits": DEFAULT_LIMITS,
        "cookies": _no_cookies(),
        **httpx_options,
        "base_url": base_url,
        "verify": tls.context,
    }


def create_adaptive_client(
    *,
    environ: Mapping[str, str | None] = os.environ,
    base_url: str = "",
    tls: ClientTLS | None = None,
    **httpx_options,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` whose TLS follows the loader's security level (module docstring).

    `httpx_options` go to httpx (e.g. `timeout=`, `limits=`, `headers=`); the caller owns the
    client and closes it (`await client.aclose()`) at shutdown. Pass your own `tls`
    (`ClientTLS.from_environ`) to `reload()` it after a rotation. Raises `ClientConfigError`.
    """
    tls = tls or ClientTLS.from_environ(environ)
    return httpx.AsyncClient(**_options(tls, base_url, httpx_options))


def create_adaptive_sync_client(
    *, environ: Mapping[str, str | None] = os.environ, base_url: str = "", **httpx_options
) -> httpx.Client:
    """The blocking twin of `create_adaptive_client` (workers, scripts, health checks)."""
    tls = ClientTLS.from_environ(environ)
    return httpx.Client(**_options(tls, base_url, httpx_options))
