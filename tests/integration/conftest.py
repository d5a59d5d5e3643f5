"""Fixtures for the integration tests that run our servers as the containers do.

The commands and the task environment come from `local_stack.environment`, shared with
`make local`, so the local stack runs exactly what these tests run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from local_stack.auth_service import FakeAuthService
from local_stack.environment import NotHealthy, container_command, service_environment
from local_stack.environment import wait_healthy as _wait_healthy
from runtime import names
from runtime.certificates.certset import CertificateSet
from runtime.secrets.secret_store import SecretStore
from tests.support.servers import free_port

ENV = "staging"
WORKERS = 1
"""Worker processes per server, as the stacks configure today's task sizes; tests/integration/test_workers.py
runs 2, as a 2-vCPU task does."""
SCOPES = {
    "api": ["mlflow:read", "mlflow:write"],
    "worker": ["mlflow:read", "mlflow:write"],
    "reporter": ["mlflow:read"],
}


def wait_healthy(process: subprocess.Popen, port: int, log: Path, seconds: float = 90) -> dict:
    """`local_stack.environment.wait_healthy`, failing the test (and killing the server) instead."""
    try:
        return _wait_healthy(process, port, log, seconds)
    except NotHealthy as exc:
        process.kill()
        pytest.fail(str(exc))


def server_environment(aws: dict, **extra: str) -> dict[str, str]:
    """What an ECS task of ours gets in the staging tests, pointed at moto's Secrets Manager."""
    return service_environment(
        ENV,
        aws["endpoint"],
        **{
            names.ENV_INTERNAL_CIDRS: "127.0.0.0/8",
            names.ENV_SERVICE_SCOPES: json.dumps(SCOPES),
            names.ENV_WORKERS: str(WORKERS),  # whatever this machine has
            **extra,
        },
    )


def loopback_options(port: int, health: int) -> list[str]:
    """serve-mlflow's options for a test: 127.0.0.1, the given port and health port."""
    return ["--host", "127.0.0.1", "--port", str(port), "--health-port", str(health)]


def start_serve_mlflow(env: dict[str, str], port: int, health: int, log: Path) -> subprocess.Popen:
    """`docker/Dockerfile.mlflow`'s command on 127.0.0.1 (test-only ports), its output into `log`."""
    with log.open("w") as output:
        return subprocess.Popen(
            [*container_command("Dockerfile.mlflow"), *loopback_options(port, health)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def secretsmanager_at(endpoint: str):
    """A boto3 Secrets Manager client of moto's server at `endpoint` (its fake credentials)."""
    return boto3.client(
        "secretsmanager",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@contextlib.contextmanager
def secrets_manager_holding(certificates: CertificateSet):
    """moto's Secrets Manager over HTTP holding `certificates` as `certs upload` stores them, and the
    stacks' empty `ca-crl` shell: {"endpoint", "client", "set"}; stopped on exit.

    moto's state is per process, not per server: it is reset first, so nothing another module stored
    (another CA's revocation lists, say) is found here."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        httpx.post(f"{endpoint}/moto-api/reset", timeout=10).raise_for_status()
        client = secretsmanager_at(endpoint)
        SecretStore(certificates.environment, client=client).upload(certificates)
        client.create_secret(Name=names.secret_name(certificates.environment, names.CA_REVOCATIONS_SECRET))
        yield {"endpoint": endpoint, "client": client, "set": certificates}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """moto's Secrets Manager over HTTP, holding a verified staging set (module-wide)."""
    with secrets_manager_holding(CertificateSet.issue(ENV, server_sans=("localhost", "127.0.0.1"))) as aws:
        yield aws


@pytest.fixture(scope="module")
def mlflow_server(aws, tmp_path_factory):
    """`docker/Dockerfile.mlflow`'s command, run here as ECS runs it (test-only ports added)."""
    root = tmp_path_factory.mktemp("mlflow")
    port, health = free_port(), free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{root}/mlflow.db",
            names.ENV_MLFLOW_ARTIFACTS_DESTINATION: str(root / "artifacts"),
            "HOKUSAI_MTLS_METRICS_SECONDS": "1",
            "HOKUSAI_MTLS_REFRESH_SECONDS": "1",
        },
    )
    log = root / "server.log"
    process = start_serve_mlflow(env, port, health, log)
    report = wait_healthy(process, health, log)
    yield {"port": port, "health": health, "report": report, "log": log, "root": root}
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def auth_service():
    """The external auth service's test double (we do not own the real one), module-wide."""
    service = FakeAuthService()
    with service.serving() as base_url:
        service.base_url = base_url
        yield service
