"""`python -m local_stack up`: the whole system on loopback, started in dependency order.

What starts, and why this way:

1. moto's server as Secrets Manager and redis-server start at once (nothing depends on them at
   start); meanwhile `hokusai-mtls certs issue` issues a development set (CA, MLflow server,
   api, worker), and once moto answers, `hokusai-mtls certs upload` stores it: the documented
   workflow, against moto.
   PostgreSQL (Debian's server binaries, when installed) starts as MLflow's backend store, as
   in ECS, and holds the API-key store too (its own database, `api_keys`); without it both are
   sqlite files in the run directory's data/, and `up` says so.
2. MLflow (`hokusai-mtls serve-mlflow`, Dockerfile.mlflow's command) starts in strict mTLS, and
   the worker (`docker/entrypoint.sh python -m local_stack.worker`, the worker image's
   entrypoint) with it; the worker waits for MLflow's port, then logs a run over mTLS.
   MLflow takes ~10 s. Clients in ECS dial MLflow by its Cloud Map name,
   `mlflow.hokusai-development.local`; on the loopback that name resolves nowhere, so the
   printed curl commands map it with `--resolve` (MLflow must answer to it: its host check and
   its certificate), while the API and the worker, which cannot be told such a mapping, dial
   127.0.0.1 (also in MLflow's certificate). MLflow gets no key store: in strict mTLS every
   caller presents a certificate, so its API-key path is never taken.
3. Meanwhile the API-key store is prepared as an operator would: a hashing secret generated for
   this run (`secrets.token_urlsafe(48)`; with --keep-data the kept one, so the kept keys still
   check out), `hokusai-mtls auth migrate`, then `hokusai-mtls auth create-key` makes the key the
   printed commands use. The secret lives only in the environment of the processes that need it
   (the API, these commands) and in keys.env (0600, in the 0700 run directory) for the developer's
   own `hokusai-mtls auth ...`; it is never printed.
4. The API (`hokusai-mtls serve-api`, Dockerfile.api's command) starts with
   `HOKUSAI_MTLS_KEY_STORE_URL` and `HOKUSAI_MTLS_KEY_HASH_SECRET`: API keys are checked against
   our store (no auth-service double runs; `local_stack.auth_service` is for tests of an external
   service that is down or slow). Each service loads its own identity from Secrets Manager
   through the loader, as in ECS.
5. Each service's security level comes from its own /health; the certificate serials it
   reports must be the uploaded ones (a development loader would otherwise fall back to a
   local CA and the demonstration would prove nothing). Then the commands to try are run
   once, and shown with what they really printed.

Everything is `ENVIRONMENT=development` (the only environment allowed to degrade; the checks
above make sure nothing did) with `HOKUSAI_MTLS_MODE=strict` for MLflow.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from local_stack import commands, streaming_app
from local_stack import worker as worker_module
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
from local_stack.postgres_server import PostgresCluster, PostgresMissing, find_binaries, redact
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
from local_stack.started import (
    ENVIRONMENT,
    KEY_DATABASE,
    KEY_NAME,
    KEY_USER,
    LOCAL_CATALOG,
    STREAMING_SERVICE,
    RunDir,
    Stack,
)
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


def _cli(stack: Stack, *args: str, **env: str) -> str:
    """One `hokusai-mtls` command to completion (not supervised: it ends on its own)."""
    argv = [str(BIN / "hokusai-mtls"), *args]
    result = subprocess.run(argv, env=stack.environment(**env), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise StartError(
            f"{shlex.join(argv)} exited {result.returncode}:\n{_redacted(stack, result.stderr[-3000:])}"
        )
    return result.stdout


def _redacted(stack: Stack, text: str) -> str:
    """`text` without the key store's hashing secret or PostgreSQL's password."""
    if stack.key_hash_secret:
        text = text.replace(stack.key_hash_secret, "***")
    return redact(text, stack.postgres.password) if stack.postgres is not None else text


# --- the steps ------------------------------------------------------------------------------
def start(stack: Stack, progress: Progress) -> None:
    """Start everything; returns once every service is ready and the worker's run is logged."""
    ports = stack.ports
    ports.update({n: free_port() for n in ("secrets-manager", "redis", "mlflow", "api", "streaming")})
    ports["mlflow-health"], ports["streaming-health"] = free_port(), free_port()
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
    progress(f"starting moto's Secrets Manager and redis-server (pids {moto.pid}, {redis_child.pid})")
    postgres = _start_postgres(stack, progress)

    issued = stack.run.certs / "issued"
    _cli(stack, "certs", "issue", "--env", ENVIRONMENT, "--out", str(issued), "--server-san", "localhost", "--server-san", "127.0.0.1")  # fmt: skip
    progress(
        f"issued the {ENVIRONMENT} set: CA, MLflow server and the streaming server (also localhost, 127.0.0.1), "
        "api, worker (hokusai-mtls certs issue, the services declared in HOKUSAI_MTLS_SERVICES)"
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
    streaming_identity = LOCAL_CATALOG.identity_by_name(STREAMING_SERVICE)
    streaming = stack.spawn(
        "streaming",
        [str(BIN / "hokusai-mtls"), "serve", "--app", "local_stack.streaming_app:app", "--host", "127.0.0.1", "--port", str(ports["streaming"]), "--health-port", str(ports["streaming-health"])],
        **{
            names.ENV_ROLE: streaming_identity.role,
            names.ENV_CERT_DIR: str(stack.cert_dir(streaming_identity)),
            names.ENV_ROUTE_POLICY: json.dumps(streaming_app.ROUTE_POLICY),
            "PYTHONPATH": str(REPO),
        },
    )  # fmt: skip
    stack.health["streaming"] = _healthy(streaming, ports["streaming-health"])
    progress(
        f"streaming server ready on {stack.streaming_url} (hokusai-mtls serve --app local_stack.streaming_app:app, "
        f"security level {stack.health['streaming']['security_level']}): the worker may open "
        f"{streaming_app.METRICS_PATH}, not {streaming_app.ADMIN_PATH}"
    )
    worker = stack.spawn(
        "worker",
        ["sh", str(DOCKER / "entrypoint.sh"), "python", "-m", "local_stack.worker"],
        long_running=False,
        **{
            names.ENV_ROLE: names.WORKER.role,
            names.ENV_CERT_DIR: str(stack.cert_dir(names.WORKER)),
            "MLFLOW_TRACKING_URI": stack.mlflow_url,
            worker_module.ENV_STREAMING_URL: stack.streaming_url,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # a TLS refusal surfaces at once, not after minutes
            "PYTHONPATH": str(REPO),
        },
    )
    progress(f"starting MLflow (strict mTLS, pid {mlflow.pid}) and the worker (pid {worker.pid})")

    _prepare_key_store(stack, progress)
    api = stack.spawn(
        "api",
        [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(ports["api"])],
        **{
            names.ENV_CERT_DIR: str(stack.cert_dir(names.API)),
            "MLFLOW_TRACKING_URI": stack.mlflow_url,
            **stack.key_store_environment(),
        },
    )
    progress(f"starting the API (pid {api.pid}), which checks API keys against the key store")

    _wait(redis_child, redis.answers, "answering PING")
    progress(f"redis-server ready ({stack.redis_url}): the API-key cache and rate limits")
    stack.health["api"] = _healthy(api, ports["api"])
    progress(f"API ready on {stack.api_url} (security level {stack.health['api']['security_level']})")
    stack.health["mlflow"] = _healthy(mlflow, ports["mlflow-health"])
    report = stack.health["mlflow"]
    progress(
        f"MLflow ready on {stack.mlflow_url} (security level {report['security_level']}, mode {report['mode']})"
    )
    stack.worker = _worker_result(worker)
    progress(f"worker logged run {stack.worker['run_id']} over mTLS and exited 0")
    streamed = stack.worker["streaming"]
    progress(
        f"worker over a WebSocket with its certificate: {streamed['allowed']['path']} answered "
        f"{streamed['allowed']['messages']} messages to caller {streamed['allowed']['caller']!r}; "
        f"{streamed['refused']['path']} refused it with {streamed['refused']['status']} (route policy)"
    )
    _check_levels(stack, CertificateSet.read_from_dir(issued, ENVIRONMENT, LOCAL_CATALOG.identities))
    stack.supervisor.save(**stack.details())


def _prepare_key_store(stack: Stack, progress: Progress) -> None:
    """The API-key store as an operator prepares one: its URL and secret, `auth migrate`, `auth create-key`."""
    if stack.postgres is not None:
        stack.key_store_url = stack.postgres.create_database(KEY_DATABASE, exist_ok=True)
        where = f"database {KEY_DATABASE} in MLflow's PostgreSQL cluster"
    else:
        stack.key_store_url = f"sqlite:///{stack.run.data / 'api_keys.db'}"
        where = "sqlite, PostgreSQL not being installed"
    kept = _kept_secret(stack.run.keys_env)
    stack.key_hash_secret = kept or secrets.token_urlsafe(48)
    write_keys_env(stack)
    migrated = json.loads(_cli(stack, "auth", "migrate", "--json", **stack.key_store_environment()))
    progress(
        f"key store ({where}: {stack.key_store_shown}) at revision {migrated['to']} (hokusai-mtls auth migrate); "
        f"its hashing secret {'kept from the last run' if kept else 'generated for this run'}, "
        f"never printed: in {commands.shown_path(stack.run.keys_env)} (0600)"
    )
    create = ["auth", "create-key", "--user", KEY_USER, "--name", KEY_NAME, "--json"]
    answer = _cli(stack, *create, **stack.key_store_environment())
    try:
        created = json.loads(answer)
    except ValueError:
        created = None
    if not isinstance(created, dict) or not isinstance(created.get("key"), str):
        raise StartError(f"hokusai-mtls {shlex.join(create)}: no key in its answer")
    stack.api_key = created
    progress(
        f"created API key {stack.api_key['key_prefix']}... for {KEY_USER} (hokusai-mtls {shlex.join(create[:-1])})"
    )


def _kept_secret(keys_env: Path) -> str | None:
    """The hashing secret in a keys.env that --keep-data kept, so the kept store's keys still check out."""
    if not keys_env.exists():
        return None
    for line in keys_env.read_text().splitlines():
        name, _, value = line.partition("=")
        if name == names.ENV_KEY_HASH_SECRET and value:
            return shlex.split(value)[0]
    return None


def write_keys_env(stack: Stack) -> None:
    """keys.env (0600, from the first byte): what `hokusai-mtls auth ...` needs, for `set -a && . keys.env`."""
    path = stack.run.keys_env
    lines = [
        "# The local stack's API-key store (python -m local_stack up): what `hokusai-mtls auth ...` needs.",
        f"# {commands.another_key_command(stack)}",
        f"{names.ENV_ENVIRONMENT}={commands.LOCAL_ENVIRONMENT}",
        *(f"{name}={shlex.quote(value)}" for name, value in stack.key_store_environment().items()),
    ]
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as output:
        output.write("\n".join(lines) + "\n")
    partial.replace(path)


def _start_postgres(stack: Stack, progress: Progress) -> Child | None:
    """PostgreSQL in the foreground, supervised like every other child; None when not installed."""
    try:
        find_binaries()
    except PostgresMissing as missing:
        progress(
            f"{missing}: MLflow's backend store and the key store are sqlite ({stack.backend_store_uri})"
        )
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
        f"pid {child.pid}) as MLflow's backend store, as in ECS, and the API-key store's"
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
        "streaming": (stack.health["streaming"]["security_level"], stack.health["streaming"].get("certificate", {}).get("serial"), LOCAL_CATALOG.identity_by_name(STREAMING_SERVICE)),
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
