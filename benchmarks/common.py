"""What the benchmarks share: the machine's description, verdicts, and one real MLflow server.

Why a module: `bench_tls.py` (keep-alive mTLS vs plain) and `bench_prd.py` (the PRD's
comparison) drive the same thing, a real `hokusai-mtls serve-mlflow` with its certificates in
moto's Secrets Manager and the auth-service test double behind its API-key path, and
`run_all.py` writes every bench's figures into one report. Defining the server set-up, the
machine description and the PASS/MISS rule once keeps the benches measuring the same thing.

Each bench's `--json` document carries a `figures` list built with `figure()`: what the bench
measured against a target, in the form `run_all.py` tabulates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from local_stack.environment import wait_healthy  # noqa: E402  (after the path set-up)
from local_stack.ports import free_port  # noqa: E402

__all__ = [
    "OPERATIONS",
    "ROOT",
    "SNI",
    "MlflowServer",
    "child_env",
    "cpu_snapshot",
    "figure",
    "free_port",
    "latency_row",
    "machine",
    "mlflow_client_environment",
    "mtls_credentials",
    "others_cores",
    "percentile",
    "process_cpu",
    "process_tree",
    "run_bench",
    "running_mlflow",
    "stop",
    "stop_tree",
    "time_operations",
    "token_credentials",
    "tree_cpu",
    "tree_memory",
    "use_credentials",
    "verdict",
    "write_set",
]

MLFLOW_ENV = "staging"
"""Like tests/integration: a staging set in Secrets Manager (moto), so there is no dev fallback."""
START_SECONDS = 300
"""How long serve-mlflow may take to answer /health: `--smoke` runs every bench side by side on 2 cores,
where creating MLflow's tables alone took 70 s in CI (a bound on a wait, not a measured figure)."""
SNI = "localhost"  # in the server certificate's SANs (with 127.0.0.1)


# --- small helpers --------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (no interpolation: every figure is a latency that happened)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (our servers shut down cleanly on it), then SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def child_env() -> dict[str, str]:
    """This environment with the checkout on PYTHONPATH, so `python -m runtime.cli` works anywhere."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else "PASS" if ok else "MISS"


def figure(
    name: str,
    value: float,
    detail: str,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    unit: str = "x",
    target: str | None = None,
) -> dict[str, Any]:
    """One measured figure against its target, as `run_all.py` tabulates it.

    `at_most` / `at_least` give the target (PASS when met, MISS otherwise); neither: a figure
    shown for information. `target` overrides the target's wording (e.g. the PRD's own).
    """
    if at_most is not None:
        passed: bool | None = value <= at_most
        wording = f"<= {at_most:g}{unit}"
    elif at_least is not None:
        passed = value >= at_least
        wording = f">= {at_least:g}{unit}"
    else:
        passed, wording = None, "(information)"
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "detail": detail,
        "target": target or wording,
        "pass": passed,
        "verdict": verdict(passed),
    }


CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: index k is the man page's field k + 3."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and every living process below it, from /proc's parent links.

    A server's CPU and memory are its whole tree's: uvicorn's and nginx's workers, MLflow's job
    runner and its huey consumers. A process group would not do: our job runner leads its own.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        tree.append(queue.pop())
        queue.extend(children.get(tree[-1], []))
    return tree


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of `pid`'s tree, with the children each has waited for
    (cutime, cstime), so a worker that exited and was reaped still counts."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += sum(int(v) for v in _stat_fields(member)[11:15])
    return total / CLK_TCK


def tree_memory(pid: int) -> dict[str, float]:
    """Processes, and the sum of RSS and of PSS in MiB, over `pid`'s tree.

    RSS counts a page shared by forked workers once per process; PSS splits it between them,
    so PSS adds up to what the tree really holds.
    """
    rss = pss = 0
    processes = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
            processes += 1
    return {"processes": processes, "rss_mib": rss / 1024, "pss_mib": pss / 1024}


def _started(pid: int) -> str | None:
    """The process's start time (tells it from a later one with the same pid); None once it is gone."""
    try:
        fields = _stat_fields(pid)
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def stop_tree(process: subprocess.Popen, timeout: float = 20) -> None:
    """`stop()` the process, then SIGKILL whatever of its tree outlives it by `timeout`.

    Children of a server can outlive it (`mlflow server`'s huey consumers take seconds to notice
    that their runner's parent is gone); the tree is read before the signal, while it is whole.
    """
    members = {pid: _started(pid) for pid in process_tree(process.pid)} if process.poll() is None else {}
    members.pop(process.pid, None)
    stop(process)

    def alive() -> list[int]:
        return [pid for pid, started in members.items() if started is not None and _started(pid) == started]

    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall, machine-wide busy CPU seconds, this process's + its waited-for children's CPU seconds)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return (
        time.monotonic(),
        (user + nice + system + irq + softirq + steal) / CLK_TCK,
        own.user + own.system + own.children_user + own.children_system,
    )


def others_cores(before: tuple[float, float, float]) -> float:
    """Cores used on average by processes that are not this benchmark's since `before`.

    The machine is shared: other jobs inflate latencies and cut throughput, so say how much.
    Exact once the servers and load generators have exited (their CPU then counts as ours).
    """
    after = cpu_snapshot()
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def run_bench(
    name: str,
    report: dict,
    measure: Callable[[Path], dict],
    figures: Callable[[dict], list],
    print_report: Callable[[dict], None],
    *,
    as_json: bool,
    errors: tuple[type[BaseException], ...] = (RuntimeError, OSError, subprocess.SubprocessError),
) -> int:
    """A bench's `main` after its arguments: the machine, `measure(tmp)` in a temporary directory,
    the other load meanwhile, the figures, then the JSON document or the table; 1 (one stderr line)
    if measuring raised one of `errors`."""
    try:
        report["machine"] = machine()
        before = cpu_snapshot()
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            report["result"] = measure(Path(tmp))
        report["others_cores"] = others_cores(before)
    except errors as exc:
        sys.stderr.write(f"bench_{name}: error: {exc}\n")
        return 1
    report["figures"] = figures(report)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        print_report(report)
    return 0


# --- the machine ----------------------------------------------------------------------------------
def _package(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """CPU, cores, memory, kernel and the versions that decide the figures (TLS library, servers)."""
    model = None
    memory_kib = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
                break
    openssl_cli = None
    if shutil.which("openssl"):
        openssl_cli = subprocess.run(
            ["openssl", "version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    crypto_openssl = None
    with contextlib.suppress(ImportError):
        from cryptography.hazmat.backends.openssl import backend

        crypto_openssl = backend.openssl_version_text()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1) if memory_kib else None,
        "kernel": f"{platform.system()} {platform.release()}",
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_ssl": ssl.OPENSSL_VERSION,
        "openssl_cli": openssl_cli,
        "cryptography": f"{_package('cryptography')} ({crypto_openssl})",
        "uvicorn": _package("uvicorn"),
        "mlflow": _package("mlflow"),
        "redis_server": _redis_server_version(),
    }


def _redis_server_version() -> str | None:
    if shutil.which("redis-server") is None:
        return None
    text = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    return next((part.split("=", 1)[1] for part in text.split() if part.startswith("v=")), None)


# --- MLflow's client: credentials per call --------------------------------------------------------
CREDENTIAL_VARIABLES = (
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_TOKEN",
)


def mlflow_client_environment() -> None:
    """No MLflow variable of the caller's leaks in; no retries (a failure must fail, not wait)."""
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[name]
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"


def mtls_credentials(files: Mapping[str, Path]) -> dict[str, str]:
    """The API service's client certificate (one PEM with its key) and the CA bundle."""
    from runtime import names

    return {
        names.ENV_MLFLOW_CLIENT_CERT: str(files["client"]),
        names.ENV_MLFLOW_SERVER_CERT: str(files["ca"]),
    }


def token_credentials(api_key: str) -> dict[str, str]:
    """An API key; MLflow's client sends it as `Authorization: Bearer`."""
    return {"MLFLOW_TRACKING_TOKEN": api_key}


def use_credentials(variables: Mapping[str, str]) -> None:
    """MLflow's client reads its credentials from the environment on every call: set one caller's."""
    for name in CREDENTIAL_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(variables)


OPERATIONS = ("log_metric", "get_run")
"""The MLflow calls both benches time: a write and a read, what a training worker does all day."""


def time_operations(
    client, run_id: str, step: int, before_each: Callable[[], None] | None = None
) -> dict[str, float]:
    """`log_metric` then `get_run` with MLflow's own client: seconds for each, one HTTP request each.

    `before_each` runs before each call, outside the timed region (e.g. to set the caller's
    credentials). `get_run` must return the metric just logged: a bench that measured failed
    or stale answers would measure nothing.
    """
    if before_each:
        before_each()
    t0 = time.perf_counter()
    client.log_metric(run_id, "loss", 1.0 / step, step=step)
    t1 = time.perf_counter()
    if before_each:
        before_each()
    t2 = time.perf_counter()
    fetched = client.get_run(run_id)
    t3 = time.perf_counter()
    if fetched.data.metrics.get("loss") != 1.0 / step:
        raise RuntimeError(
            f"get_run returned {fetched.data.metrics.get('loss')!r}, not the metric just logged"
        )
    return {"log_metric": t1 - t0, "get_run": t3 - t2}


def latency_row(seconds: list[float]) -> dict[str, float]:
    """n, p50, p99 and mean in milliseconds."""
    return {
        "n": len(seconds),
        "p50_ms": percentile(seconds, 50) * 1e3,
        "p99_ms": percentile(seconds, 99) * 1e3,
        "mean_ms": statistics.fmean(seconds) * 1e3,
    }


# --- one real serve-mlflow ------------------------------------------------------------------------
def write_set(directory: Path, certificates, client: str = "api") -> dict[str, Path]:
    """The server's files (as the loader publishes them) and a client's combined PEM and CA bundle."""
    from runtime import names
    from runtime.certificates import pem
    from runtime.certificates.files import publish_files

    server = certificates.identities["server"]
    bundle = pem.bundle_pem(certificates.trust_bundle)
    publish_files(
        directory / "server",
        {
            names.CERT_FILE: (server.certificate_pem(), 0o644),
            names.KEY_FILE: (server.private_key_pem(), 0o600),
            names.CA_BUNDLE_FILE: (bundle, 0o644),
        },
    )
    (directory / "client.pem").write_bytes(certificates.identities[client].combined_pem())
    (directory / "client.pem").chmod(0o600)
    (directory / "ca.pem").write_bytes(bundle)
    return {"server": directory / "server", "client": directory / "client.pem", "ca": directory / "ca.pem"}


@dataclass
class MlflowServer:
    """A running `serve-mlflow` and what a bench needs to call it and read its side."""

    port: int
    health_port: int
    files: dict[str, Path]  # "client" (cert + key PEM), "ca" (bundle)
    stdout: Path
    stderr: Path
    process: subprocess.Popen
    startup_s: float
    auth: Any  # local_stack.auth_service.FakeAuthService
    redis: Any  # local_stack.redis_server.RedisServer or None

    def metrics_text(self) -> str:
        """The server's Prometheus page, from its loopback health listener."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def auth_requests(self) -> dict[tuple[str, str], float]:
        """The middleware's own count: (auth_path, outcome) -> requests, since the server started."""
        from prometheus_client.parser import text_string_to_metric_families

        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == "hokusai_mtls_auth_requests_total":
                    key = (sample.labels["auth_path"], sample.labels["outcome"])
                    counts[key] = counts.get(key, 0) + sample.value
        return counts


def secrets_with_a_set(moto, environment: str, client_dir: Path):
    """A fresh certificate set for `environment` uploaded to the started moto server `moto`, and
    the client files of every identity in `client_dir`: (endpoint, `write_set`'s files)."""
    import boto3

    from runtime.certificates.certset import CertificateSet
    from runtime.secrets.secret_store import SecretStore

    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    certificates = CertificateSet.issue(environment, server_sans=(SNI, "127.0.0.1"))
    secrets = boto3.client(
        "secretsmanager",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - moto's fake credentials
    )
    SecretStore(environment, client=secrets).upload(certificates)
    return endpoint, write_set(client_dir, certificates)


@contextlib.contextmanager
def running_mlflow(
    workdir: Path,
    *,
    keys: dict[str, dict[str, Any]],
    redis: bool = False,
    metrics_seconds: float | None = None,
    mode: str | None = None,
    environment: Mapping[str, str] | None = None,
) -> Iterator[MlflowServer]:
    """One `hokusai-mtls serve-mlflow`, in permissive mode (mTLS and plain HTTP on ONE port) unless
    `mode` names another (`names.MTLS_MODE_STRICT`: mTLS only); `environment` adds variables.

    As ECS runs it, pointed at loopback doubles: certificates from moto's Secrets Manager
    (ThreadedMotoServer, never real AWS), the API-key path's auth service = the test double
    `local_stack.auth_service.FakeAuthService` (in this process, so a bench can count its calls
    and set its delay) knowing `keys`, and with `redis` a real redis-server for the key cache and
    the rate limiter (without: the runtime's in-process cache and limiter). SQLite lives in
    /dev/shm when there is one: disk flushes add latency spikes that have nothing to do with
    authentication (ECS runs MLflow against RDS, not a local file).

    `HOKUSAI_MTLS_INTERNAL_CIDRS=10.0.0.0/8`, so the loopback caller on the plain side is not
    "internal": our middleware logs a WARNING per request for an internal caller without a
    certificate (to find stragglers during the migration), a cost the seed's path never had.
    Everything is stopped on exit.
    """
    from moto.server import ThreadedMotoServer

    from local_stack.auth_service import FakeAuthService
    from local_stack.redis_server import RedisServer
    from runtime import names

    root = workdir / "mlflow"
    root.mkdir()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every call
    stack = contextlib.ExitStack()
    try:
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        stack.callback(moto.stop)
        auth = FakeAuthService(keys)
        auth_url = auth.start()
        stack.callback(auth.stop)
        redis_server = None
        if redis:
            (root / "redis").mkdir()
            redis_server = RedisServer(root / "redis")
            redis_server.start()
            stack.callback(redis_server.stop)

        endpoint, files = secrets_with_a_set(moto, MLFLOW_ENV, root / "client")
        shm = Path("/dev/shm")  # noqa: S108 - a private TemporaryDirectory inside it
        database = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else root)))

        port, health_port = free_port(), free_port()
        env = {
            **{k: v for k, v in child_env().items() if not k.startswith(("MLFLOW_", "HOKUSAI_"))},
            names.ENV_ENVIRONMENT: MLFLOW_ENV,
            names.ENV_MTLS_MODE: mode or names.MTLS_MODE_PERMISSIVE,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": endpoint,
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{database}/mlflow.db",
            names.ENV_MLFLOW_ARTIFACTS_DESTINATION: str(root / "artifacts"),
            names.ENV_INTERNAL_CIDRS: "10.0.0.0/8",
            names.ENV_AUTH_SERVICE_URL: auth_url,
        }
        env.pop(names.ENV_REDIS_URL, None)
        if redis_server is not None:
            env[names.ENV_REDIS_URL] = redis_server.url
        if metrics_seconds is not None:
            env[names.ENV_METRICS_SECONDS] = str(metrics_seconds)
        env.update(environment or {})
        stdout, stderr = root / "server.stdout", root / "server.stderr"
        with stdout.open("w") as out, stderr.open("w") as err:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "runtime.cli",
                    "serve-mlflow",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--health-port",
                    str(health_port),
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
            )
        stack.callback(stop, process)
        started = time.monotonic()
        report = wait_healthy(process, health_port, stderr, seconds=START_SECONDS)
        if report.get("status") != "ok":
            raise RuntimeError(f"serve-mlflow reports {report}")
        yield MlflowServer(
            port=port,
            health_port=health_port,
            files=files,
            stdout=stdout,
            stderr=stderr,
            process=process,
            startup_s=time.monotonic() - started,
            auth=auth,
            redis=redis_server,
        )
    finally:
        stack.close()
