"""The API service image's command, run here: external API key in, MLflow over mTLS out.

`docker/Dockerfile.api`'s ENTRYPOINT + CMD (`hokusai-mtls serve-api`) in its own process,
with the certificates from Secrets Manager (moto), the auth service's test double, and the
real MLflow server of `docker/Dockerfile.mlflow` behind strict mTLS.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time

import httpx
import pytest

from local_stack.auth_service import ACTIVE_KEY
from runtime import names
from runtime.certificates import pem
from tests.integration.conftest import WORKERS, container_command, server_environment, wait_healthy
from tests.support.servers import free_port
from tests.support.slow_clients import HALF_HEADERS, closed_within

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def api(aws, mlflow_server, auth_service, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    port = free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_AUTH_SERVICE_URL: auth_service.base_url,
            "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{mlflow_server['port']}",
            names.ENV_REFRESH_SECONDS: "1",
            names.ENV_HEADER_TIMEOUT_SECONDS: "2",
            names.ENV_METRICS_SECONDS: "1",
        },
    )
    log = root / "api.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    report = wait_healthy(process, port, log)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "report": report, "log": log}
    process.terminate()
    process.wait(timeout=20)


SEARCH = "/mlflow/api/2.0/mlflow/experiments/search?max_results=5"


def test_health_needs_no_key_and_reports_the_level(api):
    assert api["report"]["status"] == "ok"
    assert api["report"]["security_level"] == "MTLS"
    assert api["report"]["certificate"]["days_left"] == 0  # a 24-hour leaf
    assert 20 < api["report"]["certificate"]["hours_left"] <= 24


def test_the_container_health_check_command_passes(api):
    result = subprocess.run(
        [*container_command("Dockerfile.api")[:1], "health", "--port", str(api["port"])],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_external_key_through_the_api_reaches_mlflow_over_mtls(api, auth_service):
    calls_before = auth_service.calls
    created = httpx.post(
        f"{api['url']}/mlflow/api/2.0/mlflow/experiments/create",
        json={"name": "via-api-proxy"},
        headers={"X-API-Key": ACTIVE_KEY},
        timeout=30,
    )
    assert created.status_code == 200, created.text
    found = httpx.get(f"{api['url']}{SEARCH}", headers={"Authorization": f"Bearer {ACTIVE_KEY}"}, timeout=30)
    assert found.status_code == 200
    assert "via-api-proxy" in {e["name"] for e in found.json()["experiments"]}
    # the API validated the key once per worker process at most (then each worker's in-memory cache;
    # with REDIS_URL they share one); MLflow, reached with the API's certificate, never needed the
    # auth service (it has none configured at all)
    assert auth_service.calls - calls_before <= WORKERS
    assert found.headers["x-request-id"]


def test_no_key_no_entry(api):
    assert httpx.get(f"{api['url']}{SEARCH}", timeout=30).status_code == 401


def test_mlflow_still_refuses_direct_callers_without_a_certificate(mlflow_server, aws):
    context = ssl.create_default_context(cadata=pem.bundle_pem(aws["set"].trust_bundle).decode())
    with pytest.raises(httpx.TransportError):
        httpx.get(
            f"https://127.0.0.1:{mlflow_server['port']}/api/2.0/mlflow/experiments/search",
            verify=context,
            timeout=10,
        )


def test_the_api_port_closes_silent_and_half_sent_connections_and_outlasts_the_alb(api):
    for sent in (b"", HALF_HEADERS):
        with socket.create_connection(("127.0.0.1", api["port"]), timeout=5) as sock:
            sock.sendall(sent)
            opened = time.monotonic()
            elapsed, data = closed_within(sock, 2 + 2, since=opened)
        assert elapsed is not None, f"{sent!r} held the API port past its header timeout"
        assert data.startswith(b"HTTP/1.1 408 ") == bool(sent)
    started = api["log"].read_text()
    assert "keep-alive 65 s" in started  # longer than the ALB's 60 s idle timeout


def test_zz_a_rotated_api_identity_is_used_without_a_restart(api, aws):
    """Runs last in this module: it rotates the API's certificate in Secrets Manager."""
    rotated = aws["set"].ca.issue_client("staging", "api")
    aws["client"].put_secret_value(
        SecretId=names.identity_secret_name("staging", names.API), SecretString=rotated.to_secret_string()
    )
    expected, deadline, serial = f"{rotated.certificate.serial_number:x}", time.monotonic() + 20, None
    while time.monotonic() < deadline and serial != expected:
        time.sleep(0.3)
        serial = httpx.get(f"{api['url']}/health", timeout=10).json()["certificate"]["serial"]
    assert serial == expected
    answer = httpx.get(f"{api['url']}{SEARCH}", headers={"X-API-Key": ACTIVE_KEY}, timeout=30)
    assert answer.status_code == 200  # MLflow (strict mTLS) accepts the new certificate


def test_it_publishes_the_time_left_of_the_client_certificate_it_holds(api):
    """The api's leaf alarms read CertificateHoursToExpiry{Identity=api}: from its tasks too, so a task
    whose refresh stopped pages even while the secret itself is rotated in time."""
    deadline = time.monotonic() + 30
    while True:
        documents = [
            json.loads(line)
            for line in api["log"].read_text().splitlines()
            if line.startswith("{") and names.METRIC_CERT_HOURS_TO_EXPIRY in line
        ]
        if documents or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert documents, api["log"].read_text()[-2000:]
    latest = documents[-1]
    assert latest[names.DIM_IDENTITY] == names.API.name and latest[names.DIM_ENVIRONMENT] == "staging"
    assert 0 < latest[names.METRIC_CERT_HOURS_TO_EXPIRY] <= 24
