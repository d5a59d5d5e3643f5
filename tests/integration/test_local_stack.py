"""`make local` end to end: `python -m local_stack up` run as a developer runs it, and driven like one.

One stack for the module (it takes seconds, MLflow most of them): moto's Secrets Manager, a
real MLflow in strict mTLS, the API checking API keys against our key store (PostgreSQL's
`api_keys` database, or sqlite), redis-server and a worker that logged a run; no auth-service
double. The tests run the curl commands it printed and the command it printed for another key,
check the same things with Python clients, and finally send SIGINT and check that every process
it started is gone.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from local_stack import postgres_server, streaming_app, worker
from local_stack.commands import NO_HTTP_ANSWER
from local_stack.environment import REPO
from local_stack.stack import group_members, process_exists
from runtime import names
from runtime.auth.key_info import fingerprint
from runtime.certificates.certset import load_ca_dir
from runtime.keys import key_format
from runtime.observability.audit import KEY_FINGERPRINT_CHARS
from tests.support.dial import request_by_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

READY = "local stack ready in "
READY_SECONDS = 240  # a busy 2-core machine; alone it takes well under 30 s
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"


@dataclass
class Running:
    process: subprocess.Popen
    run_dir: Path
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    state: dict = field(default_factory=dict)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def url(self, name: str) -> str:
        return self.state["urls"][name]

    def cert_file(self, identity: names.Identity, file: str) -> str:
        return str(Path(self.state["cert_dirs"][identity.name]) / file)

    def printed_commands(self) -> dict[str, list[str]]:
        """The curl commands under "try:", keyed by the start of the comment line above each."""
        commands, title = {}, None
        for line in self.output.split("\ntry:\n", 1)[1].splitlines():
            if line.startswith("  # "):
                title = line[4:]
            elif line.startswith("  curl ") and title:
                commands[title.split(":")[0]] = shlex.split(line)
        return commands

    def printed_key(self) -> str:
        """The API key in the printed external command (the one `up` created in the key store)."""
        headers = [a for a in self.printed_commands()["external"] if a.startswith("X-API-Key: ")]
        assert len(headers) == 1, headers
        return headers[0].removeprefix("X-API-Key: ")

    def another_key_command(self) -> str:
        """The shell line printed under "another API key"."""
        lines = self.output.split("\nanother API key ", 1)[1].splitlines()
        return lines[1].strip()

    @property
    def keys_env(self) -> Path:
        return self.run_dir / "keys.env"

    def sourced(self, name: str) -> str:
        """A variable as a POSIX shell that sources keys.env sees it."""
        script = f'set -a && . "$1" && printf %s "${{{name}}}"'
        result = subprocess.run(
            ["sh", "-c", script, "sh", str(self.keys_env)], capture_output=True, text=True, check=True
        )
        return result.stdout

    def logs(self) -> dict[str, str]:
        return {log.name: log.read_text(errors="replace") for log in (self.run_dir / "logs").glob("*.log")}


def developer_environment() -> dict[str, str]:
    """A developer's shell: nothing of ours set, so whatever the printed command needs comes from keys.env."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("HOKUSAI_", "AWS_")) and k != "ENVIRONMENT"
    }


def api_search(stack: Running, key: str) -> httpx.Response:
    return httpx.get(f"{stack.url('api')}/mlflow{SEARCH}", headers={"X-API-Key": key}, timeout=30)


def _read(running: Running) -> None:
    for line in running.process.stdout:
        running.lines.append(line)
        if line.startswith(READY):
            running.ready.set()
    running.ready.set()  # the process ended (ready or not): stop waiting


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local-stack") / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "local_stack", "up", "--dir", str(run_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = Running(process, run_dir)
    reader = threading.Thread(target=_read, args=(running,), daemon=True)
    reader.start()
    started = time.monotonic()
    running.ready.wait(READY_SECONDS)
    if not any(line.startswith(READY) for line in running.lines):
        process.send_signal(signal.SIGINT)
        process.wait(60)
        pytest.fail(f"not ready in {time.monotonic() - started:.0f} s:\n{running.output[-6000:]}")
    running.state = json.loads((run_dir / "state.json").read_text())
    yield running
    if process.poll() is None:  # the SIGINT test did not run or failed: stop it the same way
        process.send_signal(signal.SIGINT)
        process.wait(60)
    reader.join(10)


def metrics(stack: Running) -> dict[str, float]:
    """MLflow's Prometheus counters from its loopback health listener, e.g. `auth_requests mtls success`."""
    text = httpx.get(stack.url("mlflow-health").replace("/health", "/metrics"), timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                name = sample.name.removeprefix("hokusai_mtls_").removesuffix("_total")
                key = " ".join([name, sample.labels.get("auth_path", ""), sample.labels.get("outcome", "")])
                values[key.strip()] = sample.value
    return values


def mtls_client(stack: Running, combined_pem: str | None = None) -> httpx.Client:
    context = ssl.create_default_context(cafile=stack.cert_file(names.WORKER, names.CA_BUNDLE_FILE))
    context.load_cert_chain(combined_pem or stack.cert_file(names.WORKER, names.COMBINED_PEM_FILE))
    return httpx.Client(base_url=stack.url("mlflow"), verify=context, timeout=30)


# --- what it printed -------------------------------------------------------------------------
def test_progress_is_printed_step_by_step_with_the_elapsed_time(stack):
    steps = [line for line in stack.lines if re.match(r"\[ *\d+\.\ds\] ", line)]
    assert len(steps) >= 6, stack.output
    times = [float(re.match(r"\[ *(\d+\.\d)s\]", line).group(1)) for line in steps]
    assert times == sorted(times)
    assert "!! not as documented" not in stack.output


def test_each_service_reports_its_security_level_from_its_own_health(stack):
    assert stack.state["health"]["mlflow"]["security_level"] == "MTLS"
    assert stack.state["health"]["mlflow"]["mode"] == names.MTLS_MODE_STRICT
    assert stack.state["health"]["api"]["security_level"] == "MTLS"
    assert stack.state["worker"]["security_level"] == "MTLS"
    table = stack.output.split("\nrunning ", 1)[1]
    assert re.search(
        r"\n  mlflow +https://mlflow\.hokusai-development\.local:\d+ +pid \d+ +MTLS, mode strict", table
    )
    assert re.search(r"\n  api +http://127\.0\.0\.1:\d+ +pid \d+ +MTLS", table)
    assert re.search(r"\n  worker +exited 0 +pid \d+ +MTLS: logged run [0-9a-f]{32}", table)
    assert re.search(r"\n  streaming +wss://127\.0\.0\.1:\d+ +pid \d+ +MTLS: a WebSocket app", table)
    for child in stack.state["children"]:  # every pid printed is one it started
        assert f"pid {child['pid']} " in table


def test_the_printed_commands_work_as_printed(stack):
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: apt-get install -y curl (.ci/run installs it)")
    commands = stack.printed_commands()
    assert set(commands) == {
        "external",
        "external with a key the store does not hold (well-formed, checksum and all)",
        "external without an API key",
        "internal",
        "internal without a client certificate",
    }

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    external = run(commands["external"])
    assert external.returncode == 0, external.stderr
    assert "local-stack" in {e["name"] for e in json.loads(external.stdout)["experiments"]}

    unknown = run(commands["external with a key the store does not hold (well-formed, checksum and all)"])
    shown = [a.removeprefix("X-API-Key: ") for a in unknown.args if a.startswith("X-API-Key: ")]
    assert key_format.parse(shown[0]) and shown[0] != stack.printed_key()  # a real key's shape, not ours
    assert json.loads(unknown.stdout) == {"error_code": "UNAUTHENTICATED", "message": "API key invalid"}

    no_key = run(commands["external without an API key"])
    assert json.loads(no_key.stdout) == {"error_code": "UNAUTHENTICATED", "message": "API key required"}

    internal = run(commands["internal"])
    name = f"{names.mlflow_hostname('development')}:{stack.url('mlflow').rsplit(':', 1)[1]}"
    assert ["--resolve", f"{name}:127.0.0.1"] == internal.args[2:4]  # by the Cloud Map name
    assert internal.returncode == 0, internal.stderr
    assert json.loads(internal.stdout)["run"]["info"]["run_id"] == stack.state["worker"]["run_id"]

    refused = run(commands["internal without a client certificate"])
    assert refused.returncode in NO_HTTP_ANSWER, (refused.returncode, refused.stderr)
    assert refused.stdout == ""  # not even an error page: no HTTP answer at all


# --- the shape of the deployment -------------------------------------------------------------
def test_mlflow_answers_its_cloud_map_name_and_no_other(stack):
    """In ECS every client dials mlflow.hokusai-<env>.local: MLflow's host check must accept it."""
    port = int(stack.url("mlflow").rsplit(":", 1)[1])
    ca = Path(stack.cert_file(names.WORKER, names.CA_BUNDLE_FILE))
    pem = Path(stack.cert_file(names.WORKER, names.COMBINED_PEM_FILE))
    name = names.mlflow_hostname("development")
    assert stack.url("mlflow-cloud-map") == f"https://{name}:{port}"
    status, body = request_by_name(name, port, "127.0.0.1", SEARCH, ca=ca, client_pem=pem)
    assert status == 200, body[:300]
    status, body = request_by_name(
        name, port, "127.0.0.1", SEARCH, ca=ca, client_pem=pem, headers={"Host": "rebinding.example"}
    )
    assert status == 403 and b"Invalid Host header" in body


def test_the_backend_store_is_postgresql_when_it_is_installed(stack):
    backend = stack.url("mlflow-backend-store")
    if not postgres_server.available():
        assert backend.startswith("sqlite:///")
        assert "MLflow's backend store is sqlite" in stack.output
        return
    assert re.fullmatch(r"postgresql://hokusai:\*\*\*@127\.0\.0\.1:\d+/mlflow", backend), backend
    directory = Path(stack.state["postgres_dir"])
    password = (directory / "password").read_text().strip()
    assert password not in stack.output and password not in (stack.run_dir / "state.json").read_text()
    import psycopg

    with psycopg.connect(backend.replace("***", password), connect_timeout=10) as connection:
        rows = connection.execute("SELECT name FROM experiments").fetchall()
    assert (worker.EXPERIMENT,) in rows


# --- the key store ---------------------------------------------------------------------------
def test_the_api_checks_keys_against_our_key_store_and_no_auth_double_runs(stack):
    children = {c["name"]: c for c in stack.state["children"]}
    assert "auth-service" not in children
    api_environment = dict(
        entry.split("=", 1)
        for entry in Path(f"/proc/{children['api']['pid']}/environ").read_text().split("\0")
        if "=" in entry
    )
    assert names.ENV_AUTH_SERVICE_URL not in api_environment
    assert api_environment[names.ENV_KEY_STORE_URL] == stack.sourced(names.ENV_KEY_STORE_URL)
    assert api_environment[names.ENV_KEY_HASH_SECRET] == stack.sourced(names.ENV_KEY_HASH_SECRET)
    store = stack.url("key-store")
    if postgres_server.available():
        assert re.fullmatch(r"postgresql://hokusai:\*\*\*@127\.0\.0\.1:\d+/api_keys", store), store
    else:
        assert store == f"sqlite:///{stack.run_dir / 'data' / 'api_keys.db'}"
    assert "API keys: validated against our key store" in stack.logs()["api.log"]
    # nothing the stack started (any process in its groups, or below it) is the auth-service double
    groups = {c["pgid"] for c in stack.state["children"]}
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = (int(fields[1]), int(fields[2]))  # ppid, pgrp

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == stack.process.pid or parents.get(pid, (0, 0))[1] in groups:
                return True
            pid = parents.get(pid, (0, 0))[0]
        return False

    started = [commands[pid] for pid in parents if ours(pid)]
    assert any("serve-api" in command for command in started), started
    assert not [command for command in started if "auth_service" in command], started


def test_the_printed_key_is_the_one_created_in_the_store(stack):
    key = stack.printed_key()
    assert key_format.parse(key).key.startswith(key_format.TEST_PREFIX)
    recorded = stack.state["api_key"]
    assert recorded["key_prefix"] == key_format.display_prefix(key)
    assert (recorded["user_id"], recorded["name"]) == ("local-user", "make local")
    assert f"created API key {recorded['key_prefix']}... for local-user" in stack.output
    assert key not in (stack.run_dir / "state.json").read_text()  # printed once, recorded nowhere
    cli = str(Path(sys.executable).parent / "hokusai-mtls")
    script = 'set -a && . "$1" && "$2" auth list-keys --json'
    listing = subprocess.run(
        ["sh", "-c", script, "sh", str(stack.keys_env), cli],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=developer_environment(),
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert recorded["id"] in {k["id"] for k in json.loads(listing.stdout) if k["is_active"]}


def test_the_hash_secret_is_never_printed_and_only_in_a_0600_file(stack):
    secret = stack.sourced(names.ENV_KEY_HASH_SECRET)
    assert len(secret) >= 48
    assert stack.keys_env.stat().st_mode & 0o777 == 0o600
    assert stack.run_dir.stat().st_mode & 0o777 == 0o700
    assert secret not in stack.output
    assert secret not in (stack.run_dir / "state.json").read_text()
    for name, text in stack.logs().items():
        assert secret not in text, name


def test_an_invalid_key_is_refused(stack):
    key = stack.printed_key()
    mistyped = key[:-1] + ("A" if key[-1] != "A" else "B")  # the checksum no longer matches
    unknown = key_format.generate("development")  # well-formed, in no store
    for candidate in (mistyped, unknown):
        answer = api_search(stack, candidate)
        assert answer.status_code == 401, (candidate, answer.text)
        assert answer.json() == {"error_code": "UNAUTHENTICATED", "message": "API key invalid"}


def test_the_printed_command_for_another_key_works(stack):
    command = stack.another_key_command()
    assert command.startswith("(set -a && . ") and " auth create-key --user local-user " in command
    assert "HASH_SECRET=" not in command
    made = subprocess.run(
        ["sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=developer_environment(),
    )
    assert made.returncode == 0, made.stderr
    new_key = made.stdout.splitlines()[0]
    assert key_format.parse(new_key) and new_key != stack.printed_key()
    answer = api_search(stack, new_key)
    assert answer.status_code == 200, answer.text
    assert worker.EXPERIMENT in {e["name"] for e in answer.json()["experiments"]}


# --- the flows, checked with Python clients ------------------------------------------------
def test_an_api_key_through_the_api_reaches_mlflow(stack):
    key = stack.printed_key()
    answer = api_search(stack, key)
    assert answer.status_code == 200, answer.text
    assert worker.EXPERIMENT in {e["name"] for e in answer.json()["experiments"]}
    # let in by the API-key path, as the API's audit line for that key says
    logged = fingerprint(key)[:KEY_FINGERPRINT_CHARS]
    audit = [
        json.loads(line.split(" hokusai_mtls.audit ", 1)[1])
        for line in stack.logs()["api.log"].splitlines()
        if " hokusai_mtls.audit " in line
    ]
    last = [entry for entry in audit if entry.get("key") == logged][-1]
    assert (last["auth_path"], last["outcome"], last["status"]) == ("api_key", "success", 200), last
    # the API-key path cached the key's validation in the real redis-server
    with redis.Redis.from_url(stack.url("redis"), socket_timeout=5) as client:
        assert client.dbsize() > 0


def test_an_internal_request_with_the_workers_certificate_succeeds_as_the_worker(stack):
    before = metrics(stack)
    with mtls_client(stack) as client:
        answer = client.get(f"/api/2.0/mlflow/runs/get?run_id={stack.state['worker']['run_id']}")
    assert answer.status_code == 200, answer.text
    after = metrics(stack)
    success = "auth_requests mtls success"
    assert after[success] == before.get(success, 0) + 1  # the middleware's certificate path let it in
    assert stack.state["worker"]["spiffe_id"] == names.spiffe_id("development", names.WORKER_SERVICE)


def test_mlflow_decides_by_the_identity_in_the_certificate(stack, tmp_path):
    """The same CA, the same TLS, another name in the certificate: MLflow's middleware refuses it."""
    ca, _bundle = load_ca_dir(stack.run_dir / "certs" / "issued")
    stranger = tmp_path / "intruder.pem"
    stranger.write_bytes(ca.issue_client("development", "intruder").combined_pem())
    with mtls_client(stack, str(stranger)) as client:
        answer = client.get(SEARCH)
    assert answer.status_code == 403
    assert answer.json() == {
        "error_code": "PERMISSION_DENIED",  # MLflow's error shape, which its client reads
        "message": "the client certificate names no service allowed here",
    }


def test_a_request_without_a_client_certificate_is_refused_at_the_handshake(stack):
    port = int(stack.url("mlflow").rsplit(":", 1)[1])
    before = metrics(stack)
    context = ssl.create_default_context(cafile=stack.cert_file(names.WORKER, names.CA_BUNDLE_FILE))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # here the client's own handshake fails
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")
    context = ssl.create_default_context(cafile=stack.cert_file(names.WORKER, names.CA_BUNDLE_FILE))
    received = b""
    try:  # TLS 1.3: the client's side of the handshake ends first; the refusal meets its first read
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(f"GET {SEARCH} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            received = tls.recv(1024)
    except (ssl.SSLError, ConnectionError):
        pass
    assert received == b""  # no HTTP answer: the server dropped the connection in the handshake
    after = metrics(stack)
    assert after["handshakes_started"] - before["handshakes_started"] == 2
    assert after["handshakes_completed"] == before["handshakes_completed"]  # neither was let in


def test_the_workers_run_is_in_mlflow(stack):
    run_id = stack.state["worker"]["run_id"]
    with mtls_client(stack) as client:
        run = client.get(f"/api/2.0/mlflow/runs/get?run_id={run_id}").json()["run"]
        history = client.get(f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss").json()
        artifacts = client.get(f"/api/2.0/mlflow/artifacts/list?run_id={run_id}").json()
        experiment = client.get(
            f"/api/2.0/mlflow/experiments/get?experiment_id={run['info']['experiment_id']}"
        )
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == worker.RUN_NAME
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == worker.PARAMS
    assert [m["value"] for m in sorted(history["metrics"], key=lambda m: m["step"])] == worker.LOSSES
    assert [f["path"] for f in artifacts["files"]] == [worker.ARTIFACT]
    assert experiment.json()["experiment"]["name"] == worker.EXPERIMENT


# --- last: Ctrl-C ----------------------------------------------------------------------------
def test_zz_sigint_stops_every_process_it_started_and_cleans_its_state(stack):
    children = stack.state["children"]
    secret = stack.sourced(names.ENV_KEY_HASH_SECRET)
    assert {c["name"] for c in children} == {
        "secrets-manager",
        "redis",
        "mlflow",
        "streaming",
        "api",
        "worker",
        *(["postgres"] if postgres_server.available() else []),
    }
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(60) == 0
    for child in children:
        assert not process_exists(child["pid"]), child
        assert group_members(child["pgid"]) == [], child
    assert not process_exists(stack.process.pid)
    assert not (stack.run_dir / "state.json").exists()
    assert not (stack.run_dir / "certs").exists()  # no private keys left behind
    assert not stack.keys_env.exists()  # nor the key store's hashing secret
    assert secret not in stack.output  # not even while stopping
    assert (stack.run_dir / "logs" / "mlflow.log").exists()  # the logs stay for a look
    stopped = stack.output.split("SIGINT: stopping", 1)[1]
    for child in children:
        assert re.search(rf"\n  {child['name']} +pid {child['pid']} +(stopped|had exited)\n", stopped), (
            stopped
        )
    assert os.path.isdir(stack.run_dir)
    if stack.state["postgres_dir"]:  # the cluster goes with the data (no --keep-data)
        assert not Path(stack.state["postgres_dir"]).exists()


def test_a_second_declared_server_streams_to_the_worker_on_one_route_and_refuses_another(stack):
    """`make local`'s streaming app (`hokusai-mtls serve --app`): the worker's certificate opens
    /stream/metrics, where the app knows it as the worker, and the route policy refuses /stream/admin."""
    streamed = stack.state["worker"]["streaming"]
    assert streamed["allowed"] == {
        "path": streaming_app.METRICS_PATH,
        "status": 101,
        "caller": names.WORKER_SERVICE,
        "messages": 1 + streaming_app.TICKS,
    }
    assert streamed["refused"] == {"path": streaming_app.ADMIN_PATH, "status": 403}
    assert stack.state["health"]["streaming"]["security_level"] == "MTLS"
    assert re.search(
        r"/stream/metrics answered 4 messages to caller 'worker'; /stream/admin refused it with 403",
        stack.output,
    )
