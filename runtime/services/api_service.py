"""`hokusai-mtls serve-api`: the API service's side of the design, around the platform's own app.

External callers reach it through the ALB on its plain port; every request but `/health`
goes through `APIKeyAuthMiddleware` (the API-key path, unchanged). `/mlflow/...` is the
seed's MLflow proxy, calling MLflow over mTLS with the API's own certificate, so MLflow
knows the API called and never asks the auth service. The platform's application mounts at
`/` (`HOKUSAI_API_APP=module:attribute`, optional).

Start-up runs `configure_internal_mtls()` first, which also points this process's MLflow
client at the same certificate files.

Background jobs (`runtime.serving.server`): the EMF metrics every `HOKUSAI_MTLS_METRICS_SECONDS` (the
setting serve-mlflow reads) and once more at shutdown, the certificate refresh; at shutdown the
MLflow and auth-service clients and the process's one Redis pool (shared by the key cache and the
rate limiter, `runtime.auth.redis_client`) are closed.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Mapping, MutableMapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from runtime import names
from runtime.auth import mlflow_routes, redis_client
from runtime.auth.api_keys import ApiKeyValidator, AuthServiceClient
from runtime.auth.client_address import AddressPolicy
from runtime.auth.key_cache import cache_from_environ
from runtime.auth.middleware import APIKeyAuthMiddleware, options_from_environ
from runtime.auth.peer_identity import IdentityPolicy
from runtime.auth.rate_limit import limiter_from_environ
from runtime.certificates import pem
from runtime.certificates.inspection import days_left
from runtime.clients.adaptive_client import ClientTLS, create_adaptive_client
from runtime.observability.metrics import Metrics, interval_from_environ
from runtime.secrets.mlflow_config import configure_internal_mtls
from runtime.security_level import SecurityLevel
from runtime.services.mlflow_proxy import mlflow_proxy_app
from runtime.serving.connection_limits import api_limits
from runtime.serving.server import Background, Listener, Serving, periodic

ENV_API_APP = "HOKUSAI_API_APP"
"""`module:attribute` of the platform's ASGI app to mount at `/`; unset: only /health and /mlflow."""
ENV_MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"


def mlflow_url(environ: Mapping[str, str], level: SecurityLevel) -> str:
    """MLFLOW_TRACKING_URI, else the Cloud Map name: https when we hold certificates."""
    if environ.get(ENV_MLFLOW_TRACKING_URI):
        return environ[ENV_MLFLOW_TRACKING_URI]
    scheme = "http" if level is SecurityLevel.INSECURE else "https"
    return f"{scheme}://{names.mlflow_hostname(environ[names.ENV_ENVIRONMENT])}:{names.MLFLOW_PORT}"


MLFLOW_MOUNT = "/mlflow"


def is_proxied_mlflow(scope: Mapping) -> bool:
    """A request for MLflow through our proxy: refused in MLflow's error shape."""
    path = scope.get("path", "")
    return path == MLFLOW_MOUNT or path.startswith(MLFLOW_MOUNT + "/")


def proxied_mlflow_scope(scope: Mapping) -> str | None:
    """What an mTLS caller needs for MLflow's route below the mount; the platform's routes decide theirs."""
    if not is_proxied_mlflow(scope):
        return None
    return mlflow_routes.required_scope(scope.get("method", ""), scope["path"][len(MLFLOW_MOUNT) :] or "/")


def _platform_app(environ: Mapping[str, str]):
    target = environ.get(ENV_API_APP)
    if not target:
        return None
    module, _, attribute = target.partition(":")
    if not attribute:
        raise ValueError(f"{ENV_API_APP}={target!r}: expected module:attribute")
    return getattr(importlib.import_module(module), attribute)


class ApiService:
    def __init__(self, environ: MutableMapping[str, str] = os.environ, *, store=None) -> None:
        writable = environ  # configure_internal_mtls sets MLflow's variables in it
        self.loaded = configure_internal_mtls(role=names.API.role, environ=writable, store=store, reload=True)
        environment = self.loaded.settings.environment
        self.upstream = mlflow_url(writable, self.loaded.level)
        self.environ = writable
        self.client_tls = ClientTLS.from_environ(writable)
        # One pooled connection per request the API can hold at once: no handshake per call below its bound.
        self.client = create_adaptive_client(
            environ=writable, tls=self.client_tls, max_connections=api_limits(writable).max_connections
        )
        self.metrics = Metrics(environment=environment, service=names.API_SERVICE)
        self.metrics_seconds = interval_from_environ(writable)
        routes = [
            Route("/health", self.health),
            Mount(MLFLOW_MOUNT, mlflow_proxy_app(self.upstream, self.client)),
        ]
        if (platform := _platform_app(writable)) is not None:
            routes.append(Mount("/", platform))
        self.redis = redis_client.redis_from_environ(writable)  # one bounded pool: cache and limiter
        auth_url = writable.get(names.ENV_AUTH_SERVICE_URL)
        self.auth_client = AuthServiceClient(auth_url) if auth_url else None
        validator = (
            ApiKeyValidator(self.auth_client, cache_from_environ(writable, self.redis))
            if self.auth_client is not None
            else None
        )
        addresses = AddressPolicy.from_environ(writable)
        edge = options_from_environ(writable)
        self.app = APIKeyAuthMiddleware(
            Starlette(routes=routes),
            identities=IdentityPolicy.from_environ({**writable, names.ENV_ENVIRONMENT: environment}),
            addresses=addresses,
            validator=validator,
            limiter=limiter_from_environ(writable, self.redis),
            metrics=self.metrics,
            required_scope=proxied_mlflow_scope,
            mlflow_errors=is_proxied_mlflow,
            # Behind an ALB in mTLS verify mode, services may call the API with their certificates too.
            proxy_trust_bundle=self._bundle() if edge["proxy_kind"] != names.PROXY_KIND_NONE else (),
            **edge,
        )

    def _bundle(self) -> list:
        path = self.loaded.files.get(names.CA_BUNDLE_FILE)
        return pem.load_certificates(path.read_bytes(), str(path)) if path else []

    def refresh(self) -> None:
        """Load the rotated identity (the loader verifies it, then swaps the files) and use it
        for the next connections to MLflow; the previous set stays if anything is wrong."""
        self.loaded = configure_internal_mtls(role=names.API.role, environ=self.environ, refresh=True)
        self.client_tls.reload()

    async def health(self, request: Request) -> JSONResponse:
        report: dict[str, object] = {
            "status": "ok",
            "security_level": self.loaded.level.value,
            "mlflow": self.upstream,
        }
        if self.loaded.identity is not None:
            certificate = self.loaded.identity.certificate
            report["certificate"] = {
                "serial": f"{certificate.serial_number:x}",
                "days_left": days_left(certificate),
            }
        return JSONResponse(report)

    def serving(self, host: str, port: int) -> Serving:
        return Serving(
            [Listener("api", host, port, self.app)],
            limits=api_limits(self.environ),  # keep-alive 65 s: longer than the ALB's idle timeout
            background=[
                periodic("metrics", self.metrics_seconds, self.metrics.flush, at_exit=True),
                periodic(
                    "certificate refresh",
                    float(self.environ.get(names.ENV_REFRESH_SECONDS, 300)),
                    self.refresh,
                ),
                *self._clients_to_close(),
            ],
        )

    def _clients_to_close(self) -> list[Background]:
        """Closed at exit, each on its own (one that fails leaves the others to close)."""
        jobs = [Background("MLflow client", at_exit=self.client.aclose)]
        if self.auth_client is not None:
            jobs.append(Background("auth service client", at_exit=self.auth_client.aclose))
        if self.redis is not None:
            jobs.append(Background("Redis pool", at_exit=self.redis.aclose))
        return jobs


def serve_api(
    *, host: str | None = None, port: int | None = None, environ: MutableMapping[str, str] = os.environ
) -> None:
    api_limits(environ)  # a bad timeout or bound: exit 1 naming the variable, before any work
    interval_from_environ(environ)
    redis_client.max_connections(environ)
    service = ApiService(environ)
    asyncio.run(service.serving(host or "0.0.0.0", port or names.API_PORT).run())  # noqa: S104 - in its SG
