"""`hokusai-mtls serve --app module:attribute`: any ASGI app behind what MLflow has (issue 15).

The app is served as `serve-mlflow` serves MLflow, with the same building blocks
(`runtime.serving.server` listeners, `APIKeyAuthMiddleware` with the route policy, the loader's
certificates refreshed into the live TLS context, EMF metrics, the loopback health port):

- strict / permissive / off from HOKUSAI_MTLS_MODE and ENABLE_MTLS_AUTH (`service_mode`);
- WebSockets accepted (`Listener(websockets=True)`): the WebSocket scope carries the TLS extension,
  so the middleware identifies an mTLS caller of a WebSocket route as of any other route (the route
  policy sees the handshake as a GET), and refuses an unidentified one before the accept (1008);
- the identity, as for MLflow's routes, in `scope["state"]` (`service_id`, `service_identity`,
  `auth_path`; Starlette's `request.state` / `websocket.state`).

One process: `--workers` is not supported for an arbitrary app yet.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime import env_numbers, names
from runtime.auth import redis_client
from runtime.auth.client_address import AddressPolicy
from runtime.auth.key_backend import ApiKeyPath, api_key_path, migrate_store
from runtime.auth.middleware import APIKeyAuthMiddleware, options_from_environ
from runtime.auth.peer_identity import IdentityPolicy
from runtime.auth.rate_limit import limiter_from_environ
from runtime.auth.route_policy import policy_from_environ
from runtime.certificates.inspection import days_left, hours_left
from runtime.certificates.published_trust import PublishedTrust
from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
from runtime.observability.metrics import DEFAULT_INTERVAL_SECONDS, Metrics, interval_from_environ
from runtime.secrets.loader import (
    LoaderSettings,
    LoadResult,
    load_certificates,
    refresh_seconds,
)
from runtime.security_level import SecurityLevel
from runtime.services.certificate_refresh import certificate_refresh
from runtime.serving.connection_limits import mlflow_limits
from runtime.serving.server import Background, Listener, Serving, periodic

log = logging.getLogger("hokusai_mtls")

DEFAULT_PORT = 8443
DEFAULT_HEALTH_PORT = 8444


# --- shared with serve-mlflow (runtime.services.mlflow_server) --------------------------------------
def service_mode(environ: Mapping[str, str], loader: LoaderSettings) -> str:
    """HOKUSAI_MTLS_MODE, else strict with mTLS enabled and off without (ENABLE_MTLS_AUTH=false)."""
    return environ.get(names.ENV_MTLS_MODE) or (
        names.MTLS_MODE_STRICT if loader.enable_mtls else names.MTLS_MODE_OFF
    )


def check_mode(mode: str, loader: LoaderSettings) -> None:
    """ValueError naming the variable unless `mode` is one we serve with these loader settings."""
    if mode not in names.MTLS_MODES:
        raise ValueError(f"{names.ENV_MTLS_MODE}={mode!r}: expected one of {', '.join(names.MTLS_MODES)}")
    if mode == names.MTLS_MODE_OFF and loader.enable_mtls:
        raise ValueError(
            f"{names.ENV_MTLS_MODE}=off needs {names.ENV_ENABLE_MTLS}=false (the rollback switch)"
        )


def proxy_trust(directory: Path, proxy_kind: str) -> PublishedTrust | None:
    """What forwarded certificates are verified against, when a proxy forwards them: the loader's latest
    bundle and revocation lists in `directory`, followed on every refresh (`PublishedTrust`)."""
    if proxy_kind == names.PROXY_KIND_NONE or not (directory / names.CA_BUNDLE_FILE).exists():
        return None
    return PublishedTrust(directory)


def service_listener_name(tls: ReloadableServerContext | None, mode: str) -> str:
    if tls is None:
        return "plain"
    return "mtls" + (" + plain (permissive)" if mode == names.MTLS_MODE_PERMISSIVE else "")


def service_listener(
    app: Callable,
    host: str,
    port: int,
    mode: str,
    tls: ReloadableServerContext | None,
    metrics: Metrics,
    **options,
) -> Listener:
    """A server's service port, the same for every server: plain HTTP without certificates, else mTLS
    (permissive: plain HTTP on the same port too) with the handshake metrics wired, completed and failed
    by reason. `options`: the rest of `Listener` (a worker's socket, WebSockets)."""
    name = service_listener_name(tls, mode)
    if tls is None:
        return Listener(name, host, port, app, **options)
    return Listener(
        name,
        host,
        port,
        app,
        tls,
        metrics.handshake_completed,
        on_handshake_failure=metrics.handshake_failed,
        plain_too=mode == names.MTLS_MODE_PERMISSIVE,
        **options,
    )


def health_report(level: SecurityLevel, mode: str, tls: ReloadableServerContext | None) -> dict:
    """The health answer's common part: status, security level, mode, the served certificate."""
    report: dict[str, object] = {"status": "ok", "security_level": level.value, "mode": mode}
    if tls is not None:
        certificate = tls.certificate
        left = days_left(certificate)
        report["certificate"] = {
            "serial": f"{certificate.serial_number:x}",
            "not_after": certificate.not_valid_after_utc.isoformat(),
            "days_left": left,
            "hours_left": hours_left(certificate),
            "reloads": tls.reloads,
        }
        if left < 0:
            report["status"] = "certificate-expired"
    return report


# --- the app ----------------------------------------------------------------------------------
def load_app(target: str) -> Callable:
    """The ASGI app `module:attribute` names; ValueError naming `target` if there is none."""
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"--app {target!r}: expected module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"--app {target!r}: no module named {exc.name or module_name!r}") from None
    except Exception as exc:  # the module itself failed: still one line, naming it
        raise ValueError(
            f"--app {target!r}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from None
    app = module
    for part in attribute.split("."):
        if not hasattr(app, part):
            raise ValueError(f"--app {target!r}: {module_name} has no attribute {attribute!r}")
        app = getattr(app, part)
    if not callable(app):
        raise ValueError(f"--app {target!r}: {attribute} is not callable (not an ASGI app)")
    return app


@dataclass(frozen=True)
class AsgiServiceSettings:
    loader: LoaderSettings
    mode: str
    app: str
    host: str = "0.0.0.0"  # noqa: S104 - the task's own network interface, inside its security group
    port: int = DEFAULT_PORT
    health_port: int = DEFAULT_HEALTH_PORT
    refresh_seconds: float = 300
    metrics_seconds: float = DEFAULT_INTERVAL_SECONDS

    def __post_init__(self) -> None:
        check_mode(self.mode, self.loader)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ, **overrides) -> AsgiServiceSettings:
        # The listener presents the declared service's own identity (HOKUSAI_MTLS_ROLE; MLflow's server
        # identity if unset), which must serve: its certificate has serverAuth and names its Cloud Map name.
        loader = LoaderSettings.from_environ(environ, role=environ.get(names.ENV_ROLE) or names.SERVER.role)
        if not loader.identity.serves:
            raise ValueError(
                f"{names.ENV_ROLE}={loader.role}: {loader.identity.service} does not serve mTLS in the declared "
                f"services ({names.ENV_SERVICES}), so its certificate cannot serve"
            )
        port = env_numbers.whole(
            environ, names.ENV_PORT, default=DEFAULT_PORT, low=1, high=65535, what="a port"
        )
        health = env_numbers.whole(
            environ, names.ENV_HEALTH_PORT, default=port + 1, low=1, high=65535, what="a port"
        )
        values = {
            "loader": loader,
            "port": port,
            "health_port": health,
            "mode": service_mode(environ, loader),
            "refresh_seconds": refresh_seconds(environ),
            "metrics_seconds": interval_from_environ(environ),
        }
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


class AsgiService:
    """One process: the app behind the middleware on the service port, health, refresh and metrics."""

    def __init__(self, settings: AsgiServiceSettings, *, app=None, store=None, environ=os.environ) -> None:
        self.settings = settings
        self.store = store
        target = app if app is not None else load_app(settings.app)
        self.loaded: LoadResult = load_certificates(settings.loader, store=store)
        self.metrics = Metrics(
            environment=settings.loader.environment, service=settings.loader.identity.service
        )
        self.tls: ReloadableServerContext | None = None
        if self.loaded.level is SecurityLevel.MTLS:
            self.tls = ReloadableServerContext(
                ServerFiles.from_directory(settings.loader.directory),
                on_handshake=self.metrics.handshake_started,
            )
            self._record_expiry()
        self.redis = redis_client.redis_from_environ(environ)
        self.keys: ApiKeyPath = api_key_path(environ, self.redis)
        edge = options_from_environ(environ)
        self.app = APIKeyAuthMiddleware(
            target,
            identities=IdentityPolicy.from_environ(  # only its declared callers, unless scopes are set
                {**environ, names.ENV_ENVIRONMENT: settings.loader.environment},
                server=settings.loader.identity.service,
            ),
            addresses=AddressPolicy.from_environ(environ),
            validator=self.keys.validator,
            usage=self.keys.usage,
            route_policy=policy_from_environ(environ),
            limiter=limiter_from_environ(environ, self.redis),
            metrics=self.metrics,
            enable_mtls=self.tls is not None,
            count_plain=settings.mode == names.MTLS_MODE_PERMISSIVE,
            proxy_trust=proxy_trust(settings.loader.directory, edge["proxy_kind"]),
            **edge,
        )
        self.serving = Serving(
            self._listeners(), background=self._background(), limits=mlflow_limits(environ)
        )

    def _listeners(self) -> list[Listener]:
        s = self.settings
        if self.tls is None and s.mode != names.MTLS_MODE_OFF:
            log.warning("mTLS mode %s but no certificates (development): serving plain HTTP", s.mode)
        service = service_listener(self.app, s.host, s.port, s.mode, self.tls, self.metrics, websockets=True)
        return [service, Listener("health", "127.0.0.1", s.health_port, self.health_app)]

    def _background(self) -> list[Background]:
        s = self.settings
        jobs = [
            certificate_refresh(s.refresh_seconds, self.refresh, self.tls.certificate if self.tls else None),
            periodic("metrics", s.metrics_seconds, self.metrics.flush, at_exit=True),
            *self.keys.background(),
        ]
        if self.redis is not None:
            jobs.append(Background("Redis pool", at_exit=self.redis.aclose))
        return jobs

    def refresh(self) -> bool:
        """Re-fetch and verify through the loader, then swap into the live context (see serve-mlflow)."""
        self.loaded = load_certificates(self.settings.loader, store=self.store, refresh=True)
        changed = self.tls.reload() if self.tls is not None else False
        self._record_expiry()
        return changed

    def _record_expiry(self) -> None:
        if self.tls is not None:
            certificate = self.tls.certificate
            self.metrics.certificate_time_left(
                self.settings.loader.identity.name, days_left(certificate), hours_left(certificate)
            )

    async def health_app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics":
            status, body, kind = 200, self.metrics.prometheus(), b"text/plain; version=0.0.4"
        elif scope["path"] == "/health":
            report = health_report(self.loaded.level, self.settings.mode, self.tls)
            status = 200 if report["status"] == "ok" else 503
            body, kind = json.dumps(report).encode(), b"application/json"
        else:
            status, body, kind = 404, b'{"detail": "not found"}', b"application/json"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})

    def run(self) -> None:
        asyncio.run(self.serving.run())


def serve_app(app: str, environ: Mapping[str, str] = os.environ, **overrides) -> None:
    """serve --app: the app is loaded first, so a bad --app is refused before any certificate work."""
    target = load_app(app)
    policy_from_environ(environ)  # a policy that cannot be read: exit 1 naming the field
    settings = AsgiServiceSettings.from_environ(environ, app=app, **overrides)
    migrate_store(environ)
    AsgiService(settings, app=target, environ=environ).run()


__all__ = ["AsgiService", "AsgiServiceSettings", "load_app", "serve_app"]
