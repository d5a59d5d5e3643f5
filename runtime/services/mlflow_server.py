"""`hokusai-mtls serve-mlflow`: MLflow's own tracking server app, behind our mTLS listeners.

MLflow has no mTLS of its own (docs/DESIGN.md), and `mlflow server --uvicorn-opts` can pass TLS
options to uvicorn but cannot add a second listener, swap certificates at run time, or
give the app the peer certificate. So this launcher does what `mlflow server` does before
it starts uvicorn (runtime/services/mlflow_setup.py: allowed hosts, store variables, backend store
migrations, MLflow's job runner; the MLflow minor is pinned) and then serves
`mlflow.server.fastapi_app:app`, wrapped in
`APIKeyAuthMiddleware`, on `runtime.serving.server` listeners:

- strict:     mTLS on MLFLOW_PORT (client certificate required at the handshake);
- permissive: mTLS and plain HTTP on the same MLFLOW_PORT, told apart by the first byte, so
              old clients keep their http:// URL (API-key path, counted) while others move to https://;
- off:        plain HTTP on MLFLOW_PORT, API-key path only (ENABLE_MTLS_AUTH=false, rollback);
always a loopback-only health listener on MLFLOW_HEALTH_PORT (`/health`, `/metrics`) for the
container health check, which has no client certificate.

The certificates are re-fetched and re-verified every `refresh_seconds` through the loader
(which only swaps in a set that verifies) and then swapped into the live TLS context. The EMF
metrics are written every `HOKUSAI_MTLS_METRICS_SECONDS` and once more at shutdown, after the
listeners have drained, so the last interval's requests and refused handshakes are not lost; the
auth-service client and the Redis pool (one per process, `runtime.auth.redis_client`) are closed then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from runtime import names
from runtime.auth import redis_client
from runtime.auth.api_keys import ApiKeyValidator, AuthServiceClient
from runtime.auth.client_address import AddressPolicy
from runtime.auth.key_cache import cache_from_environ
from runtime.auth.middleware import APIKeyAuthMiddleware, options_from_environ
from runtime.auth.mlflow_routes import mlflow_scope
from runtime.auth.peer_identity import IdentityPolicy
from runtime.auth.rate_limit import limiter_from_environ
from runtime.certificates import pem
from runtime.certificates.inspection import days_left, dns_names, ip_addresses
from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
from runtime.observability.metrics import DEFAULT_INTERVAL_SECONDS, Metrics, interval_from_environ
from runtime.secrets.loader import LoaderSettings, LoadResult, load_certificates
from runtime.security_level import SecurityLevel
from runtime.services import mlflow_setup
from runtime.serving.connection_limits import mlflow_limits
from runtime.serving.server import Background, Listener, Serving, periodic

log = logging.getLogger("hokusai_mtls")


@dataclass(frozen=True)
class MlflowServerSettings:
    loader: LoaderSettings
    mode: str
    backend_store_uri: str
    artifacts_destination: str | None = None
    host: str = "0.0.0.0"  # noqa: S104 - the task's own network interface, inside its security group
    port: int = names.MLFLOW_PORT
    health_port: int = names.MLFLOW_HEALTH_PORT
    refresh_seconds: float = 300
    metrics_seconds: float = DEFAULT_INTERVAL_SECONDS

    def __post_init__(self) -> None:
        if self.mode not in names.MTLS_MODES:
            raise ValueError(
                f"{names.ENV_MTLS_MODE}={self.mode!r}: expected one of {', '.join(names.MTLS_MODES)}"
            )
        if self.mode == names.MTLS_MODE_OFF and self.loader.enable_mtls:
            raise ValueError(
                f"{names.ENV_MTLS_MODE}=off needs {names.ENV_ENABLE_MTLS}=false (the rollback switch)"
            )
        if not self.backend_store_uri:
            raise ValueError(f"{names.ENV_MLFLOW_BACKEND_STORE_URI} is not set")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ, **overrides) -> MlflowServerSettings:
        loader = LoaderSettings.from_environ(environ, role=names.SERVER.role)
        mode = environ.get(names.ENV_MTLS_MODE) or (
            names.MTLS_MODE_STRICT if loader.enable_mtls else names.MTLS_MODE_OFF
        )
        values = {
            "loader": loader,
            "mode": mode,
            "backend_store_uri": environ.get(names.ENV_MLFLOW_BACKEND_STORE_URI, ""),
            "artifacts_destination": environ.get(names.ENV_MLFLOW_ARTIFACTS_DESTINATION) or None,
            "refresh_seconds": float(environ.get(names.ENV_REFRESH_SECONDS, 300)),
            "metrics_seconds": interval_from_environ(environ),
        }
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


def mlflow_app(settings: MlflowServerSettings, certificate_hosts: Iterable[str] = ()):
    """MLflow's FastAPI app, configured as `mlflow server` configures it before uvicorn starts.

    `runtime.services.mlflow_setup` sets MLflow's variables (the allowed hosts first: MLflow's host check
    reads them when its apps are imported) and migrates the backend store; only then is the app
    imported.
    """
    artifact_root = mlflow_setup.configure(
        environment=settings.loader.environment,
        backend_store_uri=settings.backend_store_uri,
        artifacts_destination=settings.artifacts_destination,
        certificate_hosts=certificate_hosts,
    )
    mlflow_setup.initialize_stores(settings.backend_store_uri, artifact_root)
    from mlflow.server.fastapi_app import app

    return app


class MlflowServer:
    """Everything the MLflow container runs: listeners, middleware, refresh and metrics."""

    def __init__(self, settings: MlflowServerSettings, *, app=None, store=None, environ=os.environ) -> None:
        self.settings = settings
        self.store = store
        self.loaded: LoadResult = load_certificates(settings.loader, store=store)
        environment = settings.loader.environment
        self.metrics = Metrics(environment=environment, service=names.MLFLOW_SERVICE)
        self.tls = None
        if self.loaded.level is SecurityLevel.MTLS:
            self.tls = ReloadableServerContext(
                ServerFiles.from_directory(settings.loader.directory),
                on_handshake=self.metrics.handshake_started,
            )
            self._record_expiry()
        self.redis = redis_client.redis_from_environ(environ)  # one bounded pool: cache and limiter
        auth_url = environ.get(names.ENV_AUTH_SERVICE_URL)
        self.auth_client = AuthServiceClient(auth_url) if auth_url else None
        validator = None
        if self.auth_client is not None:
            validator = ApiKeyValidator(self.auth_client, cache_from_environ(environ, self.redis))
        else:
            log.warning(
                "%s is not set: requests without a client certificate are refused (401)",
                names.ENV_AUTH_SERVICE_URL,
            )
        permissive = settings.mode == names.MTLS_MODE_PERMISSIVE
        edge = options_from_environ(environ)
        self.jobs: mlflow_setup.JobRunner | None = None
        if app is None:
            app = mlflow_app(settings, self._certificate_hosts())
            jobs = mlflow_setup.JobRunner(
                settings.backend_store_uri, os.environ[mlflow_setup.ARTIFACT_ROOT_ENV_VAR], os.environ
            )
            self.jobs = jobs if jobs.prepare() else None
        self.app = APIKeyAuthMiddleware(
            app,
            identities=IdentityPolicy.from_environ({**environ, names.ENV_ENVIRONMENT: environment}),
            addresses=AddressPolicy.from_environ(environ),
            validator=validator,
            limiter=limiter_from_environ(environ, self.redis),
            metrics=self.metrics,
            enable_mtls=self.tls is not None,
            count_plain=permissive,
            required_scope=mlflow_scope,
            mlflow_errors=lambda _scope: True,  # every route here is MLflow's: its client reads the shape
            proxy_trust_bundle=self._proxy_trust_bundle(edge["proxy_kind"]),
            **edge,
        )
        self.serving = Serving(
            self._listeners(),
            background=self._background(),
            limits=mlflow_limits(environ),
        )

    def _background(self) -> list[Background]:
        s = self.settings
        jobs = [
            periodic("certificate refresh", s.refresh_seconds, self.refresh),
            periodic("metrics", s.metrics_seconds, self.metrics.flush, at_exit=True),
        ]
        if self.auth_client is not None:
            jobs.append(Background("auth service client", at_exit=self.auth_client.aclose))
        if self.redis is not None:
            jobs.append(Background("Redis pool", at_exit=self.redis.aclose))
        return jobs

    def _proxy_trust_bundle(self, proxy_kind: str) -> list:
        """The bundle forwarded certificates are verified against, when a proxy forwards them."""
        bundle = self.settings.loader.directory / names.CA_BUNDLE_FILE
        if proxy_kind == names.PROXY_KIND_NONE or not bundle.exists():
            return []
        return pem.load_certificates(bundle.read_bytes(), str(bundle))

    def _certificate_hosts(self) -> list[str]:
        """The names our certificate is valid for: a client that verified it dialed one of them."""
        if self.tls is None:
            return []
        return [*dns_names(self.tls.certificate), *ip_addresses(self.tls.certificate)]

    def _listeners(self) -> list[Listener]:
        s = self.settings
        health = Listener("health", "127.0.0.1", s.health_port, self.health_app)
        if self.tls is None:
            if s.mode != names.MTLS_MODE_OFF:
                log.warning("mTLS mode %s but no certificates (development): serving plain HTTP", s.mode)
            return [Listener("plain", s.host, s.port, self.app), health]
        permissive = s.mode == names.MTLS_MODE_PERMISSIVE
        listeners = [
            Listener(
                "mtls" + (" + plain (permissive)" if permissive else ""),
                s.host,
                s.port,
                self.app,
                self.tls,
                self.metrics.handshake_completed,
                plain_too=permissive,
            )
        ]
        return [*listeners, health]

    # --- background ----------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-fetch and verify through the loader, then swap into the live context.

        A refresh: anything short of a new verified set raises `RefreshError` (in every
        environment) and the files and the live context stay as they are."""
        self.loaded = load_certificates(self.settings.loader, store=self.store, refresh=True)
        changed = self.tls.reload() if self.tls is not None else False
        self._record_expiry()
        return changed

    def _record_expiry(self) -> None:
        if self.tls is not None:
            self.metrics.certificate_days_left(names.SERVER.name, days_left(self.tls.certificate))

    # --- health ------------------------------------------------------------------------------------
    def health(self) -> dict:
        report: dict[str, object] = {
            "status": "ok",
            "security_level": self.loaded.level.value,
            "mode": self.settings.mode,
        }
        if self.tls is not None:
            certificate = self.tls.certificate
            left = days_left(certificate)
            report["certificate"] = {
                "serial": f"{certificate.serial_number:x}",
                "not_after": certificate.not_valid_after_utc.isoformat(),
                "days_left": left,
                "reloads": self.tls.reloads,
            }
            if left < 0:
                report["status"] = "certificate-expired"
        return report

    async def health_app(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return
        if scope["path"] == "/metrics":
            status, body, kind = 200, self.metrics.prometheus(), b"text/plain; version=0.0.4"
        elif scope["path"] == "/health":
            report = self.health()
            status = 200 if report["status"] == "ok" else 503
            body, kind = json.dumps(report).encode(), b"application/json"
        else:
            status, body, kind = 404, b'{"detail": "not found"}', b"application/json"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})

    def run(self) -> None:
        if self.jobs is not None:
            self.jobs.start()
        try:
            asyncio.run(self.serving.run())
        finally:
            if self.jobs is not None:
                self.jobs.stop()


def serve_mlflow(environ: Mapping[str, str] = os.environ, **overrides) -> None:
    MlflowServer(MlflowServerSettings.from_environ(environ, **overrides), environ=environ).run()


__all__ = ["MlflowServer", "MlflowServerSettings", "serve_mlflow"]
