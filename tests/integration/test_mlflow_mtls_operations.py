"""A real MLflow tracking server behind strict mTLS, used by MLflow's own client (the seed's file).

The server is `hokusai-mtls serve-mlflow` in its own process, loading its certificates from
Secrets Manager (moto's server) exactly as in ECS. The client side uses nothing but the two
variables the loader exports (`MLFLOW_TRACKING_CLIENT_CERT_PATH`, `MLFLOW_TRACKING_SERVER_CERT_PATH`).
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.secrets.loader import LoaderSettings, load_certificates
from runtime.secrets.secret_store import SecretStore
from tests.support.certs import days_ago

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ENV = "staging"
SCOPES = {
    "api": ["mlflow:read", "mlflow:write"],
    "worker": ["mlflow:read", "mlflow:write"],
    "reporter": ["mlflow:read"],
}


def client_env(aws, tmp_path: Path, role: str = "api") -> dict[str, str]:
    """What `hokusai-mtls run --role api` would export, loaded from the same Secrets Manager."""
    store = SecretStore(ENV, client=aws["client"])
    result = load_certificates(LoaderSettings(ENV, role, cert_dir=tmp_path / role), store=store)
    return {k: v for k, v in result.exports().items() if v}


@pytest.fixture
def mlflow_client(mlflow_server, aws, tmp_path, monkeypatch):
    for name, value in client_env(aws, tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://127.0.0.1:{mlflow_server['port']}")
    import mlflow

    mlflow.set_tracking_uri(f"https://127.0.0.1:{mlflow_server['port']}")
    return mlflow


def test_health_reports_level_and_expiry_on_the_loopback_port(mlflow_server, aws):
    report = mlflow_server["report"]
    assert report["status"] == "ok" and report["security_level"] == "MTLS" and report["mode"] == "strict"
    served = aws["set"].identities["server"].certificate
    assert report["certificate"]["serial"] == f"{served.serial_number:x}"
    assert report["certificate"]["days_left"] == 0  # a 24-hour leaf: the hours say how much is left
    assert 20 < report["certificate"]["hours_left"] <= 24


def test_the_whole_mlflow_workflow_over_mtls(mlflow_client, tmp_path):
    mlflow = mlflow_client
    from mlflow import MlflowClient

    experiment_id = mlflow.create_experiment(f"mtls-{time.time_ns()}")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_param("alpha", 0.5)
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        artifact = tmp_path / "weights.bin"
        artifact.write_bytes(os.urandom(256 * 1024))
        mlflow.log_artifact(str(artifact))
    client = MlflowClient()
    fetched = client.get_run(run.info.run_id)
    assert fetched.data.params == {"alpha": "0.5"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [
        1.0,
        0.5,
        1 / 3,
        0.25,
        0.2,
    ]
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="weights.bin", dst_path=str(tmp_path / "down")
        )
    )
    assert downloaded.read_bytes() == artifact.read_bytes()
    name = f"model-{time.time_ns()}"
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"runs:/{run.info.run_id}/weights.bin", run_id=run.info.run_id
    )
    assert client.get_model_version(name, version.version).run_id == run.info.run_id


def https_request(port: int, identity: Path | None, ca: Path, path: str, body: dict | None = None):
    """One raw request with a given client certificate (None: none at all)."""
    context = ssl.create_default_context(cafile=str(ca))
    if identity is not None:
        context.load_cert_chain(str(identity))
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
        return response.status, response.read()


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
CREATE = "/api/2.0/mlflow/experiments/create"


def write_identity(tmp_path: Path, identity) -> Path:
    path = tmp_path / "client.pem"
    path.write_bytes(identity.combined_pem())
    return path


@pytest.fixture
def ca_file(aws, tmp_path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_bytes(pem.bundle_pem(aws["set"].trust_bundle))
    return path


def test_the_api_certificate_is_accepted(mlflow_server, aws, tmp_path, ca_file):
    status, _ = https_request(
        mlflow_server["port"], write_identity(tmp_path, aws["set"].identities["api"]), ca_file, SEARCH
    )
    assert status == 200


@pytest.mark.parametrize(
    "make_identity",
    [
        pytest.param(lambda s: None, id="no-certificate"),
        pytest.param(lambda s: CertificateSet.issue(ENV).identities["api"], id="foreign-ca"),
        pytest.param(
            lambda s: s.ca.issue_client(ENV, "api", lifetime_hours=24, now=days_ago(2)), id="expired"
        ),
        pytest.param(lambda s: s.identities["server"], id="server-certificate-as-client"),
    ],
)
def test_refused_at_the_handshake(mlflow_server, aws, tmp_path, ca_file, make_identity):
    identity = make_identity(aws["set"])
    identity_file = write_identity(tmp_path, identity) if identity is not None else None
    with pytest.raises(OSError) as refused:  # noqa: PT011 - SSLError, reset or URLError: which varies
        https_request(mlflow_server["port"], identity_file, ca_file, SEARCH)
    assert not isinstance(refused.value, urllib.error.HTTPError), "refused at the handshake, not by HTTP"


def test_an_identity_without_the_scope_gets_403(mlflow_server, aws, tmp_path, ca_file):
    reporter = write_identity(tmp_path, aws["set"].ca.issue_client(ENV, "reporter"))
    assert https_request(mlflow_server["port"], reporter, ca_file, SEARCH)[0] == 200  # may read
    with pytest.raises(urllib.error.HTTPError) as refused:
        https_request(mlflow_server["port"], reporter, ca_file, CREATE, {"name": "denied"})
    assert refused.value.code == 403


def test_an_unknown_identity_gets_403(mlflow_server, aws, tmp_path, ca_file):
    stranger = write_identity(tmp_path, aws["set"].ca.issue_client(ENV, "intruder"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        https_request(mlflow_server["port"], stranger, ca_file, SEARCH)
    assert refused.value.code == 403


def test_without_an_auth_service_a_request_without_certificate_cannot_reach_mlflow(mlflow_server):
    """The plain health port is loopback-only and serves health, not MLflow."""
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{mlflow_server['health']}{SEARCH}", timeout=5)
    assert missing.value.code == 404


def served_serial(mlflow_server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_server['health']}/health", timeout=5) as response:
        return json.load(response)["certificate"]["serial"]


def wait_for_serial(mlflow_server, expected: str, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if served_serial(mlflow_server) == expected:
            return True
        time.sleep(0.2)
    return False


def test_zz_rotation_under_traffic_drops_nothing_and_a_bad_set_is_refused(mlflow_client, mlflow_server, aws):
    """Runs last in this module: it changes the server's certificate."""
    from mlflow import MlflowClient

    client, failures, done, served = MlflowClient(), [], threading.Event(), [0]

    def traffic() -> None:
        while not done.is_set():
            try:
                client.search_experiments(max_results=1)
                served[0] += 1
            except Exception as exc:  # every failure counts
                failures.append(repr(exc))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        server_secret = names.identity_secret_name(ENV, names.SERVER)
        before = served_serial(mlflow_server)
        aws["client"].put_secret_value(SecretId=server_secret, SecretString="{not json")
        time.sleep(3)  # three refresh intervals: refused each time, the good set stays
        assert served_serial(mlflow_server) == before
        renewed = aws["set"].ca.issue_server(ENV, extra_sans=("localhost", "127.0.0.1"))
        aws["client"].put_secret_value(SecretId=server_secret, SecretString=renewed.to_secret_string())
        assert wait_for_serial(mlflow_server, f"{renewed.certificate.serial_number:x}")
        time.sleep(1)  # traffic on the new certificate too
    finally:
        done.set()
        worker.join(30)
    assert failures == []
    assert served[0] > 20
    assert "certificate reload refused" not in mlflow_server["log"].read_text()  # the loader refused first
    assert "hokusai/staging/mlflow/server-identity" in mlflow_server["log"].read_text()
