"""The staging deployment as ECS runs it, on one machine: every service on its own address.

What runs where (each in its own network namespace, tests/support/netns.py; addresses in a
random 10.231.X.0/24 that stands for the VPC):

| role       | host | what runs there |
|------------|------|-----------------|
| `aws`      | .10  | moto's server (`python -m moto.server`): Secrets Manager AND S3 |
| `db`       | .11  | PostgreSQL 15 (initdb + pg_ctl, password auth): MLflow's backend store, migrated by MLflow |
| `mlflow`   | .12  | `hokusai-mtls serve-mlflow`, the MLflow image's command, strict mTLS on 5000, artifacts in `s3://BUCKET/PREFIX` |
| `api`      | .13  | `hokusai-mtls serve-api` on 8000, dialing MLflow by its Cloud Map name; its key store is database `api_keys` on `db` |
| `auth`     | .14  | the external auth service's test double (in-process, `FakeAuthService`) |
| `worker`   | .15  | where the worker's MLflow client runs (`docker/entrypoint.sh`, certificates from Secrets Manager) |
| `alb`      | .20  | the ALB stand-in (nginx, tests/support/alb.py) in front of the API, HTTPS on 443 |
| `rogue`    | .21  | NOT the ALB, but inside `trustedProxyCidrs` (.16/28) like it: a compromised or misplaced host |
| `attacker` | .50  | an untrusted host in the VPC with no certificate of its own |

Every namespace resolves `mlflow.hokusai-staging.local` to .12 and `api.hokusai-staging.test`
(the ALB's name) to .20; the test process reaches them all through the bridge (.1).

The API runs as the product is deployed now: with OUR key store (`HOKUSAI_MTLS_KEY_STORE_URL`, the
database `api_keys` on the same PostgreSQL as MLflow's, and `HOKUSAI_MTLS_KEY_HASH_SECRET`, random
per run) AND `AUTH_SERVICE_URL` (the double): migration mode (`runtime.auth.key_backend`), so keys
in our format are judged by our store, every other key (`active_key`, the double's) by the double.
serve-api migrates the store at start; once it is healthy, `store` (a `KeyStore` opened as the
`hokusai-mtls auth` commands open it, from the test process) makes `admin_key` (`keys:admin`), and
`make_key(...)` makes a user's key.

Everything the tests need to reach or reuse is an attribute or helper of `DeployedEnvironment`,
so other suites (the adversarial tests) build on the same fixture: the namespaces and
addresses, the service URLs, the certificate set and its CA (`issue_client`), the API keys,
the servers' logs, and helpers to run a Python snippet, MLflow's client, the worker's
entrypoint or curl in any namespace with given certificate files.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import boto3

from local_stack.auth_service import ACTIVE_KEY, EXAMPLE_KEYS, FakeAuthService
from local_stack.environment import BIN, DOCKER, DUMMY_AWS, REPO, container_command, service_environment
from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.certificates.identity import TLSIdentity
from runtime.keys.opening import open_store
from runtime.keys.permissions import ADMIN_SCOPE
from runtime.keys.store import CreatedKey, KeyStore
from runtime.secrets.secret_store import SecretStore
from tests.support.alb import AlbStandIn, find_nginx
from tests.support.netns import Namespace, Network, require_netns
from tests.support.postgres import PostgresServer, find_binaries, redact

ENV = "staging"
HOSTS = {"aws": 10, "db": 11, "mlflow": 12, "api": 13, "auth": 14, "worker": 15, "alb": 20, "rogue": 21}
HOSTS["attacker"] = 50
TRUSTED_PROXY_HOSTS = (16, 28)
"""trustedProxyCidrs = .16/28: holds the ALB (.20) and the rogue host (.21), nobody else."""
ALB_NAME = f"api.hokusai-{ENV}.test"
MLFLOW_NAME = names.mlflow_hostname(ENV)
BUCKET = "hokusai-mlflow-artifacts"
ARTIFACT_PREFIX = f"{ENV}/mlflow"
MOTO_PORT, POSTGRES_PORT, AUTH_PORT = 5000, 5432, 8081
KEY_STORE_DATABASE = "api_keys"
"""The API's key store: its own database on MLflow's PostgreSQL server (`db`)."""
ADMIN_USER = "ops"
KEY_ACTOR = "test:deployed"
"""How the store's audit names the keys the harness makes (`admin_key`, `make_key`)."""
SCOPES = {
    "api": ["mlflow:read", "mlflow:write"],
    "worker": ["mlflow:read", "mlflow:write"],
    "reporter": ["mlflow:read"],
}
"""HOKUSAI_MTLS_SERVICE_SCOPES of mlflow and api: `reporter` is a read-only identity of the same CA."""
STOP_ORDER = ("api", "mlflow", "moto")
CLIENT_TIMEOUT = "20"
"""MLFLOW_HTTP_REQUEST_TIMEOUT for MLflow's client (retries are off: a failure shows at once)."""


@dataclass(frozen=True)
class CertFiles:
    """One identity's files as the loader writes them (`ca.crt`, `tls.crt`, `tls.key`, `tls.pem`)."""

    directory: Path
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    pem: Path | None = None

    def mlflow_env(self) -> dict[str, str]:
        """The only two TLS variables MLflow's client knows (no certificate: only the CA)."""
        env = {names.ENV_MLFLOW_SERVER_CERT: str(self.ca)}
        if self.pem is not None:
            env[names.ENV_MLFLOW_CLIENT_CERT] = str(self.pem)
        return env

    def curl_args(self) -> list[str]:
        args = ["--cacert", str(self.ca)]
        if self.cert is not None:
            args += ["--cert", str(self.cert), "--key", str(self.key)]
        return args


@dataclass
class Ran:
    """A finished command: returncode, stdout, stderr; `.json()` parses the last stdout line."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        if self.returncode != 0:
            raise AssertionError(f"{self.argv[-1][:80]!r} exited {self.returncode}:\n{self.stderr[-4000:]}")
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        if not lines:
            raise AssertionError(f"no output; stderr:\n{self.stderr[-4000:]}")
        return json.loads(lines[-1])


@dataclass
class DeployedEnvironment:
    root: Path
    network: Network = field(default_factory=lambda: Network(hosts={MLFLOW_NAME: "mlflow", ALB_NAME: "alb"}))
    certificates: CertificateSet | None = None
    api_keys: dict = field(default_factory=lambda: dict(EXAMPLE_KEYS))
    active_key: str = ACTIVE_KEY
    auth_service: FakeAuthService | None = None
    postgres: PostgresServer | None = None
    alb: AlbStandIn | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    scopes: dict = field(default_factory=lambda: dict(SCOPES))
    key_hash_secret: str = field(
        default_factory=lambda: base64.b64encode(secrets.token_bytes(32)).decode(), repr=False
    )
    """HOKUSAI_MTLS_KEY_HASH_SECRET of the API (base64 of 32 random bytes, new each run)."""
    store: KeyStore | None = None
    """The API's key store, opened from the test process once serve-api has migrated it."""
    admin_key: str | None = field(default=None, repr=False)
    """A key of ours with `keys:admin` (user `ops`), made in the store at start."""

    # --- where things are -------------------------------------------------------------------
    def __getitem__(self, role: str) -> Namespace:
        return self.network[role]

    def address(self, role: str) -> str:
        return self.network[role].address

    @property
    def vpc_cidr(self) -> str:
        return str(self.network.subnet)

    @property
    def trusted_proxy_cidr(self) -> str:
        host, prefix = TRUSTED_PROXY_HOSTS
        return str(ipaddress.ip_network(f"{self.network.address(host)}/{prefix}", strict=False))

    @property
    def aws_endpoint(self) -> str:
        return f"http://{self.address('aws')}:{MOTO_PORT}"

    @property
    def mlflow_url(self) -> str:
        """What every client dials: the Cloud Map name (resolves only inside the namespaces)."""
        return f"https://{MLFLOW_NAME}:{names.MLFLOW_PORT}"

    @property
    def api_url(self) -> str:
        """The API task's own port, behind the ALB (reachable from inside the VPC)."""
        return f"http://{self.address('api')}:{names.API_PORT}"

    @property
    def alb_url(self) -> str:
        """What external clients dial: the ALB's name (resolves only inside the namespaces)."""
        return self.alb.url

    @property
    def auth_url(self) -> str:
        return f"http://{self.address('auth')}:{AUTH_PORT}"

    @property
    def key_store_url(self) -> str:
        """The API's HOKUSAI_MTLS_KEY_STORE_URL (it holds the database password)."""
        return self.postgres.url(KEY_STORE_DATABASE)

    def key_store_env(self) -> dict[str, str]:
        """What opens the key store (the API's settings for it; also what `hokusai-mtls auth` reads)."""
        return {
            names.ENV_KEY_STORE_URL: self.key_store_url,
            names.ENV_KEY_HASH_SECRET: self.key_hash_secret,
            names.ENV_ENVIRONMENT: ENV,
        }

    def make_key(self, user_id: str, name: str = "deployed test", **options) -> CreatedKey:
        """A new key of ours for `user_id`, made in the store (options: scopes, expires_at,
        rate_limit_per_hour, allowed_ips); `.key` is the key, `.record` its record."""
        return self.store.create(user_id, name, actor=KEY_ACTOR, **options)

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{BUCKET}/{ARTIFACT_PREFIX}"

    def log(self, service: str) -> Path:
        """The combined stdout/stderr of `mlflow`, `api` or `moto` (what CloudWatch would hold)."""
        return self.root / "logs" / f"{service}.log"

    @property
    def mlflow_log(self) -> Path:
        return self.log("mlflow")

    @property
    def api_log(self) -> Path:
        return self.log("api")

    # --- certificates -----------------------------------------------------------------------
    def issue_client(self, service: str, **options) -> TLSIdentity:
        """A client certificate for `service` from the environment's CA (e.g. `reporter`)."""
        return self.certificates.ca.issue_client(ENV, service, **options)

    def client_files(self, identity: str | TLSIdentity | None, label: str | None = None) -> CertFiles:
        """Write an identity's files (a name in the set, a TLSIdentity, or None: only the CA)."""
        if isinstance(identity, str):
            label = label or identity
            identity = self.certificates.identities.get(identity) or self.issue_client(identity)
        directory = (
            self.root / "clients" / (label or ("ca-only" if identity is None else f"id-{time.time_ns()}"))
        )
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        ca = directory / names.CA_BUNDLE_FILE
        ca.write_bytes(pem.bundle_pem(self.certificates.trust_bundle))
        if identity is None:
            return CertFiles(directory, ca)
        cert, key, combined = (
            directory / n for n in (names.CERT_FILE, names.KEY_FILE, names.COMBINED_PEM_FILE)
        )
        cert.write_bytes(identity.certificate_pem())
        for path, data in ((key, identity.private_key_pem()), (combined, identity.combined_pem())):
            path.touch(mode=0o600)
            path.write_bytes(data)
        return CertFiles(directory, ca, cert, key, combined)

    # --- running things in a namespace ---------------------------------------------------------
    def base_env(self, **extra: str) -> dict[str, str]:
        """A task's environment: dummy AWS credentials, moto's endpoints, the venv first on PATH."""
        env = service_environment(ENV, self.aws_endpoint, base=os.environ)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["HOME"] = str(self.root / "home")
        return {**env, **extra}

    def run(self, role: str, argv: list[str], *, env: dict | None = None, timeout: float = 120) -> Ran:
        result = self[role].run(argv, env=env or self.base_env(), timeout=timeout, cwd=self.root)
        return Ran([str(a) for a in argv], result.returncode, result.stdout, result.stderr)

    def python(self, role: str, code: str, *, env: dict | None = None, timeout: float = 120) -> Ran:
        """`python -c code` in `role`'s namespace (its hosts file maps the Cloud Map name)."""
        return self.run(role, [sys.executable, "-c", code], env=env, timeout=timeout)

    def mlflow_env(self, files: CertFiles | None, **extra: str) -> dict[str, str]:
        """MLflow's client pointed at the Cloud Map name with `files`, retries off, short timeout."""
        return self.base_env(
            MLFLOW_TRACKING_URI=self.mlflow_url,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
            MLFLOW_HTTP_REQUEST_TIMEOUT=CLIENT_TIMEOUT,
            **(files.mlflow_env() if files is not None else {}),
            **extra,
        )

    def mlflow_client(
        self, role: str, code: str, files: CertFiles | None, *, timeout: float = 180, **extra
    ) -> Ran:
        """MLflow's own client running `code` in `role`'s namespace with `files`' certificate."""
        return self.python(role, code, env=self.mlflow_env(files, **extra), timeout=timeout)

    def worker(self, code: str, *, timeout: float = 180, **extra: str) -> Ran:
        """`code` as the worker image runs its command: docker/entrypoint.sh loads the worker's
        identity from Secrets Manager (moto), writes the files and exports MLflow's variables."""
        env = self.base_env(
            **{
                names.ENV_ROLE: names.WORKER.role,
                names.ENV_CERT_DIR: str(self.root / "worker-certs" / str(time.time_ns())),
                "MLFLOW_TRACKING_URI": self.mlflow_url,
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": CLIENT_TIMEOUT,
            },
            **extra,
        )
        return self.run(
            "worker", [str(DOCKER / "entrypoint.sh"), "python", "-c", code], env=env, timeout=timeout
        )

    def curl(self, role: str, args: list[str], files: CertFiles | None = None, *, timeout: float = 60) -> Ran:
        """curl in `role`'s namespace (`-sS`, 30 s max), optionally with a certificate's files."""
        argv = ["curl", "-sS", "--max-time", "30", *(files.curl_args() if files else []), *args]
        return self.run(role, argv, timeout=timeout)

    def s3_keys(self, prefix: str = ARTIFACT_PREFIX) -> list[str]:
        """Object keys under `prefix` in moto's artifact bucket (read from the test process)."""
        s3 = boto3.client("s3", endpoint_url=self.aws_endpoint, **_boto_credentials())
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def mlflow_health(self) -> dict:
        """MLflow's loopback health port, read from inside its namespace (as the ECS check does)."""
        return self["mlflow"].call(
            _get_json, f"http://127.0.0.1:{names.MLFLOW_HEALTH_PORT}/health", timeout=10
        )

    # --- start and stop -----------------------------------------------------------------------
    def start(self) -> DeployedEnvironment:
        began = time.monotonic()
        require_netns()
        find_binaries(), find_nginx()  # every missing prerequisite named before anything starts
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        (self.root / "home").mkdir(exist_ok=True)
        with self._stage("network"):
            self.network.open(HOSTS)
        postgres = threading.Thread(target=self._start_postgres, name="postgres", daemon=True)
        postgres.start()
        with self._stage("moto"):
            self._start_moto()
        with self._stage("certificates and secrets"):
            self._store_secrets()
        with self._stage("auth double"):
            self.auth_service = FakeAuthService(keys=self.api_keys)
            self["auth"].call(self.auth_service.start, self.address("auth"), AUTH_PORT)
        with self._stage("postgresql"):
            postgres.join(120)
            if self.postgres is None:
                raise RuntimeError(f"PostgreSQL did not start: {self._postgres_error or 'timed out'}")
            self.postgres.create_database(KEY_STORE_DATABASE)
        # Both need the database: MLflow (the longer migration) first, the API beside it.
        self._start("mlflow", container_command("Dockerfile.mlflow"), self._mlflow_env())
        self._start("api", container_command("Dockerfile.api"), self._api_env())
        with self._stage("alb"):
            self.alb = AlbStandIn(
                self["alb"],
                self.root / "alb",
                name=ALB_NAME,
                upstream=f"{self.address('api')}:{names.API_PORT}",
                trust_bundle=self.client_files(None).ca,
            )
            self.alb.start()
        with self._stage("api healthy (key store migrated)"):
            self._wait("api", lambda: _get_json(f"{self.api_url}/health"))
        with self._stage("admin key"):
            self.store = open_store(self.key_store_env())  # refuses a store serve-api did not migrate
            self.admin_key = self.make_key(ADMIN_USER, "deployed admin", scopes=[ADMIN_SCOPE]).key
        with self._stage("mlflow healthy (migrations)"):
            self._wait("mlflow", self.mlflow_health, seconds=240)
        self.timings["total"] = time.monotonic() - began
        return self

    _postgres_error: str = ""

    def _stage(self, name: str):
        environment = self

        class _Timed:
            def __enter__(self):
                self.began = time.monotonic()

            def __exit__(self, *exc):
                environment.timings[name] = time.monotonic() - self.began

        return _Timed()

    def _start_postgres(self) -> None:
        began = time.monotonic()
        server = PostgresServer(self.address("db"), POSTGRES_PORT, wrap=self["db"].argv([]))
        try:
            server.start()
            self.postgres = server
        except Exception as exc:  # reported by start()
            server.stop()
            self._postgres_error = redact(str(exc), server.password)
        self.timings["postgresql (parallel)"] = time.monotonic() - began

    def _start_moto(self) -> None:
        self._start(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", self.address("aws"), "-p", str(MOTO_PORT)],
            {**self.base_env(), **DUMMY_AWS},
        )
        self._wait("moto", lambda: _get_json(f"{self.aws_endpoint}/moto-api/data.json"), seconds=60)
        s3 = boto3.client("s3", endpoint_url=self.aws_endpoint, **_boto_credentials())
        s3.create_bucket(Bucket=BUCKET)

    def _store_secrets(self) -> None:
        self.certificates = CertificateSet.issue(ENV)  # MLflow's leaf names only the Cloud Map name
        client = boto3.client("secretsmanager", endpoint_url=self.aws_endpoint, **_boto_credentials())
        SecretStore(ENV, client=client).upload(self.certificates)

    def _common_service_env(self) -> dict[str, str]:
        return {
            names.ENV_MTLS_MODE: names.MTLS_MODE_STRICT,
            names.ENV_ENABLE_MTLS: "true",
            names.ENV_INTERNAL_CIDRS: self.vpc_cidr,
            names.ENV_TRUSTED_PROXY_CIDRS: self.trusted_proxy_cidr,
            names.ENV_SERVICE_SCOPES: json.dumps(self.scopes),
            names.ENV_AUTH_SERVICE_URL: self.auth_url,
        }

    def _mlflow_env(self) -> dict[str, str]:
        return self.base_env(
            **self._common_service_env(),
            **{
                names.ENV_ROLE: names.SERVER.role,
                names.ENV_CERT_DIR: str(self.root / "mlflow-certs"),
                names.ENV_MLFLOW_BACKEND_STORE_URI: self.postgres.url(),
                names.ENV_MLFLOW_ARTIFACTS_DESTINATION: self.artifacts_destination,
                names.ENV_MLFLOW_S3_ENDPOINT_URL: self.aws_endpoint,
            },
        )

    def _api_env(self) -> dict[str, str]:
        return self.base_env(
            **self._common_service_env(),
            **{
                names.ENV_ROLE: names.API.role,
                names.ENV_CERT_DIR: str(self.root / "api-certs"),
                names.ENV_PROXY_KIND: names.PROXY_KIND_ALB,
                # migration mode: AUTH_SERVICE_URL (the double) stays, from _common_service_env
                **self.key_store_env(),
            },
        )

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        role = {"moto": "aws"}.get(name, name)
        with self.log(name).open("w") as output:
            self.processes[name] = self[role].popen(
                argv, env=env, cwd=self.root, stdout=output, stderr=subprocess.STDOUT
            )

    def _wait(self, name: str, probe, seconds: float = 90):
        process = self.processes[name]
        deadline = time.monotonic() + seconds
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited {process.returncode}:\n{self.log_tail(name)}")
            try:
                return probe()
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{name} not ready in {seconds:.0f} s:\n{self.log_tail(name)}"
                    ) from None
                time.sleep(0.25)

    def log_tail(self, name: str, characters: int = 4000) -> str:
        path = self.log(name)
        text = path.read_text(errors="replace")[-characters:] if path.exists() else "(no log)"
        text = text.replace(self.key_hash_secret, "***")
        return redact(text, self.postgres.password) if self.postgres else text

    def close(self) -> None:
        """Stop everything (SIGTERM, then SIGKILL after 20 s), then remove the network."""
        began = time.monotonic()
        try:
            if self.alb is not None:
                self.alb.stop()
            # Clients before their servers (the API holds pooled connections to MLflow, which a
            # stopping server would wait for), then whatever else started, newest first.
            order = [n for n in STOP_ORDER if n in self.processes]
            order += [n for n in reversed(list(self.processes)) if n not in order]
            for name, process in ((n, self.processes[n]) for n in order):
                with self._stage(f"stop {name}"):
                    if process.poll() is None:
                        process.terminate()
                        try:
                            process.wait(20)
                        except subprocess.TimeoutExpired:
                            process.kill()
                            process.wait(10)
            if self.auth_service is not None:
                self.auth_service.stop()
            if self.store is not None:
                self.store.engine.dispose()
            if self.postgres is not None:
                self.postgres.stop()
        finally:
            self.network.close()
            self.timings["stop (total)"] = time.monotonic() - began


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - test network only
        return json.load(response)


def _boto_credentials() -> dict[str, str]:
    return {
        "region_name": DUMMY_AWS["AWS_REGION"],
        "aws_access_key_id": DUMMY_AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
    }


__all__ = ["ALB_NAME", "ENV", "MLFLOW_NAME", "REPO", "CertFiles", "DeployedEnvironment", "Ran"]
