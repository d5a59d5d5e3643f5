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

With `HOKUSAI_MTLS_WORKERS` (or `--workers`) above 1 this process becomes the supervisor of that many
worker processes (`runtime.serving.workers`): it loads and refreshes the certificates, migrates the
store, runs MLflow's job runner, answers the health port and writes the metrics, once per task; each
worker serves MLflow behind the middleware on the one shared port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from redis import asyncio as redis

from runtime import names
from runtime.auth import redis_client
from runtime.auth.client_address import AddressPolicy
from runtime.auth.key_backend import ApiKeyPath, api_key_path, migrate_store
from runtime.auth.middleware import APIKeyAuthMiddleware, options_from_environ
from runtime.auth.mlflow_routes import mlflow_scope
from runtime.auth.peer_identity import IdentityPolicy
from runtime.auth.rate_limit import limiter_from_environ
from runtime.auth.route_policy import policy_from_environ
from runtime.certificates.inspection import days_left, dns_names, hours_left, ip_addresses
from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
from runtime.errors import WorkerError
from runtime.observability.metrics import DEFAULT_INTERVAL_SECONDS, Metrics, interval_from_environ
from runtime.secrets.loader import (
    LoaderSettings,
    LoadResult,
    load_certificates,
    read_published,
    refresh_seconds,
)
from runtime.security_level import SecurityLevel
from runtime.services import mlflow_setup
from runtime.services.asgi_service import (
    check_mode,
    health_report,
    proxy_trust,
    service_listener,
    service_listener_name,
    service_mode,
)
from runtime.services.certificate_refresh import certificate_refresh
from runtime.serving.acceptor import ACCEPT_BATCH
from runtime.serving.connection_limits import mlflow_limits
from runtime.serving.server import Background, Listener, Serving, listen_socket, periodic
from runtime.serving.workers import Supervisor, SupervisorLink, WorkerSpec, worker_command, worker_count

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
        check_mode(self.mode, self.loader)
        if not self.backend_store_uri:
            raise ValueError(f"{names.ENV_MLFLOW_BACKEND_STORE_URI} is not set")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ, **overrides) -> MlflowServerSettings:
        loader = LoaderSettings.from_environ(environ, role=names.SERVER.role)
        values = {
            "loader": loader,
            "mode": service_mode(environ, loader),
            "backend_store_uri": environ.get(names.ENV_MLFLOW_BACKEND_STORE_URI, ""),
            "artifacts_destination": environ.get(names.ENV_MLFLOW_ARTIFACTS_DESTINATION) or None,
            "refresh_seconds": refresh_seconds(environ),
            "metrics_seconds": interval_from_environ(environ),
        }
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


def prepare_mlflow(settings: MlflowServerSettings, certificate_hosts: Iterable[str] = ()) -> None:
    """Configure MLflow as `mlflow server` does before uvicorn starts, once per task.

    `runtime.services.mlflow_setup` sets MLflow's variables in this process's environment (the
    allowed hosts first: MLflow's host check reads them when its apps are imported) and migrates the
    backend store. Worker processes inherit the variables and import the app without migrating.
    """
    artifact_root = mlflow_setup.configure(
        environment=settings.loader.environment,
        backend_store_uri=settings.backend_store_uri,
        artifacts_destination=settings.artifacts_destination,
        certificate_hosts=certificate_hosts,
    )
    mlflow_setup.initialize_stores(settings.backend_store_uri, artifact_root)


class MlflowServer:
    """Everything the MLflow container runs: listeners, middleware, refresh and metrics.

    Three shapes: one process serving everything (`workers=1`); the supervisor of `workers` worker
    processes (the listeners are theirs, the rest is its own); or one of those workers (`worker`, its
    `WorkerSpec`), which reads the certificates its supervisor published and never fetches.
    """

    def __init__(
        self,
        settings: MlflowServerSettings,
        *,
        app=None,
        store=None,
        environ: Mapping[str, str] = os.environ,
        workers: int = 1,
        worker: WorkerSpec | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.worker = worker
        if worker is not None:
            self.loaded: LoadResult = read_published(
                settings.loader, SecurityLevel(worker.level), worker.source
            )
        else:
            self.loaded = load_certificates(settings.loader, store=store)
        environment = settings.loader.environment
        self.metrics = Metrics(environment=environment, service=names.MLFLOW_SERVICE)
        self.tls = None
        if self.loaded.level is SecurityLevel.MTLS:
            self.tls = ReloadableServerContext(
                ServerFiles.from_directory(settings.loader.directory),
                on_handshake=self.metrics.handshake_started,
            )
            self._record_expiry()
        self.jobs: mlflow_setup.JobRunner | None = None
        self.supervisor: Supervisor | None = None
        self.redis: redis.Redis | None = None
        self.keys = ApiKeyPath(None, None)
        if workers > 1 and worker is None:
            self._supervise(workers, environ)
            return
        self.app = self._middleware(app, environ)
        self.serving = Serving(
            self._listeners(),
            background=self._background(),
            limits=mlflow_limits(environ),
        )
        if worker is not None:
            self.serving.background.extend(
                SupervisorLink(worker).background(
                    self.serving, self.metrics, on_reload=self._reload_published, describe=self._describe
                )
            )

    def _supervise(self, workers: int, environ: Mapping[str, str]) -> None:
        """The supervisor: MLflow's once-per-task set-up here, the serving in `workers` processes."""
        s = self.settings
        self._prepare_mlflow()
        # The workers' environment: ours with what MLflow's set-up exported (allowed hosts, stores, jobs).
        worker_environ = {**os.environ, **environ}
        self.supervisor = Supervisor(
            command=worker_command("serve-mlflow", "--host", s.host, "--port", str(s.port)),
            environ=worker_environ,
            count=workers,
            sockets={"service": listen_socket(self._service_name(), s.host, s.port)},
            level=self.loaded.level.value,
            source=self.loaded.source,
            metrics=self.metrics,
            on_failure=lambda _message: self.serving.stop(),
        )
        self.serving = Serving(
            [Listener("health", "127.0.0.1", s.health_port, self.health_app)],
            background=[*self._background(), self.supervisor.background()],
            limits=mlflow_limits(environ),
        )
        log.info("serving MLflow with %d worker processes on port %d", workers, s.port)

    def _prepare_mlflow(self) -> None:
        """MLflow's set-up as `mlflow server` does it (allowed hosts, stores, migrations), and its job runner."""
        prepare_mlflow(self.settings, self._certificate_hosts())
        jobs = mlflow_setup.JobRunner(
            self.settings.backend_store_uri, os.environ[mlflow_setup.ARTIFACT_ROOT_ENV_VAR], os.environ
        )
        self.jobs = jobs if jobs.prepare() else None

    def _middleware(self, app, environ: Mapping[str, str]) -> APIKeyAuthMiddleware:
        """MLflow's app (or `app`) behind the hybrid middleware, with this process's Redis and auth client."""
        settings = self.settings
        self.redis = redis_client.redis_from_environ(environ)  # one bounded pool: cache and limiter
        self.keys = api_key_path(environ, self.redis)  # our key store, else the auth service, else none
        if self.keys.backend is None and (self.worker is None or self.worker.index == 1):  # once per task
            log.warning(
                "neither %s nor %s is set: requests without a client certificate are refused (401)",
                names.ENV_KEY_STORE_URL,
                names.ENV_AUTH_SERVICE_URL,
            )
        permissive = settings.mode == names.MTLS_MODE_PERMISSIVE
        edge = options_from_environ(environ)
        if app is None:
            if self.worker is None:
                self._prepare_mlflow()
            from mlflow.server.fastapi_app import app  # a worker: configured by its supervisor's environment
        return APIKeyAuthMiddleware(
            app,
            identities=IdentityPolicy.from_environ(  # MLflow's declared callers, unless scopes are set
                {**environ, names.ENV_ENVIRONMENT: settings.loader.environment},
                server=settings.loader.identity.service,
            ),
            addresses=AddressPolicy.from_environ(environ),
            validator=self.keys.validator,
            usage=self.keys.usage,
            route_policy=policy_from_environ(environ, route_tables=True),
            limiter=limiter_from_environ(environ, self.redis),
            metrics=self.metrics,
            enable_mtls=self.tls is not None,
            count_plain=permissive,
            required_scope=mlflow_scope,
            mlflow_errors=lambda _scope: True,  # every route here is MLflow's: its client reads the shape
            proxy_trust=proxy_trust(self.settings.loader.directory, edge["proxy_kind"]),
            **edge,
        )

    def _background(self) -> list[Background]:
        s = self.settings
        jobs = []
        if self.worker is None:  # a worker's supervisor refreshes, and writes the task's metrics
            jobs = [
                certificate_refresh(
                    s.refresh_seconds, self.refresh, self.tls.certificate if self.tls else None
                ),
                periodic("metrics", s.metrics_seconds, self.metrics.flush, at_exit=True),
            ]
        jobs.extend(self.keys.background())
        if self.redis is not None:
            jobs.append(Background("Redis pool", at_exit=self.redis.aclose))
        return jobs

    def _certificate_hosts(self) -> list[str]:
        """The names our certificate is valid for: a client that verified it dialed one of them."""
        if self.tls is None:
            return []
        return [*dns_names(self.tls.certificate), *ip_addresses(self.tls.certificate)]

    def _service_name(self) -> str:
        return service_listener_name(self.tls, self.settings.mode)

    def _listeners(self) -> list[Listener]:
        """The service port (a worker's: the socket its supervisor bound), and the health port unless a worker."""
        s = self.settings
        # a worker serves the socket its supervisor bound, one connection per readiness event
        sock = self.worker.socket("service") if self.worker is not None else None
        batch = 1 if self.worker is not None else ACCEPT_BATCH
        if (
            self.tls is None
            and s.mode != names.MTLS_MODE_OFF
            and (self.worker is None or self.worker.index == 1)
        ):
            log.warning("mTLS mode %s but no certificates (development): serving plain HTTP", s.mode)
        service = service_listener(
            self.app, s.host, s.port, s.mode, self.tls, self.metrics, sock=sock, accept_batch=batch
        )
        if self.worker is not None:
            return [service]
        return [service, Listener("health", "127.0.0.1", s.health_port, self.health_app)]

    # --- background ----------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-fetch and verify through the loader, then swap into the live context.

        A refresh: anything short of a new verified set raises `RefreshError` (in every
        environment) and the files and the live context stay as they are."""
        self.loaded = load_certificates(self.settings.loader, store=self.store, refresh=True)
        changed = self.tls.reload() if self.tls is not None else False
        self._record_expiry()
        if self.supervisor is not None:
            self.supervisor.reload()
        return changed

    def _reload_published(self) -> None:
        """A worker: the supervisor published a new set; serve it from the next handshake."""
        if self.tls is not None:
            self.tls.reload()

    def _describe(self) -> dict:
        """What a worker tells its supervisor it serves (the health answer lists it per worker)."""
        if self.tls is None:
            return {}
        certificate = self.tls.certificate
        return {
            "serial": f"{certificate.serial_number:x}",
            "not_after": certificate.not_valid_after_utc.isoformat(),
        }

    def _record_expiry(self) -> None:
        if self.tls is not None:
            certificate = self.tls.certificate
            self.metrics.certificate_time_left(
                names.SERVER.name, days_left(certificate), hours_left(certificate)
            )

    # --- health ------------------------------------------------------------------------------------
    def health(self) -> dict:
        report = health_report(self.loaded.level, self.settings.mode, self.tls)
        if self.supervisor is not None:
            state = self.supervisor.state()
            report["workers"] = {
                "configured": state.configured,
                "ready": state.ready,
                "restarts": state.restarts,
                "processes": state.workers,
            }
            if state.ready == 0 and report["status"] == "ok":
                report["status"] = "starting" if self.supervisor.failure is None else "workers-failed"
        return report

    async def health_app(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return
        if scope["path"] == "/metrics":
            if self.supervisor is not None:
                await self.supervisor.collect()  # every worker's requests so far, not a second old
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
        if self.supervisor is not None and self.supervisor.failure is not None:
            raise WorkerError(self.supervisor.failure)


def serve_mlflow(environ: Mapping[str, str] = os.environ, *, workers: int | None = None, **overrides) -> None:
    """serve-mlflow: one process, a supervisor of `workers` (else HOKUSAI_MTLS_WORKERS, else the CPUs), or,
    started by such a supervisor, one of its workers."""
    policy_from_environ(
        environ, route_tables=True
    )  # a policy that cannot be read: exit 1 naming the field, before any work
    spec = WorkerSpec.from_environ(environ)
    count = 1 if spec is not None else worker_count(environ, workers)
    settings = MlflowServerSettings.from_environ(environ, **overrides)
    if spec is None:
        migrate_store(environ)  # with a key store of ours: its tables, once per task
    MlflowServer(settings, environ=environ, workers=count, worker=spec).run()


__all__ = ["MlflowServer", "MlflowServerSettings", "serve_mlflow"]
