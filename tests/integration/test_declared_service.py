"""A platform's own service, declared as data, in an environment named `qa` (issue 15).

`hokusai-mtls serve --app` runs as the declared `streaming` service: ECS's environment (ENVIRONMENT=qa,
HOKUSAI_MTLS_SERVICES, HOKUSAI_MTLS_ROLE=streaming, HOKUSAI_MTLS_PORT), its certificates from moto's
Secrets Manager. It serves its own leaf (its Cloud Map name, both usages) and knows exactly the callers
the declaration gives it: the worker's certificate, signed by the same CA, names no one there.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from moto.server import ThreadedMotoServer
from wsproto.events import AcceptConnection, RejectConnection

from local_stack.environment import BIN, service_environment
from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.secrets.secret_store import SecretStore
from runtime.service_catalog import parse_catalog
from tests.integration.conftest import secretsmanager_at, wait_healthy
from tests.integration.test_websockets_mtls import Client
from tests.support.servers import free_port
from tests.unit.test_service_catalog import PLATFORM

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CATALOG = parse_catalog(PLATFORM)
HOSTNAME = "streaming.hokusai-qa.local"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, moto_port = moto.get_host_and_port()
    endpoint = f"http://{host}:{moto_port}"
    certificates = CertificateSet.issue(
        "qa", identities=CATALOG.identities, server_sans=("localhost", "127.0.0.1")
    )
    SecretStore("qa", client=secretsmanager_at(endpoint), catalog=CATALOG).upload(certificates)
    root = tmp_path_factory.mktemp("streaming")
    port, health = free_port(), free_port()  # not port + 1 (the default): another socket may hold it
    env = service_environment(
        "qa",
        endpoint,
        **{
            names.ENV_SERVICES: CATALOG.to_json(),
            names.ENV_INTERNAL_CIDRS: "127.0.0.0/8",
            names.ENV_ROLE: "streaming",
            names.ENV_PORT: str(port),
            names.ENV_HEALTH_PORT: str(health),
            names.ENV_CERT_DIR: str(root / "certs"),
            "PYTHONPATH": str(ROOT),
        },
    )
    log = root / "server.log"
    with log.open("w") as output:
        command = [
            str(BIN / "hokusai-mtls"),
            "serve",
            "--app",
            "tests.support.ws_app:app",
            "--host",
            "127.0.0.1",
        ]
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    report = wait_healthy(process, health, log)
    contexts = {}
    for name in ("api", "worker"):
        context = ssl.create_default_context(cadata=pem.bundle_pem(certificates.trust_bundle).decode())
        combined = root / f"{name}.pem"
        combined.write_bytes(certificates.identities[name].combined_pem())
        combined.chmod(0o600)
        context.load_cert_chain(str(combined))
        contexts[name] = context
    yield {"port": port, "report": report, "contexts": contexts, "set": certificates, "log": log}
    process.terminate()
    assert process.wait(timeout=20) == 0
    moto.stop()


def test_it_serves_its_own_leaf_under_its_cloud_map_name(platform):
    served = platform["set"].identities["streaming"].certificate
    assert platform["report"]["certificate"]["serial"] == f"{served.serial_number:x}"
    # The name its callers dial (Cloud Map) is the one its certificate is verified for.
    raw = socket.create_connection(("127.0.0.1", platform["port"]), timeout=10)
    with platform["contexts"]["api"].wrap_socket(raw, server_hostname=HOSTNAME) as tls:
        assert tls.getpeercert()["subjectAltName"][0] == ("DNS", HOSTNAME)
    with httpx.Client(verify=platform["contexts"]["api"], timeout=10) as client:
        response = client.get(f"https://127.0.0.1:{platform['port']}/whoami")
    assert response.status_code == 200
    assert response.json() == {"service_id": "api", "auth_path": names.AUTH_PATH_MTLS}


def test_a_declared_caller_streams_and_an_undeclared_one_from_the_same_ca_is_refused(platform):
    allowed = Client(platform["port"], platform["contexts"]["api"], "/stream")
    try:
        assert isinstance(allowed.event(), AcceptConnection)
        assert json.loads(allowed.text())["hello"]["service_id"] == "api"
    finally:
        allowed.close()
    refused = Client(platform["port"], platform["contexts"]["worker"], "/stream")
    try:
        event = refused.event()
        assert isinstance(event, RejectConnection) and event.status_code == 403, event
    finally:
        refused.close()
    with httpx.Client(verify=platform["contexts"]["worker"], timeout=10) as client:
        assert client.get(f"https://127.0.0.1:{platform['port']}/whoami").status_code in (401, 403)
    assert "Traceback" not in platform["log"].read_text()
