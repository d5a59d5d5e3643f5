"""`make local` end to end: `python -m local_stack up` run as a developer runs it, and driven like one.

One stack for the module (it takes seconds, MLflow most of them): moto's Secrets Manager, a
real MLflow in strict mTLS, the API, redis-server, the auth-service test double and a worker
that logged a run. The tests run the curl commands it printed, check the same things with
Python clients, and finally send SIGINT and check that every process it started is gone.
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

from local_stack import postgres_server, worker
from local_stack.auth_service import ACTIVE_KEY
from local_stack.commands import NO_HTTP_ANSWER
from local_stack.environment import REPO
from local_stack.stack import group_members, process_exists
from runtime import names
from runtime.certificates.certset import load_ca_dir
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
    for child in stack.state["children"]:  # every pid printed is one it started
        assert f"pid {child['pid']} " in table


def test_the_printed_commands_work_as_printed(stack):
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: apt-get install -y curl (.ci/run installs it)")
    commands = stack.printed_commands()
    assert set(commands) == {
        "external",
        "external without an API key",
        "internal",
        "internal without a client certificate",
    }

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    external = run(commands["external"])
    assert external.returncode == 0, external.stderr
    assert "local-stack" in {e["name"] for e in json.loads(external.stdout)["experiments"]}

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


# --- the flows, checked with Python clients ------------------------------------------------
def test_an_api_key_through_the_api_reaches_mlflow(stack):
    answer = httpx.get(f"{stack.url('api')}/mlflow{SEARCH}", headers={"X-API-Key": ACTIVE_KEY}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert worker.EXPERIMENT in {e["name"] for e in answer.json()["experiments"]}
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
    assert {c["name"] for c in children} == {
        "secrets-manager",
        "redis",
        "auth-service",
        "mlflow",
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
    assert (stack.run_dir / "logs" / "mlflow.log").exists()  # the logs stay for a look
    stopped = stack.output.split("SIGINT: stopping", 1)[1]
    for child in children:
        assert re.search(rf"\n  {child['name']} +pid {child['pid']} +(stopped|had exited)\n", stopped), (
            stopped
        )
    assert os.path.isdir(stack.run_dir)
    if stack.state["postgres_dir"]:  # the cluster goes with the data (no --keep-data)
        assert not Path(stack.state["postgres_dir"]).exists()
