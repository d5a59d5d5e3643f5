"""`hokusai-mtls certs revoke` against two running MLflow servers: the revoked certificate is refused
by both within their refresh interval, without a restart, and one that was not revoked keeps working.

Both servers are the MLflow image's command on moto's Secrets Manager; the second runs two worker
processes (its supervisor loads and publishes the set, the workers reload it), as a 2-vCPU task does.
The operator's command runs as a user runs it, against the same Secrets Manager. The worker identity is
revoked: its old certificate must be refused on new connections (counted and logged as `revoked`, with
its serial) and on the next request of a keep-alive connection made before; the fresh leaf it was given
works; the api's certificate never fails.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from local_stack.environment import BIN
from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.certificates.identity import TLSIdentity
from runtime.secrets.secret_store import SecretStore
from tests.integration.conftest import (
    secrets_manager_holding,
    server_environment,
    start_serve_mlflow,
    wait_healthy,
)
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ENV = "staging"
REFRESH_SECONDS = 2.0
PICKUP_ALLOWANCE_SECONDS = 15.0
"""Beyond one refresh interval: the loader's reads of moto and the swap, on a loaded 2-core runner."""
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def client_context(root: Path, name: str, tls: TLSIdentity, bundle) -> ssl.SSLContext:
    combined = root / f"{name}.pem"
    combined.write_bytes(tls.combined_pem())
    combined.chmod(0o600)
    context = ssl.create_default_context(cadata=pem.bundle_pem(bundle).decode())
    context.load_cert_chain(combined)
    return context


def fresh_request(context: ssl.SSLContext, port: int) -> int | str:
    """One request over a new connection (a new handshake): its status, or why it failed."""
    try:
        with httpx.Client(verify=context, timeout=10) as client:
            return client.get(f"https://localhost:{port}{SEARCH}").status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def failures_by_reason(health: int, reason: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{health}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("hokusai_mtls_handshake_failures") and f'reason="{reason}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with secrets_manager_holding(CertificateSet.issue(ENV, server_sans=("localhost", "127.0.0.1"))) as aws:
        yield from _servers(aws, tmp_path_factory.mktemp("revocation"))


def _servers(aws: dict, root: Path):
    """Two serve-mlflow processes on `aws`'s secrets (the second with two workers), stopped after."""
    servers, processes = [], []
    try:
        for index, workers in enumerate((1, 2)):
            port, health = free_port(), free_port()
            env = server_environment(
                aws,
                **{
                    names.ENV_CERT_DIR: str(root / f"server-{index}" / "certs"),
                    names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{root}/mlflow-{index}.db",
                    names.ENV_MLFLOW_ARTIFACTS_DESTINATION: str(root / f"artifacts-{index}"),
                    names.ENV_REFRESH_SECONDS: str(REFRESH_SECONDS),
                    names.ENV_WORKERS: str(workers),
                    "HOKUSAI_MTLS_METRICS_SECONDS": "1",
                },
            )
            log = root / f"server-{index}.log"
            processes.append(start_serve_mlflow(env, port, health, log))
            servers.append({"port": port, "health": health, "log": log})
        for server, process in zip(servers, processes, strict=True):
            wait_healthy(process, server["health"], server["log"])
        yield {**aws, "servers": servers, "root": root}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_a_revoked_certificate_is_refused_by_both_servers_within_the_interval(fleet):
    certificates, root, servers = fleet["set"], fleet["root"], fleet["servers"]
    bundle = certificates.trust_bundle
    worker = certificates.identities["worker"]
    revoked_context = client_context(root, "worker-old", worker, bundle)
    api_context = client_context(root, "api", certificates.identities["api"], bundle)
    for server in servers:
        assert fresh_request(revoked_context, server["port"]) == 200
        assert fresh_request(api_context, server["port"]) == 200
    # A keep-alive connection made before the revocation, to the first server.
    keep_alive = httpx.Client(verify=revoked_context, timeout=10)
    assert keep_alive.get(f"https://localhost:{servers[0]['port']}{SEARCH}").status_code == 200

    revoked_at = time.monotonic()
    result = subprocess.run(
        [str(BIN / "hokusai-mtls"), "certs", "revoke", "--env", ENV, "--identity", "worker"],
        env=server_environment({"endpoint": fleet["endpoint"]}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    serial = f"{worker.certificate.serial_number:x}"
    assert f"revoked serial {serial}" in result.stdout

    refused_after: dict[int, float] = {}
    deadline = revoked_at + REFRESH_SECONDS + PICKUP_ALLOWANCE_SECONDS
    while len(refused_after) < len(servers):
        assert time.monotonic() < deadline, f"still accepted after the interval: {refused_after}"
        for index, server in enumerate(servers):
            if index not in refused_after and fresh_request(revoked_context, server["port"]) != 200:
                refused_after[index] = time.monotonic() - revoked_at
        time.sleep(0.1)
    print(f"revoked certificate refused after {', '.join(f'{s:.1f} s' for s in refused_after.values())}")

    for server in servers:
        statuses = [fresh_request(revoked_context, server["port"]) for _ in range(5)]
        assert 200 not in statuses, statuses  # refused on every new connection, by every worker process
        assert [fresh_request(api_context, server["port"]) for _ in range(10)] == [200] * 10
    try:  # the connection made before: its next request is refused (403) or finds the connection closed
        answer = keep_alive.get(f"https://localhost:{servers[0]['port']}{SEARCH}").status_code
    except httpx.HTTPError:
        answer = "closed"
    assert answer in (403, "closed")
    keep_alive.close()

    fresh = SecretStore(ENV, client=fleet["client"]).fetch_identity(names.WORKER)
    assert fresh.certificate.serial_number != worker.certificate.serial_number
    deadline = time.monotonic() + 30
    for server in servers:  # the identity itself goes on with its fresh leaf
        context = client_context(root, "worker-new", fresh, bundle)
        assert fresh_request(context, server["port"]) == 200

    for server in servers:
        while failures_by_reason(server["health"], names.HANDSHAKE_REVOKED) < 1:
            assert time.monotonic() < deadline, "no handshake counted as revoked"
            time.sleep(0.5)
        text = server["log"].read_text()
        assert re.search(
            rf"refused: revoked \(serial {serial}, subject [^)]*spiffe://hokusai/{ENV}/worker", text
        ), text[-3000:]
        assert "Traceback" not in text
