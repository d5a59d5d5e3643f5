"""What `mlflow server` sets up before it starts uvicorn, done for serve-mlflow's own listeners.

serve-mlflow serves MLflow's FastAPI app itself (runtime/services/mlflow_server.py), so it must repeat
what `mlflow server` (MLflow 3.17: `mlflow/cli/__init__.py` `server`, and `_run_server` in
`mlflow/server/__init__.py`) does; a step left out fails only for the feature that needs it:

- MLflow's DNS-rebinding guard reads `MLFLOW_SERVER_ALLOWED_HOSTS` when its apps are built,
  which is when `mlflow.server` (the Flask app) and `mlflow.server.fastapi_app` are first
  IMPORTED. Importing anything under `mlflow.server` (even `mlflow.server.constants`) builds the
  Flask app, so the allowed hosts are set before the first such import, and `configure()`
  refuses to run after one (the guard would silently keep MLflow's localhost-only default and
  answer 403 to the Cloud Map name every client dials).
- The store variables, a boot id, `_MLFLOW_IN_JOB_EXECUTOR=false`, the secrets-cache settings
  (the CLI's defaults) and `MLFLOW_ENABLE_WORKSPACES`, as `mlflow server` exports them.
- Job execution (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION`, on by default): a huey storage directory
  shared by the request handlers and MLflow's job runner, and the runner itself, a child process
  that watches our pid and starts one huey consumer per job type. Without them
  `POST /ajax-api/3.0/jobs/` answers 500 (`KeyError: '_MLFLOW_HUEY_STORAGE_PATH'`).

One deliberate difference: `mlflow server` gives jobs `MLFLOW_TRACKING_URI=http://host:port`,
its own plain port. Ours requires a client certificate the server process does not have, so
jobs get the backend store URI (jobs read and write through MLflow's server-side store anyway);
a job that needs the server over HTTP (the AI gateway) needs `MLFLOW_GATEWAY_URI` set by the
operator.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

from runtime import names

log = logging.getLogger("hokusai_mtls")

ARTIFACT_ROOT_ENV_VAR = "_MLFLOW_SERVER_ARTIFACT_ROOT"
"""`mlflow.server.constants.ARTIFACT_ROOT_ENV_VAR`, named here: importing that module builds MLflow's app."""
SECRETS_CACHE_TTL_SECONDS = "60"
"""`mlflow server --secrets-cache-ttl` default."""
SECRETS_CACHE_MAX_SIZE = "1000"
"""`mlflow server --secrets-cache-max-size` default."""


def allowed_hosts(
    environment: str, environ: Mapping[str, str] = os.environ, extra: Iterable[str] = ()
) -> list[str]:
    """Host headers MLflow serves: the Cloud Map name (any port), the loopback names, `extra`
    (the names in our certificate) and whatever the operator set in MLFLOW_SERVER_ALLOWED_HOSTS."""
    cloud_map = names.mlflow_hostname(environment)
    ours = [cloud_map, f"{cloud_map}:*", "localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*"]
    for host in extra:
        ours += [host, f"{host}:*"]
    operator = [h.strip() for h in environ.get(names.ENV_MLFLOW_ALLOWED_HOSTS, "").split(",") if h.strip()]
    return list(dict.fromkeys([*ours, *operator]))


def job_execution_enabled(environ: Mapping[str, str]) -> bool:
    """MLflow's own parsing of MLFLOW_SERVER_ENABLE_JOB_EXECUTION (default true)."""
    return environ.get(names.ENV_MLFLOW_JOB_EXECUTION, "true").strip().lower() in ("true", "1")


def configure(
    *,
    environment: str,
    backend_store_uri: str,
    artifacts_destination: str | None,
    certificate_hosts: Iterable[str] = (),
    environ: MutableMapping[str, str] = os.environ,
) -> str:
    """Set MLflow's server variables in `environ` as `mlflow server` does; return the artifact root.

    Must run before anything imports `mlflow.server` (see the module docstring).
    """
    if "mlflow.server" in sys.modules:
        raise RuntimeError(
            "mlflow.server was imported before serve-mlflow configured it: MLflow's host check "
            f"would not see {names.ENV_MLFLOW_ALLOWED_HOSTS}"
        )
    environ[names.ENV_MLFLOW_ALLOWED_HOSTS] = ",".join(allowed_hosts(environment, environ, certificate_hosts))

    from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
    from mlflow.server import constants  # builds MLflow's Flask app: after the allowed hosts
    from mlflow.utils.server_cli_utils import assert_server_workspace_env_unset, resolve_default_artifact_root

    assert_server_workspace_env_unset()
    serve_artifacts = artifacts_destination is not None
    artifact_root = resolve_default_artifact_root(
        # MLflow types it str and treats None and "" alike (both: its default root)
        serve_artifacts,
        environ.get("MLFLOW_DEFAULT_ARTIFACT_ROOT") or "",
        backend_store_uri,
    )
    values = {
        constants.BACKEND_STORE_URI_ENV_VAR: backend_store_uri,
        constants.REGISTRY_STORE_URI_ENV_VAR: environ.get("MLFLOW_REGISTRY_STORE_URI") or backend_store_uri,
        constants.ARTIFACT_ROOT_ENV_VAR: artifact_root,
        constants.SECRETS_CACHE_TTL_ENV_VAR: SECRETS_CACHE_TTL_SECONDS,
        constants.SECRETS_CACHE_MAX_SIZE_ENV_VAR: SECRETS_CACHE_MAX_SIZE,
        "_MLFLOW_SERVER_BOOT_ID": uuid.uuid4().hex,
        "_MLFLOW_IN_JOB_EXECUTOR": "false",
        "_MLFLOW_SGI_NAME": "uvicorn",
        MLFLOW_ENABLE_WORKSPACES.name: "false",
    }
    if artifacts_destination is not None:  # serve_artifacts
        values[constants.SERVE_ARTIFACTS_ENV_VAR] = "true"
        values[constants.ARTIFACTS_DESTINATION_ENV_VAR] = artifacts_destination
    if replica := environ.get("MLFLOW_READ_REPLICA_BACKEND_STORE_URI"):
        values[constants.READ_REPLICA_BACKEND_STORE_URI_ENV_VAR] = replica
    environ.update(values)
    return artifact_root


def initialize_stores(backend_store_uri: str, artifact_root: str, environ: Mapping[str, str] = os.environ):
    """Create or migrate the backend store (MLflow's alembic migrations) before serving."""
    from mlflow.server.handlers import initialize_backend_stores

    initialize_backend_stores(
        backend_store_uri,
        environ.get("MLFLOW_REGISTRY_STORE_URI") or backend_store_uri,
        artifact_root,
        read_replica_backend_store_uri=environ.get("MLFLOW_READ_REPLICA_BACKEND_STORE_URI") or None,
    )


class JobRunner:
    """MLflow's job runner as `mlflow server` starts it, owned by this process and stopped with it."""

    def __init__(self, backend_store_uri: str, artifact_root: str, environ: MutableMapping[str, str]) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifact_root = artifact_root
        self.environ = environ
        self.storage: Path | None = None
        self.process: subprocess.Popen | None = None

    def prepare(self) -> bool:
        """MLflow's checks and the huey storage path; False (logged) when jobs cannot run here."""
        from mlflow.environment_variables import MLFLOW_SQL_TRACE_ROLLUPS_ENABLED
        from mlflow.server.constants import HUEY_STORAGE_PATH_ENV_VAR
        from mlflow.server.jobs.executor_registry import validate_executor_config
        from mlflow.server.jobs.utils import _check_requirements, get_job_execution_engine
        from mlflow.tracing.trace_rollup_service import validate_sql_trace_rollup_startup

        validate_sql_trace_rollup_startup(self.backend_store_uri)
        if not job_execution_enabled(self.environ):
            log.info("%s=false: MLflow's jobs API refuses submissions", names.ENV_MLFLOW_JOB_EXECUTION)
            return False
        try:
            _check_requirements(self.backend_store_uri)
        except Exception as exc:  # MLflow's own wording: it starts without job execution
            if MLFLOW_SQL_TRACE_ROLLUPS_ENABLED.get():
                raise
            log.warning("MLflow job execution requirements not met (%s): serving without it", exc)
            return False
        validate_executor_config()
        get_job_execution_engine()
        self.storage = _storage_directory()
        self.environ[HUEY_STORAGE_PATH_ENV_VAR] = str(self.storage)
        return True

    def start(self) -> None:
        """Start the runner (after `prepare()` returned True); it exits when this process does.

        MLflow's `_launch_job_runner`, with one change: the runner leads its own process group,
        so `stop()` ends it and the huey consumers it starts in one signal.
        """
        from mlflow.server.constants import MLFLOW_SERVER_UP_TIME
        from mlflow.server.jobs.utils import get_job_execution_engine

        module = "_executor_runner" if get_job_execution_engine() == "executor" else "_job_runner"
        env = {
            **self.environ,
            "MLFLOW_BACKEND_STORE_URI": self.backend_store_uri,
            "MLFLOW_TRACKING_URI": self.backend_store_uri,
            "MLFLOW_DEFAULT_ARTIFACT_ROOT": self.artifact_root,
            "MLFLOW_SERVER_PID": str(os.getpid()),
            MLFLOW_SERVER_UP_TIME: str(int(time.time() * 1000)),
        }
        self.process = subprocess.Popen(  # noqa: S603 - this interpreter, MLflow's module
            [sys.executable, "-m", f"mlflow.server.jobs.{module}"], env=env, start_new_session=True
        )
        log.info("MLflow job runner started (pid %s)", self.process.pid)

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM to the runner's group; whatever of it is left after `timeout` gets SIGKILL
        (the queue is in the database: MLflow's runner queues a job cut short again on the next start)."""
        if self.process is not None:
            _signal_group(self.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _group_alive(self.process.pid) and time.monotonic() < deadline:
                self.process.poll()  # reap the runner, so only its consumers keep the group alive
                time.sleep(0.1)
            if _group_alive(self.process.pid):
                _signal_group(self.process.pid, signal.SIGKILL)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("MLflow job runner (pid %s) did not exit", self.process.pid)
        self.process = None
        if self.storage is not None:
            shutil.rmtree(self.storage, ignore_errors=True)
            self.storage = None


def _storage_directory() -> Path:
    """In memory (/dev/shm) when possible, as `mlflow server` does; else the temporary directory."""
    try:
        return Path(tempfile.mkdtemp(prefix="mlflow-huey-", dir="/dev/shm"))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="mlflow-huey-"))


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
