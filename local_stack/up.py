"""`python -m local_stack up`: the whole system on loopback, started in dependency order.

What starts, and why this way:

1. moto's server as Secrets Manager, redis-server and the auth-service test double start at
   once (nothing depends on them at start); meanwhile `hokusai-mtls certs issue` issues a
   development set (CA, MLflow server, api, worker), and once moto answers,
   `hokusai-mtls certs upload` stores it: the documented workflow, against moto.
   PostgreSQL (Debian's server binaries, when installed) starts as MLflow's backend store, as
   in ECS; without it the store is sqlite, and `up` says so.
2. MLflow (`hokusai-mtls serve-mlflow`, Dockerfile.mlflow's command) in strict mTLS and the
   API (`hokusai-mtls serve-api`, Dockerfile.api's command) start together; each loads its
   own identity from Secrets Manager through the loader, as in ECS. MLflow takes ~10 s.
   Clients in ECS dial MLflow by its Cloud Map name, `mlflow.hokusai-development.local`; on the
   loopback that name resolves nowhere, so the printed curl commands map it with `--resolve`
   (MLflow must answer to it: its host check and its certificate), while the API and the
   worker, which cannot be told such a mapping, dial 127.0.0.1 (also in MLflow's certificate).
3. The worker (`docker/entrypoint.sh python -m local_stack.worker`, the worker image's
   entrypoint) starts with them and waits for MLflow's port, then logs a run over mTLS.
4. Each service's security level comes from its own /health; the certificate serials it
   reports must be the uploaded ones (a development loader would otherwise fall back to a
   local CA and the demonstration would prove nothing). Then the commands to try are run
   once, and shown with what they really printed.

Everything is `ENVIRONMENT=development` (the only environment allowed to degrade; the checks
above make sure nothing did) with `HOKUSAI_MTLS_MODE=strict` for MLflow.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from local_stack import commands
from local_stack.auth_service import VALIDATE_PATH
from local_stack.environment import (
    BIN,
    DOCKER,
    REPO,
    NotHealthy,
    container_command,
    log_tail,
)
from local_stack.environment import wait_healthy as _wait_healthy
from local_stack.ports import free_port
from local_stack.postgres_server import PostgresCluster, PostgresMissing, find_binaries
from local_stack.redis_server import RedisServer
from local_stack.stack import (
    Child,
    Stop,
    Supervisor,
    ignore_signals_while_stopping,
    install_signal_handlers,
    is_alive,
    stop_recorded,
)
from local_stack.started import ENVIRONMENT, RunDir, Stack
from runtime import names
from runtime.certificates.certset import CertificateSet

START_SECONDS = 120.0
"""How long any one service may take to become ready (MLflow needs ~10 s on a quiet machine)."""


class StartError(RuntimeError):
    """The stack could not start; the message says which part and ends with its log."""


class Progress:
    """One line per step with the time since `up` began."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, text: str) -> None:
        print(f"[{self.elapsed:5.1f}s] {text}", flush=True)


# --- waiting --------------------------------------------------------------------------------
def _wait(child: Child, check: Callable[[], object], what: str, seconds: float = START_SECONDS):
    """Poll `check` until it returns something truthy; StartError if `child` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        if child.process is not None and child.process.poll() is not None:
            raise StartError(f"{child.name} exited {child.process.returncode}:\n{log_tail(Path(child.log))}")
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StartError(f"{child.name}: {what} not within {seconds:.0f} s:\n{log_tail(Path(child.log))}")
        time.sleep(0.1)


def _answers_http(url: str) -> Callable[[], bool]:
    """Any HTTP answer (even 404 or 405) means the server is up."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - our own loopback URL
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    return check


def _healthy(child: Child, port: int) -> dict:
    try:
        return _wait_healthy(child.process, port, Path(child.log), seconds=START_SECONDS)
    except NotHealthy as exc:
        raise StartError(f"{child.name}: {exc}") from None


def _cli(stack: Stack, *args: str) -> str:
    """One `hokusai-mtls` command to completion (not supervised: it ends on its own)."""
    argv = [str(BIN / "hokusai-mtls"), *args]
    result = subprocess.run(argv, env=stack.environment(), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise StartError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


# --- the steps ------------------------------------------------------------------------------
def start(stack: Stack, progress: Progress) -> None:
    """Start everything; returns once every service is ready and the worker's run is logged."""
    ports = stack.ports
    ports.update({n: free_port() for n in ("secrets-manager", "redis", "auth-service", "mlflow", "api")})
    ports["mlflow-health"] = free_port()
    stack.supervisor.save(**stack.details())

    moto = stack.spawn(
        "secrets-manager", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["secrets-manager"])]
    )
    redis = RedisServer(stack.run.logs)  # its --dir (no persistence) and its log file
    redis.port = ports["redis"]
    try:
        redis_child = stack.spawn("redis", redis.command())
    except RuntimeError as exc:  # redis-server missing: the apt-get hint
        raise StartError(str(exc)) from None
    auth = stack.spawn(
        "auth-service",
        [
            str(BIN / "python"),
            "-m",
            "local_stack.auth_service",
            "--host",
            "127.0.0.1",
            "--port",
            str(ports["auth-service"]),
        ],
    )
    progress(
        f"starting moto's Secrets Manager, redis-server and the auth-service double (pids {moto.pid}, {redis_child.pid}, {auth.pid})"
    )
    postgres = _start_postgres(stack, progress)

    issued = stack.run.certs / "issued"
    _cli(stack, "certs", "issue", "--env", ENVIRONMENT, "--out", str(issued), "--server-san", "localhost", "--server-san", "127.0.0.1")  # fmt: skip
    progress(
        f"issued the {ENVIRONMENT} set: CA, MLflow server (also localhost, 127.0.0.1), api, worker (hokusai-mtls certs issue)"
    )
    _wait(moto, _answers_http(f"{stack.secrets_url}/moto-api/"), "answering HTTP")
    uploaded = _cli(stack, "certs", "upload", "--env", ENVIRONMENT, "--dir", str(issued), "--no-ca-key")
    progress(
        f"uploaded {len(uploaded.splitlines())} secrets to Secrets Manager (moto, {stack.secrets_url}) under "
        f"{names.secret_prefix(ENVIRONMENT)} (hokusai-mtls certs upload; no service reads the CA key here)"
    )

    if postgres is not None:
        _wait(postgres, stack.postgres.ready, "accepting connections")
        stack.postgres.create_database(exist_ok=True)
        progress(f"PostgreSQL ready: MLflow's backend store is {stack.backend_store_shown}")
    mlflow = stack.spawn(
        "mlflow",
        [*container_command("Dockerfile.mlflow"), "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--health-port", str(ports["mlflow-health"])],
        **{
            names.ENV_MTLS_MODE: names.MTLS_MODE_STRICT,
            names.ENV_ENABLE_MTLS: "true",
            names.ENV_CERT_DIR: str(stack.cert_dir(names.SERVER)),
            names.ENV_MLFLOW_BACKEND_STORE_URI: stack.backend_store_uri,
            names.ENV_MLFLOW_ARTIFACTS_DESTINATION: str(stack.run.data / "artifacts"),
        },
    )  # fmt: skip
    api = stack.spawn(
        "api",
        [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(ports["api"])],
        **{names.ENV_CERT_DIR: str(stack.cert_dir(names.API)), "MLFLOW_TRACKING_URI": stack.mlflow_url},
    )
    worker = stack.spawn(
        "worker",
        ["sh", str(DOCKER / "entrypoint.sh"), "python", "-m", "local_stack.worker"],
        long_running=False,
        **{
            names.ENV_ROLE: names.WORKER.role,
            names.ENV_CERT_DIR: str(stack.cert_dir(names.WORKER)),
            "MLFLOW_TRACKING_URI": stack.mlflow_url,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # a TLS refusal surfaces at once, not after minutes
            "PYTHONPATH": str(REPO),
        },
    )
    progress(
        f"starting MLflow (strict mTLS, pid {mlflow.pid}), the API (pid {api.pid}) and the worker (pid {worker.pid})"
    )

    _wait(redis_child, redis.answers, "answering PING")
    _wait(auth, _answers_http(f"{stack.auth_url}{VALIDATE_PATH}"), "answering HTTP")
    progress(f"redis-server ({stack.redis_url}) and the auth-service double ({stack.auth_url}) ready")
    stack.health["api"] = _healthy(api, ports["api"])
    progress(f"API ready on {stack.api_url} (security level {stack.health['api']['security_level']})")
    stack.health["mlflow"] = _healthy(mlflow, ports["mlflow-health"])
    report = stack.health["mlflow"]
    progress(
        f"MLflow ready on {stack.mlflow_url} (security level {report['security_level']}, mode {report['mode']})"
    )
    stack.worker = _worker_result(worker)
    progress(f"worker logged run {stack.worker['run_id']} over mTLS and exited 0")
    _check_levels(stack, CertificateSet.read_from_dir(issued, ENVIRONMENT))
    stack.supervisor.save(**stack.details())


def _start_postgres(stack: Stack, progress: Progress) -> Child | None:
    """PostgreSQL in the foreground, supervised like every other child; None when not installed."""
    try:
        find_binaries()
    except PostgresMissing as missing:
        progress(f"{missing}: MLflow's backend store is sqlite ({stack.backend_store_uri})")
        return None
    stack.ports["postgres"] = free_port()
    cluster = PostgresCluster(stack.run.postgres, "127.0.0.1", stack.ports["postgres"])
    kept = cluster.initialized()
    try:
        cluster.init()
    except RuntimeError as exc:
        raise StartError(f"postgres: {exc}") from None
    stack.postgres = cluster
    child = stack.spawn("postgres", cluster.server_command())
    progress(
        f"starting PostgreSQL ({'the kept' if kept else 'a new'} cluster in {commands.shown_path(cluster.directory)}, "
        f"pid {child.pid}) as MLflow's backend store, as in ECS"
    )
    return child


def _worker_result(worker: Child) -> dict:
    try:
        code = worker.process.wait(START_SECONDS)
    except subprocess.TimeoutExpired:
        raise StartError(
            f"worker: no run logged within {START_SECONDS:.0f} s:\n{log_tail(Path(worker.log))}"
        ) from None
    lines = Path(worker.log).read_text(errors="replace").strip().splitlines()
    if code != 0 or not lines:
        raise StartError(f"worker exited {code}:\n{log_tail(Path(worker.log))}")
    try:
        return {**json.loads(lines[-1]), "exit_code": code}
    except ValueError:
        raise StartError(
            f"worker: its last line is not its JSON result:\n{log_tail(Path(worker.log))}"
        ) from None


def _check_levels(stack: Stack, issued: CertificateSet) -> None:
    """Every service at MTLS, holding the certificate that was uploaded (not a fallback)."""
    served = {
        "mlflow": (stack.health["mlflow"]["security_level"], stack.health["mlflow"].get("certificate", {}).get("serial"), names.SERVER),
        "api": (stack.health["api"]["security_level"], stack.health["api"].get("certificate", {}).get("serial"), names.API),
        "worker": (stack.worker.get("security_level"), stack.worker.get("serial"), names.WORKER),
    }  # fmt: skip
    for service, (level, serial, identity) in served.items():
        expected = f"{issued.identities[identity.name].certificate.serial_number:x}"
        if level != "MTLS" or serial != expected:
            raise StartError(
                f"{service}: security level {level}, certificate serial {serial}; expected MTLS with the "
                f"uploaded {identity.name} certificate (serial {expected}). See {stack.run.logs / service}.log"
            )
    if stack.health["mlflow"].get("mode") != names.MTLS_MODE_STRICT:
        raise StartError(f"mlflow: mode {stack.health['mlflow'].get('mode')}, expected strict")


# --- up ---------------------------------------------------------------------------------------
def up(root: Path, *, keep_data: bool = False) -> int:
    """Start, print where everything runs and what to try, then wait for Ctrl-C or `down`."""
    run = RunDir(root.resolve())
    previous = run.state.read() if run.state.path.exists() else None
    if previous is not None:
        supervisor = previous.get("supervisor", {})
        if supervisor.get("pid") and is_alive(supervisor["pid"], supervisor.get("marker")):
            print(
                f"a local stack already runs from {run.root} (pid {supervisor['pid']}): "
                f"stop it with Ctrl-C there, or `python -m local_stack down --dir {run.root}`"
            )
            return 1
        print("the previous local stack did not stop cleanly; stopping what it left behind:")
        stop_recorded(run.state, lambda line: print(f"  {line}"))

    progress = Progress()
    run.prepare(keep_data)
    supervisor = Supervisor(run.state, {"keep_data": keep_data})
    stack = Stack(run, supervisor)
    print(
        f"local stack: starting in {commands.shown_path(run.root)} (logs in {commands.shown_path(run.logs)})",
        flush=True,
    )
    status = 0
    try:
        install_signal_handlers()  # from here on, Ctrl-C, SIGTERM (`down`) and SIGHUP raise Stop
        start(stack, progress)
        examples = commands.examples(stack)
        commands.run_examples(examples)
        commands.print_summary(stack, examples, progress.elapsed)
        status = _watch(stack)
    except Stop as stop:
        ignore_signals_while_stopping()
        print(f"\n{stop}: stopping", flush=True)
    except StartError as exc:
        print(f"\nlocal stack: could not start: {exc}", flush=True)
        status = 1
    finally:
        ignore_signals_while_stopping()
        supervisor.stop_all(lambda line: print(f"  {line}", flush=True))
        run.clean(keep_data)
        print(f"local stack stopped; logs kept in {commands.shown_path(run.logs)}", flush=True)
    return status


def _watch(stack: Stack) -> int:
    """Until a signal (Stop) arrives: a service that dies stops the whole stack, loudly."""
    while True:
        time.sleep(0.5)
        if dead := stack.supervisor.exited_unexpectedly():
            for child in dead:
                print(
                    f"\n{child.name} (pid {child.pid}) exited unexpectedly; its log ends:\n{log_tail(Path(child.log), 1500)}"
                )
            return 1


def down(root: Path) -> int:
    run = RunDir(root.resolve())
    state = run.state.read()
    if not stop_recorded(run.state, print):
        print(f"no local stack recorded in {run.root} (no {run.state.path.name})")
        return 0
    run.clean(bool(state and state.get("keep_data")))
    print("local stack stopped")
    return 0
