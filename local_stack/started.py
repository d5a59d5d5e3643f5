"""What `make local` started: its run directory and the `Stack` of processes, ports and URLs.

Apart from `local_stack.up` (which starts it) so that `local_stack.commands` (the examples and
the summary it prints) can use it without importing `up` back.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from local_stack.environment import BIN, LOCAL_ENVIRONMENT, REPO
from local_stack.environment import service_environment as _service_environment
from local_stack.postgres_server import PostgresCluster, redact
from local_stack.stack import Child, StateFile, Supervisor, remove_tree
from runtime import names
from runtime.service_catalog import DEFAULT_CATALOG, parse_catalog

ENVIRONMENT = LOCAL_ENVIRONMENT
KEY_DATABASE = "api_keys"
"""The API-key store's database in the PostgreSQL cluster MLflow uses (MLflow's is `mlflow`)."""
KEY_USER = "local-user"
"""The owner of the keys `up` creates and prints the command for."""
KEY_NAME = "make local"
INTERNAL_CIDRS = "10.0.0.0/8"
STREAMING_SERVICE = "streaming"
LOCAL_CATALOG = parse_catalog(
    {
        **{service.name: service.as_document() for service in DEFAULT_CATALOG.services},
        STREAMING_SERVICE: {"serves": "mtls", "port": 8443, "callers": [names.WORKER_SERVICE]},
    }
)
"""Our three plus a declared streaming server the worker may call: services are data here too
(HOKUSAI_MTLS_SERVICES in every process of the stack, as the stacks set it in ECS)."""
"""A stand-in VPC. Not 127.0.0.0/8: on loopback the demo's own curl would count as an internal
caller without a certificate, and the middleware logs a warning for each of those."""


@dataclass(frozen=True)
class RunDir:
    """The run directory (`.local/` by default, git-ignored), 0700: it holds private keys.

    state.json  the supervisor and every process it started (`down` reads it)
    keys.env    the API-key store's URL and hashing secret, 0600, for `hokusai-mtls auth ...`
                (kept with --keep-data, so the kept store's keys still check out)
    logs/       one log per process, kept after a stop
    certs/      issued/ (the set, with the CA key), server/, api/, worker/ (what each loader wrote)
    data/       MLflow's database (sqlite, or PostgreSQL's cluster) and artifacts, the key store when
                it is sqlite (kept with --keep-data)
    scratch/    the loaders' development-CA directory (unused while Secrets Manager answers)
    """

    root: Path

    @property
    def state(self) -> StateFile:
        return StateFile(self.root / "state.json")

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def keys_env(self) -> Path:
        return self.root / "keys.env"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def postgres(self) -> Path:
        """PostgreSQL's cluster directory: data/postgres, except as root. PostgreSQL then runs as
        the `postgres` user, who cannot enter this 0700 directory of root's (it holds private keys),
        so the cluster lives in /var/tmp, named after this run directory."""
        if os.geteuid() != 0:
            return self.data / "postgres"
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path("/var/tmp") / f"hokusai-mtls-local-postgres-{digest}"  # noqa: S108 - see above

    def prepare(self, keep_data: bool) -> None:
        """Start afresh: a new certificate set and empty logs each run; MLflow's data if asked."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.clean(keep_data)
        remove_tree(self.logs)
        for directory in (self.logs, self.certs, self.data, self.scratch):
            directory.mkdir(mode=0o700, exist_ok=True)

    def clean(self, keep_data: bool) -> None:
        """After a stop: no state, no private keys; the logs stay for a look afterwards."""
        self.state.remove()
        remove_tree(self.certs)
        remove_tree(self.scratch)
        if not keep_data:
            self.keys_env.unlink(missing_ok=True)
            remove_tree(self.data)
            remove_tree(self.postgres)


@dataclass
class Stack:
    """What `up` started, and what the summary and the tests need to know about it."""

    run: RunDir
    supervisor: Supervisor
    ports: dict[str, int] = field(default_factory=dict)
    health: dict[str, dict] = field(default_factory=dict)
    worker: dict = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)
    postgres: PostgresCluster | None = None
    """MLflow's backend store and the key store's when PostgreSQL is installed; None: sqlite in data/."""
    key_store_url: str = ""
    """HOKUSAI_MTLS_KEY_STORE_URL: database `api_keys` in PostgreSQL (it holds the password), else sqlite."""
    key_hash_secret: str = field(default="", repr=False)
    """HOKUSAI_MTLS_KEY_HASH_SECRET: only in the API's and the CLI's environment, and keys.env (0600)."""
    api_key: dict = field(default_factory=dict, repr=False)
    """What `hokusai-mtls auth create-key --json` answered for the key `up` created (the key included)."""

    @property
    def secrets_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['secrets-manager']}"

    @property
    def mlflow_url(self) -> str:
        """What the API and the worker dial here: 127.0.0.1 (no name resolution to map on the loopback)."""
        return f"https://127.0.0.1:{self.ports['mlflow']}"

    @property
    def mlflow_name(self) -> str:
        """MLflow's Cloud Map name, the one every client dials in ECS."""
        return names.mlflow_hostname(ENVIRONMENT)

    @property
    def mlflow_name_url(self) -> str:
        return f"https://{self.mlflow_name}:{self.ports['mlflow']}"

    @property
    def backend_store_uri(self) -> str:
        """MLFLOW_BACKEND_STORE_URI: PostgreSQL's URL (it holds the password), else sqlite."""
        if self.postgres is not None:
            return self.postgres.url()
        return f"sqlite:///{self.run.data / 'mlflow.db'}"

    @property
    def backend_store_shown(self) -> str:
        """The backend store without its password, for output and the state file."""
        if self.postgres is None:
            return self.backend_store_uri
        return redact(self.backend_store_uri, self.postgres.password)

    @property
    def streaming_url(self) -> str:
        """The streaming server's WebSockets (wss: mTLS), dialed on 127.0.0.1 here."""
        return f"wss://127.0.0.1:{self.ports['streaming']}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def key_store_shown(self) -> str:
        """The key store's URL without its password, for output and the state file."""
        if self.postgres is None:
            return self.key_store_url
        return redact(self.key_store_url, self.postgres.password)

    def key_store_environment(self) -> dict[str, str]:
        """What a process that uses the key store needs (the API, `hokusai-mtls auth ...`)."""
        return {names.ENV_KEY_STORE_URL: self.key_store_url, names.ENV_KEY_HASH_SECRET: self.key_hash_secret}

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0"

    def cert_dir(self, identity: names.Identity) -> Path:
        return self.run.certs / identity.name

    def environment(self, **extra: str) -> dict[str, str]:
        """The task environment of every service here (the venv's executables first on PATH)."""
        base = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
        return _service_environment(
            ENVIRONMENT,
            self.secrets_url,
            base=base,
            **{
                names.ENV_DEV_CA_DIR: str(self.run.scratch / "dev-ca"),
                names.ENV_INTERNAL_CIDRS: INTERNAL_CIDRS,
                names.ENV_REDIS_URL: self.redis_url,
                names.ENV_SERVICES: LOCAL_CATALOG.to_json(),
                **extra,
            },
        )

    def spawn(self, name: str, argv: list[str], *, long_running: bool = True, **env: str) -> Child:
        child = self.supervisor.spawn(
            name,
            argv,
            env=self.environment(**env),
            log=self.run.logs / f"{name}.log",
            cwd=REPO,
            long_running=long_running,
        )
        self.children[name] = child
        return child

    def details(self) -> dict:
        """What the state file records besides the processes (for `down`, the tests, a curious user)."""
        return {
            "run_dir": str(self.run.root),
            "environment": ENVIRONMENT,
            "urls": {
                "secrets-manager": self.secrets_url,
                "redis": self.redis_url,
                "mlflow": self.mlflow_url,
                "mlflow-cloud-map": self.mlflow_name_url,
                "mlflow-backend-store": self.backend_store_shown,
                "mlflow-health": f"http://127.0.0.1:{self.ports['mlflow-health']}/health",
                "api": self.api_url,
                "streaming": self.streaming_url,
                "key-store": self.key_store_shown,
            },
            "cert_dirs": {i.name: str(self.cert_dir(i)) for i in LOCAL_CATALOG.identities},
            "postgres_dir": str(self.postgres.directory) if self.postgres is not None else None,
            "health": self.health,
            "worker": self.worker,
            "api_key": {k: self.api_key.get(k) for k in ("id", "key_prefix", "user_id", "name")},
        }
