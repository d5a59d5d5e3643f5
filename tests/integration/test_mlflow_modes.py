"""The migration modes of serve-mlflow: permissive (old plain port beside mTLS) and off (rollback)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.request

import httpx
import pytest

from local_stack.auth_service import ACTIVE_KEY
from runtime import names
from runtime.certificates import pem
from tests.integration.conftest import container_command, server_environment, wait_healthy
from tests.support.servers import free_port
from tests.support.slow_clients import HALF_HEADERS, closed_within

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
HEADER_TIMEOUT = 2.0
"""Short, so the slow-client checks below are quick; normal requests finish far sooner."""
SLACK = 2.0


def start(aws, auth_service, root, mode: str) -> tuple[subprocess.Popen, dict]:
    ports = {"port": free_port(), "health": free_port()}
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{root}/mlflow.db",
            names.ENV_AUTH_SERVICE_URL: auth_service.base_url,
            names.ENV_MTLS_MODE: mode,
            names.ENV_ENABLE_MTLS: "false" if mode == names.MTLS_MODE_OFF else "true",
            names.ENV_HEADER_TIMEOUT_SECONDS: str(HEADER_TIMEOUT),
            names.ENV_BODY_IDLE_TIMEOUT_SECONDS: str(HEADER_TIMEOUT),
        },
    )
    ports["log"] = root / "server.log"
    with (root / "server.log").open("w") as output:
        process = subprocess.Popen(
            [
                *container_command("Dockerfile.mlflow"),
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["port"]),
                "--health-port",
                str(ports["health"]),
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    ports["report"] = wait_healthy(process, ports["health"], root / "server.log")
    return process, ports


def running(aws, auth_service, tmp_path_factory, mode: str):
    process, ports = start(aws, auth_service, tmp_path_factory.mktemp(mode), mode)
    yield {"mode": mode, **ports}
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def permissive(aws, auth_service, tmp_path_factory):
    yield from running(aws, auth_service, tmp_path_factory, names.MTLS_MODE_PERMISSIVE)


@pytest.fixture(scope="module")
def rollback(aws, auth_service, tmp_path_factory):
    yield from running(aws, auth_service, tmp_path_factory, names.MTLS_MODE_OFF)


def mtls_context(aws) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pem.bundle_pem(aws["set"].trust_bundle).decode())
    api = aws["set"].identities["api"]
    path = aws["tmp"] / "api.pem"
    path.write_bytes(api.combined_pem())
    context.load_cert_chain(str(path))
    return context


@pytest.fixture(scope="module", autouse=True)
def _tmp(aws, tmp_path_factory):
    aws["tmp"] = tmp_path_factory.mktemp("clients")


def metric(server, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server['health']}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_permissive_serves_old_and_new_clients_on_one_port_and_counts_the_old(permissive, aws):
    server = permissive
    plain = f"http://127.0.0.1:{server['port']}{SEARCH}"  # the same port as mTLS: old URLs keep working
    assert httpx.get(plain).status_code == 401
    assert httpx.get(plain, headers={"X-API-Key": ACTIVE_KEY}).status_code == 200
    assert (
        httpx.get(f"https://127.0.0.1:{server['port']}{SEARCH}", verify=mtls_context(aws)).status_code == 200
    )
    assert metric(server, "hokusai_mtls_plain_port_requests_total") == 2
    assert metric(server, "hokusai_mtls_internal_api_key_requests_total") == 2  # 127.0.0.1 is internal here
    assert server["report"]["security_level"] == "MTLS"


def test_off_is_plain_http_with_the_api_key_path_only(rollback, aws):
    server = rollback
    url = f"http://127.0.0.1:{server['port']}{SEARCH}"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-API-Key": ACTIVE_KEY}).status_code == 200
    with pytest.raises(httpx.TransportError):
        httpx.get(f"https://127.0.0.1:{server['port']}{SEARCH}", verify=mtls_context(aws))
    assert server["report"]["security_level"] == "INSECURE"


def half_request_closed(sock: socket.socket) -> bytes:
    """Send half the headers; the answer the server gives before it closes (failing if it does not)."""
    sock.sendall(HALF_HEADERS)
    sent = time.monotonic()
    elapsed, data = closed_within(sock, HEADER_TIMEOUT + SLACK, since=sent)
    assert elapsed is not None, "half a request held the connection past the header timeout"
    return data


def silent_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        opened = time.monotonic()
        assert closed_within(sock, HEADER_TIMEOUT + SLACK, since=opened)[0] is not None, port


def test_off_closes_silent_and_half_sent_connections_on_every_port(rollback):
    for port in (rollback["port"], rollback["health"]):
        silent_closed(port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert half_request_closed(sock).startswith(b"HTTP/1.1 408 ")
    assert "open files: room for about" in rollback["log"].read_text()


def test_permissive_closes_half_requests_on_both_branches(permissive, aws):
    with socket.create_connection(("127.0.0.1", permissive["port"]), timeout=5) as plain:
        assert half_request_closed(plain).startswith(b"HTTP/1.1 408 ")
    raw = socket.create_connection(("127.0.0.1", permissive["port"]), timeout=5)
    with mtls_context(aws).wrap_socket(raw, server_hostname="localhost") as tls:  # after the handshake
        assert half_request_closed(tls).startswith(b"HTTP/1.1 408 ")
    silent_closed(permissive["port"])
