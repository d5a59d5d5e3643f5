"""A deploy loses no metrics: at SIGTERM the servers write the interval's counts before they exit.

`hokusai-mtls serve-mlflow` and `serve-api`, started as their images start them, with the EMF
interval (`HOKUSAI_MTLS_METRICS_SECONDS`) far longer than the test: every count the EMF lines
on stdout carry was written by the last flush at shutdown, after the listeners stopped. They
must add up to exactly what the test sent, refused handshakes included.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local_stack.auth_service import ACTIVE_KEY
from runtime import names
from runtime.certificates import pem
from tests.integration.conftest import container_command, loopback_options, server_environment, wait_healthy
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
NEVER = "3600"
"""An EMF interval no test reaches: only the flush at shutdown can write what was counted."""


class Server:
    """A server process with its stdout (the EMF lines) and stderr (the log) in separate files."""

    def __init__(self, argv: list[str], env: dict[str, str], root: Path) -> None:
        self.stdout, self.stderr = root / "stdout", root / "stderr"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=err)

    def terminate(self) -> int:
        """SIGTERM, as ECS stops a task; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            pytest.fail(f"no exit within 60 s of SIGTERM:\n{self.stderr.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def emf(self) -> list[dict]:
        return [
            json.loads(line) for line in self.stdout.read_text().splitlines() if line.startswith('{"_aws"')
        ]


def total(documents: list[dict], metric: str, **dimensions: str) -> int:
    """The sum of `metric` over the documents with these dimension values (a distribution: its count)."""
    found = 0
    for document in documents:
        if metric not in document or any(document.get(k) != v for k, v in dimensions.items()):
            continue
        value = document[metric]
        found += sum(value["Counts"]) if isinstance(value, dict) else value
    return found


def exited_cleanly(server: Server, status: int) -> None:
    log = server.stderr.read_text()
    assert status == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def mlflow(aws, tmp_path) -> Iterator[tuple[Server, int]]:
    port, health = free_port(), free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(tmp_path / "certs"),
            names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{tmp_path}/mlflow.db",
            names.ENV_MLFLOW_JOB_EXECUTION: "false",
            names.ENV_METRICS_SECONDS: NEVER,
        },
    )
    server = Server([*container_command("Dockerfile.mlflow"), *loopback_options(port, health)], env, tmp_path)
    try:
        wait_healthy(server.process, health, server.stderr)
        yield server, port
    finally:
        server.kill()


def client_context(aws, tmp_path: Path, identity: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pem.bundle_pem(aws["set"].trust_bundle).decode())
    if identity is not None:
        path = tmp_path / f"{identity}.pem"
        path.write_bytes(aws["set"].identities[identity].combined_pem())
        context.load_cert_chain(str(path))
    return context


def test_serve_mlflow_writes_every_request_and_refused_handshake_at_sigterm(mlflow, aws, tmp_path):
    server, port = mlflow
    url = f"https://127.0.0.1:{port}{SEARCH}"
    api = client_context(aws, tmp_path, "api")
    kept, fresh, refused = 25, 10, 4
    with httpx.Client(verify=api, timeout=30) as keep_alive:  # one connection, one handshake
        for _ in range(kept):
            assert keep_alive.get(url).status_code == 200
    for _ in range(fresh):  # a handshake each
        with httpx.Client(verify=api, timeout=30) as client:
            assert client.get(url).status_code == 200
    anonymous = client_context(aws, tmp_path, None)
    for _ in range(refused):  # no client certificate: refused at the handshake
        with pytest.raises(httpx.TransportError):
            httpx.get(url, verify=anonymous, timeout=30)

    exited_cleanly(server, server.terminate())
    documents = server.emf()
    assert total(documents, names.METRIC_AUTH_REQUESTS, AuthPath=names.AUTH_PATH_MTLS) == kept + fresh
    assert total(documents, names.METRIC_INTERNAL_LATENCY) == kept + fresh
    assert total(documents, names.METRIC_MTLS_HANDSHAKES) == 1 + fresh
    # Twice: the failure-rate view (started - completed, no reason) and the view by reason.
    plain_view = [d for d in documents if names.DIM_REASON not in d]
    assert total(plain_view, names.METRIC_MTLS_HANDSHAKE_FAILURES) == refused
    assert (
        total(documents, names.METRIC_MTLS_HANDSHAKE_FAILURES, Reason=names.HANDSHAKE_NO_CERTIFICATE)
        == refused
    )
    assert {d[names.DIM_SERVICE] for d in documents if names.DIM_SERVICE in d} == {names.MLFLOW_SERVICE}


def start_api(aws, auth_service, root: Path, metrics_seconds: str) -> tuple[Server, str]:
    port = free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_AUTH_SERVICE_URL: auth_service.base_url,
            "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{free_port()}",  # not called here
            names.ENV_METRICS_SECONDS: metrics_seconds,
        },
    )
    argv = [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(port)]
    server = Server(argv, env, root)
    try:
        wait_healthy(server.process, port, server.stderr)
    except BaseException:
        server.kill()
        raise
    return server, f"http://127.0.0.1:{port}"


def test_serve_api_writes_every_authenticated_request_at_sigterm(aws, auth_service, tmp_path):
    server, base = start_api(aws, auth_service, tmp_path, NEVER)
    try:
        sent, anonymous = 40, 5
        with httpx.Client(base_url=base, timeout=30) as client:
            for n in range(sent):  # authenticated, then the app answers 404: no such platform route
                assert client.get(f"/platform/{n}", headers={"X-API-Key": ACTIVE_KEY}).status_code == 404
            for _ in range(anonymous):  # refused: not authenticated, not counted
                assert client.get("/platform/x").status_code == 401
        exited_cleanly(server, server.terminate())
    finally:
        server.kill()
    documents = server.emf()
    assert total(documents, names.METRIC_AUTH_REQUESTS, AuthPath=names.AUTH_PATH_API_KEY) == sent
    # every caller on 127.0.0.0/8 is "internal" here: a key or not, it should have used a certificate
    assert total(documents, names.METRIC_INTERNAL_API_KEY_REQUESTS) == sent + anonymous
    # the counts are the api's; its client certificate's time left is per identity, as the alarms read it
    assert {d[names.DIM_SERVICE] for d in documents if names.DIM_SERVICE in d} == {names.API_SERVICE}
    assert {d[names.DIM_IDENTITY] for d in documents if names.DIM_SERVICE not in d} == {names.API.name}


def test_serve_api_flushes_on_the_metrics_interval_setting(aws, auth_service, tmp_path):
    """The same HOKUSAI_MTLS_METRICS_SECONDS as serve-mlflow: lines appear while it serves."""
    server, base = start_api(aws, auth_service, tmp_path, "0.5")
    try:
        assert (
            httpx.get(f"{base}/platform/x", headers={"X-API-Key": ACTIVE_KEY}, timeout=30).status_code == 404
        )
        deadline = time.monotonic() + 30  # the interval is 0.5 s: far sooner, unless another is used
        while not server.emf() and time.monotonic() < deadline and server.process.poll() is None:
            time.sleep(0.1)
        documents = server.emf()
        assert total(documents, names.METRIC_AUTH_REQUESTS, AuthPath=names.AUTH_PATH_API_KEY) == 1
        exited_cleanly(server, server.terminate())
    finally:
        server.kill()
    assert total(server.emf(), names.METRIC_AUTH_REQUESTS) == 1  # flushed once, never twice
