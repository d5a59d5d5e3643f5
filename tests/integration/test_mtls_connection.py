"""Issued certificates in real mutual TLS handshakes on the loopback, and `openssl verify`.

The files come from the loader (`load_certificates` against moto), exactly as the MLflow
server and the API service would get them: tls.crt/tls.key/ca.crt on the server side,
the combined tls.pem plus ca.crt on the client side (MLflow's two variables).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from runtime.certificates.certset import CertificateSet
from runtime.certificates.issuance import KeyType
from runtime.secrets.loader import LoaderSettings, load_certificates
from runtime.secrets.secret_store import SecretStore
from tests.support.tls import client_context, exchange, serving

HOST = "mlflow.hokusai-development.local"
pytestmark = pytest.mark.integration


@pytest.fixture
def loaded(secretsmanager, development_set, tmp_path):
    """Server and api certificate directories, written by the loader from Secrets Manager (moto)."""
    store = SecretStore("development", client=secretsmanager)
    store.upload(development_set)
    out = {}
    for role in ("mlflow-server", "api", "worker"):
        result = load_certificates(LoaderSettings("development", role, cert_dir=tmp_path / role), store=store)
        out[role] = {k: v for k, v in result.exports().items() if v}
    return out


def server_files(loaded):
    s = loaded["mlflow-server"]
    return (
        s["HOKUSAI_MTLS_SERVER_CERT_FILE"],
        s["HOKUSAI_MTLS_SERVER_KEY_FILE"],
        s["HOKUSAI_MTLS_CA_BUNDLE_FILE"],
    )


def mlflow_client_context(exports) -> ssl.SSLContext:
    return client_context(
        exports["MLFLOW_TRACKING_SERVER_CERT_PATH"], exports["MLFLOW_TRACKING_CLIENT_CERT_PATH"]
    )


@pytest.mark.parametrize("service", ["api", "worker"])
def test_each_service_completes_mutual_tls_and_the_server_knows_who_called(loaded, service):
    with serving(*server_files(loaded)) as server:
        answer = exchange(server.port, mlflow_client_context(loaded[service]), HOST)
    assert answer == f"spiffe://hokusai/development/{service}".encode()
    assert server.outcomes[-1].error is None


def test_a_client_without_a_certificate_is_refused(loaded):
    ca_only = client_context(loaded["api"]["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    with serving(*server_files(loaded)) as server, pytest.raises((ssl.SSLError, ConnectionError)):
        exchange(server.port, ca_only, HOST)
    assert "certificate" in server.outcomes[-1].error.lower()


def test_a_client_with_a_foreign_cas_certificate_is_refused(loaded, tmp_path):
    foreign = CertificateSet.issue("development")
    foreign.write_to_dir(tmp_path / "foreign")
    context = client_context(
        loaded["api"]["MLFLOW_TRACKING_SERVER_CERT_PATH"],
        str(tmp_path / "foreign" / "api.crt"),
        str(tmp_path / "foreign" / "api.key"),
    )
    with serving(*server_files(loaded)) as server, pytest.raises((ssl.SSLError, ConnectionError)):
        exchange(server.port, context, HOST)
    assert "certificate verify failed" in server.outcomes[-1].error


def test_tls12_clients_are_refused_at_the_handshake_too(loaded):
    ca_only = client_context(loaded["api"]["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    ca_only.maximum_version = ssl.TLSVersion.TLSv1_2
    with serving(*server_files(loaded)) as server, pytest.raises(ssl.SSLError):
        exchange(server.port, ca_only, HOST)
    assert server.outcomes[-1].error


def test_the_client_refuses_a_server_from_another_ca(loaded, tmp_path):
    impostor = CertificateSet.issue("development")
    impostor.write_to_dir(tmp_path / "impostor")
    d = tmp_path / "impostor"
    with (
        serving(str(d / "server.crt"), str(d / "server.key"), str(d / "ca.crt")) as server,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        exchange(server.port, mlflow_client_context(loaded["api"]), HOST)


def test_the_client_refuses_a_server_certificate_for_another_name(loaded):
    with (
        serving(*server_files(loaded)) as server,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        exchange(server.port, mlflow_client_context(loaded["api"]), "mlflow.hokusai-production.local")


@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.RSA_2048], ids=lambda k: k.value)
def test_openssl_verify_accepts_every_chain_for_its_purpose(tmp_path, key_type):
    if shutil.which("openssl") is None:  # .ci/run installs it: a missing one fails, never skips
        pytest.fail("the openssl CLI is missing: apt-get install -y openssl", pytrace=False)
    CertificateSet.issue("staging", key_type=key_type).write_to_dir(tmp_path)

    def openssl_verify(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "ca.crt"), *args],
            capture_output=True,
            text=True,
            check=False,
        )

    server = openssl_verify(
        "-purpose",
        "sslserver",
        "-verify_hostname",
        "mlflow.hokusai-staging.local",
        str(tmp_path / "server.crt"),
    )
    assert server.returncode == 0, server.stderr
    for service in ("api", "worker"):
        result = openssl_verify("-purpose", "sslclient", str(tmp_path / f"{service}.crt"))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{tmp_path / service}.crt: OK"
    wrong_purpose = openssl_verify("-purpose", "sslserver", str(tmp_path / "api.crt"))
    assert wrong_purpose.returncode != 0


def test_the_loaders_combined_pem_is_one_file_requests_can_use(loaded):
    combined = Path(loaded["api"]["MLFLOW_TRACKING_CLIENT_CERT_PATH"]).read_text()
    assert combined.count("BEGIN CERTIFICATE") == 1 and combined.count("BEGIN PRIVATE KEY") == 1
    ssl.create_default_context().load_cert_chain(loaded["api"]["MLFLOW_TRACKING_CLIENT_CERT_PATH"])
