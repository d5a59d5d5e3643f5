"""One service's security settings behind one small object: seed 003's `AntiFragileSecurityConfig`.

Seed 003 asked every service for the same four questions: which security level am I at, give me
a client for internal calls, are my certificates there, and what does my health check look like.
The answers already exist in the runtime; this class only puts them behind the seed's names, so a
service cannot answer one of them differently from the loader, the adaptive client or the stacks:

- which service and identity: the declared services (`runtime.service_catalog`, HOKUSAI_MTLS_SERVICES);
- the level and the clients: `runtime.clients.adaptive_client`, which follows what the loader exported;
- the certificates: the files the loader (`hokusai-mtls load-certs` / `run`) published in the
  identity's directory, verified by `runtime.certificates.certset.verify_for`, the loader's own check;
- the health check: the loopback plain-HTTP port `hokusai-mtls health --port N` queries, with the
  timings of `constructs_lib.mtls_task_definition`.

Nothing here fetches from AWS or writes a file, and no secret value is ever logged or shown in a repr.

>>> security = AntiFragileSecurityConfig("api")  # ENVIRONMENT from the environment
>>> await security.ensure_certificates()
>>> client = security.create_adaptive_client(base_url="https://mlflow.hokusai-staging.local:5000")
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import httpx
from cryptography import x509

from runtime import env_numbers, names
from runtime.certificates import pem
from runtime.certificates.certset import verify_for
from runtime.certificates.identity import TLSIdentity
from runtime.clients import adaptive_client
from runtime.errors import CertificateSetError, LoadError, MtlsError
from runtime.secrets.loader import LoaderSettings
from runtime.security_level import SecurityLevel, parse_flag
from runtime.service_catalog import RUNTIME_MLFLOW, SERVES_MTLS, catalog_from_environ

log = logging.getLogger("hokusai_mtls")

HEALTH_HOST = "127.0.0.1"
"""The health listener is loopback-only: the check runs inside the task, next to the service."""
HEALTH_PATH = "/health"
"""What `hokusai-mtls health` asks for by default (`--path`)."""
HEALTH_SCHEME = "http"
"""Plain HTTP: under strict mTLS the service port refuses a caller without a certificate, and a
health check has none, so the loopback health port never speaks TLS."""
# The ECS container health check of `constructs_lib.mtls_task_definition` (the runtime does not
# import the CDK code); tests/unit/services/test_security_config.py checks that the two agree.
HEALTH_INTERVAL_SECONDS = 30
HEALTH_TIMEOUT_SECONDS = 5
HEALTH_RETRIES = 3
HEALTH_START_PERIOD_SECONDS = 60


class AntiFragileSecurityConfig:
    """The security settings of one declared service with an identity, in one environment.

    Built from the environment the loader prepared (`environ`, default `os.environ`), and checked
    at once: an undeclared service, a service without an identity, a missing or bad ENVIRONMENT,
    HOKUSAI_MTLS_MAY_DEGRADE or ENABLE_MTLS_AUTH is a ValueError naming it, at start-up rather
    than at the first call.
    """

    def __init__(
        self, service_name: str, environment: str | None = None, *, environ: Mapping[str, str] = os.environ
    ) -> None:
        self._environ = environ
        self._catalog = catalog_from_environ(environ)
        declaration = self._catalog.service(service_name)  # ValueError naming the declared ones
        identity = self._catalog.identity_of(service_name)
        if identity is None:
            raise ValueError(
                f"service {service_name!r} has no identity: it neither serves mTLS nor calls a declared "
                f"server ({names.ENV_SERVICES}), so it holds no certificate"
            )
        self._declaration = declaration
        self._identity = identity
        if environment is None:
            environment = environ.get(names.ENV_ENVIRONMENT, "").strip()
            if not environment:
                raise ValueError(f"{names.ENV_ENVIRONMENT} is not set and no environment was given")
            try:
                names.check_environment(environment)
            except ValueError as exc:
                raise ValueError(f"{names.ENV_ENVIRONMENT}: {exc}") from None
        # The loader's own settings for this role: the same certificate directory rule
        # (HOKUSAI_MTLS_CERT_DIR, else the identity's default) and the same degrade decision.
        cert_dir = environ.get(names.ENV_CERT_DIR) or None
        self._loader = LoaderSettings(
            environment=names.check_environment(environment),
            role=identity.role,
            enable_mtls=parse_flag(names.ENV_ENABLE_MTLS, environ.get(names.ENV_ENABLE_MTLS), default=True),
            cert_dir=Path(cert_dir) if cert_dir else None,
            may_degrade=names.may_degrade(environment, environ),
            catalog=self._catalog,
        )

    # --- what it is ---------------------------------------------------------------------------
    @property
    def service_name(self) -> str:
        return self._declaration.name

    @property
    def environment(self) -> str:
        return self._loader.environment

    @property
    def identity(self) -> names.Identity:
        return self._identity

    @property
    def certificate_dir(self) -> Path:
        """Where the loader writes this identity's files (ca.crt, tls.crt, tls.key, tls.pem)."""
        return self._loader.directory

    @property
    def may_degrade(self) -> bool:
        return bool(self._loader.may_degrade)

    def __repr__(self) -> str:  # names and paths only: never a value read from the environment's secrets
        return (
            f"{type(self).__name__}(service_name={self.service_name!r}, environment={self.environment!r}, "
            f"identity={self._identity.name!r}, certificate_dir={str(self.certificate_dir)!r})"
        )

    # --- the seed's API -----------------------------------------------------------------------
    def get_security_level(self) -> SecurityLevel:
        """The level the loader exported (HOKUSAI_MTLS_SECURITY_LEVEL), read as the adaptive client reads it.

        The same parsing as `ClientTLS.from_environ`, so the two never disagree; unset or unknown is
        `ClientConfigError` (the loader has not run). It does not open the level's files: a client that
        cannot have them fails in `create_adaptive_client`, never by a quiet downgrade here.
        """
        return adaptive_client.security_level_from_environ(self._environ)

    def create_adaptive_client(self, base_url: str = "", **httpx_options) -> httpx.AsyncClient:
        """`runtime.clients.adaptive_client.create_adaptive_client` over this service's environment.

        The security level decides what it presents; it always verifies the server. The caller owns
        the client and closes it (`await client.aclose()`). Raises `ClientConfigError`.
        """
        return adaptive_client.create_adaptive_client(
            environ=self._environ, base_url=base_url, **httpx_options
        )

    def create_adaptive_sync_client(self, base_url: str = "", **httpx_options) -> httpx.Client:
        """The blocking twin (`adaptive_client.create_adaptive_sync_client`) for workers and scripts."""
        return adaptive_client.create_adaptive_sync_client(
            environ=self._environ, base_url=base_url, **httpx_options
        )

    async def ensure_certificates(self) -> bool:
        """True when this identity's certificates are in its directory and verify for it.

        This only checks; it does NOT fetch from AWS Secrets Manager. The loader (`hokusai-mtls
        load-certs`, or `hokusai-mtls run` as the entrypoint) fetches, verifies and writes them before
        the app starts; a service calling this at start-up learns whether that happened for its
        identity. The check is the loader's (`certset.verify_for`: the bundle's CAs belong to this
        environment, the leaf is this identity's, unexpired, with the right usage and names), so a
        set the loader would refuse is refused here too. The files are read in a thread.

        Missing or bad: where this environment may degrade (`names.may_degrade`, e.g. development)
        it logs a loud warning naming the directory and returns False; anywhere else it raises
        `LoadError` naming the directory and the problem (fail closed). With mTLS switched off
        (ENABLE_MTLS_AUTH=false, the rollback) no certificate is used by design: False, with a warning.
        """
        if not self._loader.enable_mtls:
            log.warning(
                "%s in %s: %s=false (rollback): no certificates are used, plain HTTP",
                self.service_name,
                self.environment,
                names.ENV_ENABLE_MTLS,
            )
            return False
        try:
            await asyncio.to_thread(self._verify_files)
        except (OSError, MtlsError) as exc:
            problem = str(exc)
        else:
            log.info(
                "%s in %s: certificates in %s verify",
                self.service_name,
                self.environment,
                self.certificate_dir,
            )
            return True
        if self.may_degrade:
            log.warning(
                "DEGRADED: %s in %s has no usable certificates in %s (%s); continuing because %s may degrade",
                self.service_name,
                self.environment,
                self.certificate_dir,
                problem,
                self.environment,
            )
            return False
        raise LoadError(
            f"{self.service_name} in {self.environment} requires mTLS and has no usable certificates in "
            f"{self.certificate_dir}: {problem}. Run the certificate loader (`hokusai-mtls run` or "
            f"`load-certs --role {self._identity.role}`) before the service starts"
        )

    def get_health_check_config(self) -> dict:
        """What a container health check of this service needs (ECS, compose).

        The port is the one its server answers `/health` on in plain HTTP, as each server does it:
        MLflow (`runtime: mlflow`): `serve-mlflow`'s loopback health port, MLFLOW_HEALTH_PORT; another
        mTLS server: `serve --app`'s loopback port, HOKUSAI_MTLS_HEALTH_PORT, else its port
        (HOKUSAI_MTLS_PORT, else the declared one) + 1; a proxied service (the API): its own port,
        plain HTTP already (the stacks check the API there).

        Keys: `service`, `serves` (`mtls`, `proxied` or None), and, for a service that serves,
        `host`, `port`, `path`, `scheme`, `url`, `command` (the ECS `CMD` list),
        `interval_seconds`, `timeout_seconds`, `retries`, `start_period_seconds`. A service that
        serves nothing (a worker) has no health port and gets only `service` and `serves` (None):
        ECS runs no health check for it.
        """
        declaration = self._declaration
        config: dict = {"service": declaration.name, "serves": declaration.serves}
        if declaration.serves is None or declaration.port is None:
            return config
        if declaration.runtime == RUNTIME_MLFLOW:
            port = names.MLFLOW_HEALTH_PORT
        elif declaration.serves == SERVES_MTLS:
            served = env_numbers.whole(
                self._environ, names.ENV_PORT, default=declaration.port, low=1, high=65535, what="a port"
            )
            port = env_numbers.whole(
                self._environ, names.ENV_HEALTH_PORT, default=served + 1, low=1, high=65535, what="a port"
            )
        else:  # proxied: plain HTTP on its own port already
            port = declaration.port
        return {
            **config,
            "host": HEALTH_HOST,
            "port": port,
            "path": HEALTH_PATH,
            "scheme": HEALTH_SCHEME,
            "url": f"{HEALTH_SCHEME}://{HEALTH_HOST}:{port}{HEALTH_PATH}",
            "command": ["CMD", "hokusai-mtls", "health", "--port", str(port)],
            "interval_seconds": HEALTH_INTERVAL_SECONDS,
            "timeout_seconds": HEALTH_TIMEOUT_SECONDS,
            "retries": HEALTH_RETRIES,
            "start_period_seconds": HEALTH_START_PERIOD_SECONDS,
        }

    # --- the files --------------------------------------------------------------------------------
    def _verify_files(self) -> None:
        """Read the set the loader published and verify it for this identity (blocking; any error names the file)."""
        directory = self.certificate_dir
        wanted = [names.CA_BUNDLE_FILE, names.CERT_FILE, names.KEY_FILE]
        if self._identity.calls:  # the combined PEM the adaptive client presents
            wanted.append(names.COMBINED_PEM_FILE)
        missing = [name for name in wanted if not (directory / name).is_file()]
        if missing:
            raise CertificateSetError(f"{directory} lacks {', '.join(missing)}")
        bundle_file, certificate_file = directory / names.CA_BUNDLE_FILE, directory / names.CERT_FILE
        bundle: list[x509.Certificate] = pem.load_certificates(bundle_file.read_bytes(), str(bundle_file))
        tls = TLSIdentity.from_pem(
            certificate_file.read_bytes(), (directory / names.KEY_FILE).read_bytes(), str(certificate_file)
        )
        verify_for(self._identity, tls, bundle, self.environment)
