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

With `HOKUSAI_MTLS_WORKERS` (or `--workers`) above 1, `serve-api` is an `ApiSupervisor` of that many
`ApiService` worker processes on the one port (`runtime.serving.workers`): the supervisor loads and
refreshes the certificates and writes the metrics; each worker serves the app, `/health` included.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Mapping, MutableMapping

from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from runtime import names
from runtime.auth import mlflow_routes, redis_client
from runtime.auth.api_keys import VALIDATE_PATH
from runtime.auth.client_address import AddressPolicy
from runtime.auth.key_backend import api_key_path, migrate_store
from runtime.auth.middleware import APIKeyAuthMiddleware, options_from_environ
from runtime.auth.peer_identity import IdentityPolicy
from runtime.auth.rate_limit import limiter_from_environ
from runtime.auth.route_policy import policy_from_environ
from runtime.certificates.inspection import days_left, hours_left
from runtime.clients.adaptive_client import ClientTLS, create_adaptive_client
from runtime.errors import WorkerError
from runtime.observability.metrics import Metrics, interval_from_environ
from runtime.secrets.loader import LoaderSettings, LoadResult, read_published, refresh_seconds
from runtime.secrets.mlflow_config import configure_internal_mtls
from runtime.security_level import SecurityLevel
from runtime.services.asgi_service import proxy_trust
from runtime.services.certificate_refresh import certificate_refresh
from runtime.services.mlflow_proxy import mlflow_proxy_app
from runtime.serving.connection_limits import api_limits
from runtime.serving.server import Background, Listener, Serving, listen_socket, periodic
from runtime.serving.workers import Supervisor, SupervisorLink, WorkerSpec, worker_command, worker_count

log = logging.getLogger("hokusai_mtls")

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


def _load(environ: MutableMapping[str, str], store=None, *, refresh: bool = False) -> LoadResult:
    """The API's identity through the loader, MLflow's client variables set in `environ`."""
    if refresh:
        return configure_internal_mtls(role=names.API.role, environ=environ, refresh=True)
    return configure_internal_mtls(role=names.API.role, environ=environ, store=store, reload=True)


def _leaf(loaded: LoadResult) -> x509.Certificate | None:
    """The leaf a load gave (None at security level INSECURE or TLS)."""
    return loaded.identity.certificate if loaded.identity is not None else None


def record_time_left(metrics: Metrics, loaded: LoadResult) -> None:
    """The time left of the client certificate the API calls MLflow with, published as servers publish
    theirs (`CertificateHoursToExpiry`, Identity=api): the api's leaf alarms then also see a task whose
    refresh stopped, not only the secret (whose rotation may be fine)."""
    if loaded.identity is not None:
        certificate = loaded.identity.certificate
        metrics.certificate_time_left(
            loaded.settings.identity.name, days_left(certificate), hours_left(certificate)
        )


class ApiService:
    """The API's app behind the middleware: in one process, or in one worker process (`worker`, which
    reads the identity its supervisor published and never fetches)."""

    def __init__(
        self, environ: MutableMapping[str, str] = os.environ, *, store=None, worker: WorkerSpec | None = None
    ) -> None:
        writable = environ  # configure_internal_mtls sets MLflow's variables in it
        self.worker = worker
        self.loaded = _load(writable, store) if worker is None else self._published(writable)
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
        if worker is None:  # a worker's supervisor writes the task's metrics
            record_time_left(self.metrics, self.loaded)
        routes = [
            Route("/health", self.health),
            Mount(MLFLOW_MOUNT, mlflow_proxy_app(self.upstream, self.client)),
        ]
        if (platform := _platform_app(writable)) is not None:
            routes.append(Mount("/", platform))
        self.redis = redis_client.redis_from_environ(writable)  # one bounded pool: cache and limiter
        self.keys = api_key_path(writable, self.redis)  # our key store, else the auth service, else none
        addresses = AddressPolicy.from_environ(writable)
        excluded = ["/health"]
        if self.keys.store is not None:  # the store's REST API, and the auth service's validation call
            routes[1:1] = self._key_routes(addresses)
            excluded.append(VALIDATE_PATH)
        edge = options_from_environ(writable)
        self.app = APIKeyAuthMiddleware(
            Starlette(routes=routes),
            excluded_paths=excluded,
            identities=IdentityPolicy.from_environ({**writable, names.ENV_ENVIRONMENT: environment}),
            addresses=addresses,
            validator=self.keys.validator,
            usage=self.keys.usage,
            route_policy=policy_from_environ(writable),
            limiter=limiter_from_environ(writable, self.redis),
            metrics=self.metrics,
            required_scope=proxied_mlflow_scope,
            mlflow_errors=is_proxied_mlflow,
            # Behind an ALB in mTLS verify mode, services may call the API with their certificates too.
            proxy_trust=proxy_trust(self.loaded.settings.directory, edge["proxy_kind"]),
            **edge,
        )

    def _key_routes(self, addresses: AddressPolicy) -> list[Route]:
        from runtime.services.key_api import KEYS_PATH, KeyApi  # Pydantic and SQLAlchemy: only with a store

        assert self.keys.store is not None and self.keys.validator is not None  # noqa: S101 - see caller
        require_https = (
            not self.loaded.settings.may_degrade
        )  # HOKUSAI_MTLS_MAY_DEGRADE, development's default
        if not require_https and (self.worker is None or self.worker.index == 1):
            log.warning("%s: the key API answers plain HTTP too (development only)", KEYS_PATH)
        api = KeyApi(self.keys.store, self.keys.validator, addresses=addresses, require_https=require_https)
        return [api.validation_route(), *api.routes()]

    def _published(self, environ: Mapping[str, str]) -> LoadResult:
        assert self.worker is not None  # noqa: S101 - only workers read what a supervisor published
        settings = LoaderSettings.from_environ(environ, role=names.API.role)
        return read_published(settings, SecurityLevel(self.worker.level), self.worker.source)

    def refresh(self) -> None:
        """Load the rotated identity (the loader verifies it, then swaps the files) and use it
        for the next connections to MLflow; the previous set stays if anything is wrong."""
        self.loaded = _load(self.environ, refresh=True)
        self.client_tls.reload()
        record_time_left(self.metrics, self.loaded)

    def _reload_published(self) -> None:
        """A worker: its supervisor published a new identity; use it for the next connections to MLflow."""
        self.loaded = self._published(self.environ)
        self.client_tls.reload()

    def _describe(self) -> dict:
        identity = self.loaded.identity
        if identity is None:
            return {}
        certificate = identity.certificate
        return {
            "serial": f"{certificate.serial_number:x}",
            "not_after": certificate.not_valid_after_utc.isoformat(),
        }

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
                "hours_left": hours_left(certificate),
            }
        if (keys := self.keys.describe()) is not None:
            report["api_keys"] = keys
        return JSONResponse(report)

    def serving(self, host: str, port: int) -> Serving:
        limits = api_limits(self.environ)  # keep-alive 65 s: longer than the ALB's idle timeout
        if self.worker is not None:
            listener = Listener(
                "api", host, port, self.app, sock=self.worker.socket("service"), accept_batch=1
            )
            serving = Serving([listener], limits=limits, background=self._clients_to_close())
            serving.background.extend(
                SupervisorLink(self.worker).background(
                    serving, self.metrics, on_reload=self._reload_published, describe=self._describe
                )
            )
            return serving
        return Serving(
            [Listener("api", host, port, self.app)],
            limits=limits,
            background=[
                periodic("metrics", self.metrics_seconds, self.metrics.flush, at_exit=True),
                certificate_refresh(refresh_seconds(self.environ), self.refresh, _leaf(self.loaded)),
                *self._clients_to_close(),
            ],
        )

    def _clients_to_close(self) -> list[Background]:
        """Closed at exit, each on its own (one that fails leaves the others to close)."""
        jobs = [Background("MLflow client", at_exit=self.client.aclose), *self.keys.background()]
        if self.redis is not None:
            jobs.append(Background("Redis pool", at_exit=self.redis.aclose))
        return jobs


class ApiSupervisor:
    """serve-api with worker processes: the identity loaded and refreshed, the metrics written, once."""

    def __init__(self, environ: MutableMapping[str, str], *, host: str, port: int, workers: int) -> None:
        self.environ = environ
        self.loaded = _load(environ)  # exports MLflow's client variables, which the workers inherit
        self.metrics = Metrics(environment=self.loaded.settings.environment, service=names.API_SERVICE)
        record_time_left(self.metrics, self.loaded)
        self.supervisor = Supervisor(
            command=worker_command("serve-api", "--host", host, "--port", str(port)),
            environ={**os.environ, **environ},
            count=workers,
            sockets={"service": listen_socket("api", host, port)},
            level=self.loaded.level.value,
            source=self.loaded.source,
            metrics=self.metrics,
            on_failure=lambda _message: self.serving.stop(),
        )
        self.serving = Serving(
            [],
            background=[
                periodic("metrics", interval_from_environ(environ), self.metrics.flush, at_exit=True),
                certificate_refresh(refresh_seconds(environ), self.refresh, _leaf(self.loaded)),
                self.supervisor.background(),
            ],
        )
        log.info("serving the API with %d worker processes on port %d", workers, port)

    def refresh(self) -> None:
        """Load the rotated identity; the workers reload it only once the loader has published it."""
        self.loaded = _load(self.environ, refresh=True)
        record_time_left(self.metrics, self.loaded)
        self.supervisor.reload()

    def run(self) -> None:
        asyncio.run(self.serving.run())
        if self.supervisor.failure is not None:
            raise WorkerError(self.supervisor.failure)


def serve_api(
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    environ: MutableMapping[str, str] = os.environ,
) -> None:
    """serve-api: one process, a supervisor of `workers` (else HOKUSAI_MTLS_WORKERS, else the CPUs), or,
    started by such a supervisor, one of its workers."""
    api_limits(environ)  # a bad timeout or bound: exit 1 naming the variable, before any work
    interval_from_environ(environ)
    refresh_seconds(environ)
    redis_client.max_connections(environ)
    policy_from_environ(environ)
    spec = WorkerSpec.from_environ(environ)
    count = 1 if spec is not None else worker_count(environ, workers)
    host, port = host or "0.0.0.0", port or names.API_PORT  # noqa: S104 - the task's interface, in its SG
    if spec is None:
        migrate_store(environ)  # the supervisor or the single process; workers find it done
    if count > 1:
        ApiSupervisor(environ, host=host, port=port, workers=count).run()
        return
    service = ApiService(environ, worker=spec)
    asyncio.run(service.serving(host, port).run())
