"""`serve-mlflow` must give clients what `mlflow server` gives them, on the production backend store.

The MLflow image's command is ours, not `mlflow server`, so everything `mlflow server` sets up
before uvicorn starts has to be done by `runtime.services.mlflow_setup`. These tests compare the two
where they can differ, each on something a user does:

- MLflow's DNS-rebinding guard (`MLFLOW_SERVER_ALLOWED_HOSTS`) must accept the Cloud Map name
  every client dials (the suite used to dial only 127.0.0.1, which the guard always allows);
- the backend store is PostgreSQL, as in ECS (the image needs a database driver);
- the jobs API the UI uses (judges, evaluations, prompt optimisation) must answer as it does
  under `mlflow server`, and the job must actually run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from runtime import names
from runtime.certificates import pem
from tests.integration.conftest import ENV, server_environment, start_serve_mlflow, wait_healthy
from tests.support.dial import request_by_name
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLOUD_MAP_NAME = names.mlflow_hostname(ENV)
OPERATOR_HOST = "mlflow-alias.example.com"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"
JOBS = "/ajax-api/3.0/jobs/"
TERMINAL = {"SUCCEEDED", "FAILED", "TIMEOUT", "CANCELED"}


def job_payload(experiment_id: str) -> dict:
    """A job `mlflow server` accepts (200, PENDING) and its runner then fails fast (bad scorer)."""
    return {
        "job_name": "invoke_scorer",
        "params": {"experiment_id": experiment_id, "serialized_scorer": "{}", "trace_ids": []},
    }


@pytest.fixture(scope="module")
def files(aws, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("client")
    ca, api = root / "ca.crt", root / "api.pem"
    ca.write_bytes(pem.bundle_pem(aws["set"].trust_bundle))
    api.write_bytes(aws["set"].identities["api"].combined_pem())
    api.chmod(0o600)
    return {"ca": ca, "api": api}


@pytest.fixture(scope="module")
def served(aws, postgres_server, tmp_path_factory):
    """serve-mlflow (strict mTLS) on PostgreSQL with proxied artifacts, as ECS runs it."""
    root = tmp_path_factory.mktemp("serve-mlflow")
    port, health = free_port(), free_port()
    database = postgres_server.create_database(f"parity_{os.getpid()}_{time.time_ns() % 10**6}")
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_MLFLOW_BACKEND_STORE_URI: database,
            names.ENV_MLFLOW_ARTIFACTS_DESTINATION: str(root / "artifacts"),
            names.ENV_MLFLOW_ALLOWED_HOSTS: OPERATOR_HOST,
        },
    )
    log = root / "server.log"
    process = start_serve_mlflow(env, port, health, log)
    try:
        wait_healthy(process, health, log, seconds=120)
        yield {"port": port, "log": log, "database": database, "process": process}
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A real `mlflow server` (plain HTTP on the loopback, sqlite): what serve-mlflow must match."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HOKUSAI_"))}
    log = root / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root}/mlflow.db",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn, job runner and consumers: one group to stop
        )
    try:
        wait_answering(process, f"http://127.0.0.1:{port}/health", log)
        yield {"url": f"http://127.0.0.1:{port}"}
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen, seconds: float = 20) -> None:
    """SIGTERM to the process group we started; SIGKILL to what is left of it after `seconds`."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            process.poll()
            os.killpg(process.pid, 0)  # ProcessLookupError once the whole group is gone
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def wait_answering(process: subprocess.Popen, url: str, log: Path, seconds: float = 120) -> None:
    """Until `url` answers 200 (`mlflow server`'s /health says `OK`, not JSON)."""
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"`mlflow server` did not answer {url}:\n{log.read_text(errors='replace')[-3000:]}")


def by_name(served, files, path: str, **kw) -> tuple[int, bytes]:
    """A request as a client in ECS makes it: to the Cloud Map name, with the API's certificate."""
    return request_by_name(
        CLOUD_MAP_NAME, served["port"], "127.0.0.1", path, ca=files["ca"], client_pem=files["api"], **kw
    )


def plain(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310 - loopback
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {"body": error.read().decode(errors="replace")}


# --- allowed hosts ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host", [f"{CLOUD_MAP_NAME}:PORT", CLOUD_MAP_NAME], ids=["with-port", "without-port"]
)
def test_mlflow_answers_the_cloud_map_name_clients_dial(served, files, host):
    status, body = by_name(served, files, SEARCH, headers={"Host": host.replace("PORT", str(served["port"]))})
    assert status == 200, body[:300]
    assert "experiments" in json.loads(body)


def test_hosts_an_operator_allows_are_added_to_ours(served, files):
    """MLflow's own syntax, verbatim: `alias` allows that Host header only, `alias:*` any port."""
    assert by_name(served, files, SEARCH, headers={"Host": OPERATOR_HOST})[0] == 200


def test_any_other_host_is_still_refused_by_mlflow_s_dns_rebinding_guard(served, files):
    status, body = by_name(served, files, SEARCH, headers={"Host": "attacker.example:5000"})
    assert status == 403 and b"Invalid Host header" in body


# --- the backend store ------------------------------------------------------------------------
def test_runs_are_stored_in_postgresql(served, files, postgres_server):
    name = f"parity-{time.time_ns()}"
    status, body = by_name(
        served, files, "/api/2.0/mlflow/experiments/create", method="POST", body={"name": name}
    )
    assert status == 200, body[:300]
    import psycopg

    with psycopg.connect(served["database"], connect_timeout=10) as connection:
        rows = connection.execute("SELECT name FROM experiments WHERE name = %s", (name,)).fetchall()
    assert rows == [(name,)]


# --- the jobs API -----------------------------------------------------------------------------
def wait_terminal(get, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        status, job = get()
        assert status == 200, job
        if job["status"] in TERMINAL or time.monotonic() > deadline:
            return job
        time.sleep(1)


def test_the_jobs_api_answers_as_mlflow_server_does_and_runs_the_job(served, files, reference):
    status, created = plain(f"{reference['url']}/api/2.0/mlflow/experiments/create", "POST", {"name": "jobs"})
    assert status == 200, created
    expected_status, expected = plain(
        f"{reference['url']}{JOBS}", "POST", job_payload(created["experiment_id"])
    )

    status, body = by_name(
        served, files, "/api/2.0/mlflow/experiments/create", method="POST", body={"name": "jobs"}
    )
    assert status == 200, body[:300]
    ours_status, ours_body = by_name(
        served, files, JOBS, method="POST", body=job_payload(json.loads(body)["experiment_id"])
    )
    assert (ours_status, expected_status) == (200, 200), ours_body[:500]
    ours = json.loads(ours_body)
    assert ours["status"] == expected["status"] == "PENDING"

    # Accepted is not enough: the job runner must pick the job up, as under `mlflow server`.
    theirs = wait_terminal(lambda: plain(f"{reference['url']}{JOBS}{expected['job_id']}"))

    def ours_now():
        code, raw = by_name(served, files, f"{JOBS}{ours['job_id']}")
        return code, json.loads(raw)

    finished = wait_terminal(ours_now)
    assert finished["status"] == theirs["status"] == "FAILED", (finished, theirs)


def job_processes(server_pid: int) -> list[int]:
    """Processes started for serve-mlflow's jobs: MLflow's runner and consumers carry its pid."""
    marker = f"MLFLOW_SERVER_PID={server_pid}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
    return found


def test_zz_stopping_serve_mlflow_stops_the_job_runner_and_its_consumers(served):
    """Runs last in this module: it stops the server. ECS stops a task with SIGTERM."""
    process = served["process"]
    running = job_processes(process.pid)
    assert len(running) >= 2, "the job runner and at least one huey consumer run"
    process.terminate()
    assert process.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while job_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_processes(process.pid) == []
