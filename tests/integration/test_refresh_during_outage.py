"""A Secrets Manager outage while `serve-mlflow` runs in development: it keeps its certificate.

The outside fault run stopped Secrets Manager under a development server; the next refresh ran
the start-up fallback, swapped in a certificate from a fresh development CA, and 42 of 61
handshakes of existing clients failed. Here the real server (the MLflow image's command)
loads from moto's server, moto stops, refreshes fail for several intervals, and every client
handshake still succeeds against the same serial; no development CA is made.
"""

from __future__ import annotations

import ssl
import time

import httpx
import pytest
from moto.server import ThreadedMotoServer

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.secrets.secret_store import SecretStore
from tests.integration.conftest import secretsmanager_at, start_serve_mlflow, wait_healthy
from tests.support.servers import free_port

pytestmark = pytest.mark.integration

REFRESHES_TO_SEE = 3


def _health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()


def test_an_outage_keeps_the_served_certificate_and_every_handshake_succeeds(tmp_path):
    from local_stack.environment import service_environment

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, moto_port = moto.get_host_and_port()
    endpoint = f"http://{host}:{moto_port}"
    certificates = CertificateSet.issue("development", server_sans=("localhost", "127.0.0.1"))
    client = SecretStore("development", client=secretsmanager_at(endpoint))
    client.upload(certificates)

    port, health = free_port(), free_port()
    env = service_environment(
        "development",
        endpoint,
        **{
            names.ENV_CERT_DIR: str(tmp_path / "certs"),
            names.ENV_DEV_CA_DIR: str(tmp_path / "dev-ca"),
            names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{tmp_path}/mlflow.db",
            names.ENV_MLFLOW_ARTIFACTS_DESTINATION: str(tmp_path / "artifacts"),
            names.ENV_REFRESH_SECONDS: "0.5",
            names.ENV_SECRETS_BUDGET_SECONDS: "2",
            names.ENV_INTERNAL_CIDRS: "127.0.0.0/8",
        },
    )
    log = tmp_path / "server.log"
    process = start_serve_mlflow(env, port, health, log)
    try:
        first = wait_healthy(process, health, log)
        serial = first["certificate"]["serial"]
        api = certificates.identities["api"]
        (tmp_path / "api.crt").write_bytes(api.certificate_pem())
        (tmp_path / "api.key").write_bytes(api.private_key_pem())
        context = ssl.create_default_context(cadata=pem.bundle_pem(certificates.trust_bundle).decode())
        context.load_cert_chain(tmp_path / "api.crt", tmp_path / "api.key")

        moto.stop()  # the outage
        deadline = time.monotonic() + 60
        while (
            log.read_text().count("[secret-store-unavailable]") < REFRESHES_TO_SEE
        ):  # refreshes that failed to fetch
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)

        failed = 0
        for _ in range(30):  # a new connection, so a new handshake, every time
            try:
                with httpx.Client(verify=context, timeout=10) as mtls:
                    mtls.get(f"https://localhost:{port}/api/2.0/mlflow/experiments/search?max_results=1")
            except httpx.HTTPError:
                failed += 1
        assert failed == 0, log.read_text()[-3000:]
        assert _health(health)["certificate"]["serial"] == serial
        text = log.read_text()
        assert "DEVELOPMENT FALLBACK" not in text and not (tmp_path / "dev-ca").exists()
        assert "refresh-failed" in text and "Traceback" not in text
    finally:
        process.terminate()
        process.wait(timeout=30)
        moto.stop()
