"""uvicorn with our TLS extension protocol and reloadable context, over real TLS on loopback."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.certificates.files import publish_files
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
from runtime.serving.server import Listener, Serving
from tests.support.servers import echo_tls, free_port, running

pytestmark = pytest.mark.integration
HOST = "mlflow.hokusai-development.local"


def bundle_pem(certificates) -> bytes:
    return b"".join(pem.certificate_pem(c) for c in certificates)


def server_files(directory: Path, server: TLSIdentity, bundle: list) -> ServerFiles:
    """Publish the server's files the way the loader does (one atomic swap)."""
    publish_files(
        directory,
        {
            "tls.crt": (server.certificate_pem(), 0o644),
            "tls.key": (server.private_key_pem(), 0o600),
            "ca.crt": (bundle_pem(bundle), 0o644),
        },
    )
    return ServerFiles.from_directory(directory)


def client_context(trusted: list, identity: TLSIdentity | None, directory: Path) -> ssl.SSLContext:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(bundle_pem(trusted))
    context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    if identity is not None:
        (directory / "tls.pem").write_bytes(identity.combined_pem())
        context.load_cert_chain(directory / "tls.pem")
    return context


def client_for(
    tmp_path: Path, certificates: CertificateSet, service: str | None, name: str = "c"
) -> httpx.Client:
    identity = certificates.identities[service] if service else None
    return httpx.Client(
        verify=client_context(certificates.trust_bundle, identity, tmp_path / name), timeout=10
    )


def served_certificate(port: int, context: ssl.SSLContext) -> x509.Certificate:
    """Handshake on a new connection and return the certificate the server presented."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


@pytest.fixture
def tls_server(tmp_path, development_set):
    tls = ReloadableServerContext(
        server_files(tmp_path / "server", development_set.identities["server"], development_set.trust_bundle)
    )
    port, plain_port = free_port(), free_port()
    serving = Serving(
        [
            Listener("mtls", "127.0.0.1", port, echo_tls, tls),
            Listener("plain", "127.0.0.1", plain_port, echo_tls),
        ]
    )
    with running(serving):
        yield {"tls": tls, "port": port, "plain_port": plain_port}


def url(port: int, host: str = "127.0.0.1") -> str:
    return f"https://{host}:{port}/"


def get(client: httpx.Client, port: int) -> dict:
    # connect to 127.0.0.1 but verify the certificate for the Cloud Map name, as in ECS
    response = client.get(url(port), extensions={"sni_hostname": HOST})
    response.raise_for_status()
    return response.json()


def test_the_app_sees_the_verified_client_certificate(tls_server, tmp_path, development_set):
    with client_for(tmp_path, development_set, "api") as client:
        tls = get(client, tls_server["port"])["tls"]
    assert tls["client_cert_name"] == "CN=api,OU=development,O=Hokusai"
    assert len(tls["client_cert_chain"]) == 1
    assert tls["client_cert_chain"][0].startswith("-----BEGIN CERTIFICATE-----")
    assert tls["tls_version"] in (0x0303, 0x0304)


def test_no_certificate_no_request(tls_server, tmp_path, development_set):
    with client_for(tmp_path, development_set, None) as client, pytest.raises(httpx.TransportError):
        get(client, tls_server["port"])


def test_the_plain_listener_carries_no_tls_extension_whatever_the_headers(tls_server):
    forged = {
        "x-forwarded-client-cert": "Hash=1;URI=spiffe://hokusai/development/api",
        "x-amzn-mtls-clientcert": "x",
    }
    response = httpx.get(f"http://127.0.0.1:{tls_server['plain_port']}/", headers=forged)
    assert response.json() == {"tls": None}


def test_reload_serves_a_new_certificate_without_dropping_a_request(tls_server, tmp_path, development_set):
    tls: ReloadableServerContext = tls_server["tls"]
    failures, done, served = [], threading.Event(), []

    def traffic(service: str) -> None:
        with client_for(tmp_path, development_set, service, name=service) as client:  # keep-alive
            while not done.is_set():
                try:
                    get(client, tls_server["port"])
                    served.append(service)
                except Exception as exc:  # any failure counts
                    failures.append(repr(exc))

    callers = [threading.Thread(target=traffic, args=(s,)) for s in ("api", "worker")]
    for caller in callers:
        caller.start()
    for _ in range(5):
        renewed = development_set.ca.issue_server("development")
        server_files(tmp_path / "server", renewed, development_set.trust_bundle)
        assert tls.reload() is True
        assert tls.certificate == renewed.certificate
        fresh = client_context(
            development_set.trust_bundle, development_set.identities["api"], tmp_path / "f"
        )
        assert served_certificate(tls_server["port"], fresh) == renewed.certificate
    done.set()
    for caller in callers:
        caller.join()
    assert failures == []
    assert len(served) > 20


def test_a_bad_set_is_refused_and_the_good_one_kept(tls_server, tmp_path, development_set):
    tls: ReloadableServerContext = tls_server["tls"]
    before = tls.certificate
    stranger = CertificateSet.issue("development").identities["server"]
    mismatched = TLSIdentity.__new__(TLSIdentity)  # a certificate with another key, as a broken upload
    object.__setattr__(mismatched, "certificate", development_set.identities["server"].certificate)
    object.__setattr__(mismatched, "private_key", stranger.private_key)
    object.__setattr__(mismatched, "source", "broken")
    server_files(tmp_path / "server", mismatched, development_set.trust_bundle)
    assert tls.reload() is False
    assert tls.certificate == before
    with client_for(tmp_path, development_set, "api") as client:
        assert get(client, tls_server["port"])["tls"]["client_cert_name"].startswith("CN=api")


def test_a_ca_removed_from_the_bundle_stops_being_trusted_without_restart(
    tls_server, tmp_path, development_set
):
    successor = CertificateSet.issue("development")
    both = development_set.trust_bundle + successor.trust_bundle
    server = development_set.identities["server"]
    old_api = client_context(both, development_set.identities["api"], tmp_path / "old")
    new_api = client_context(both, successor.identities["api"], tmp_path / "new")
    port, tls = tls_server["port"], tls_server["tls"]

    server_files(tmp_path / "server", server, both)  # rollover step 1: trust both CAs
    assert tls.reload()
    assert served_certificate(port, old_api) == served_certificate(port, new_api) == server.certificate

    server_files(tmp_path / "server", successor.identities["server"], successor.trust_bundle)  # last step
    assert tls.reload()
    assert served_certificate(port, new_api) == successor.identities["server"].certificate
    with httpx.Client(verify=old_api) as stale, pytest.raises(httpx.TransportError):
        get(stale, port)  # refused at the handshake: a client of the removed CA gets no answer
    with httpx.Client(verify=new_api) as current:
        assert get(current, port)["tls"]["client_cert_name"].startswith("CN=api")


@pytest.fixture
def permissive_server(tmp_path, development_set):
    tls = ReloadableServerContext(
        server_files(tmp_path / "server", development_set.identities["server"], development_set.trust_bundle)
    )
    port = free_port()
    with running(Serving([Listener("permissive", "127.0.0.1", port, echo_tls, tls, plain_too=True)])):
        yield port


def test_permissive_serves_tls_and_plain_http_on_one_port(permissive_server, tmp_path, development_set):
    with client_for(tmp_path, development_set, "api") as client:
        assert get(client, permissive_server)["tls"]["client_cert_name"].startswith("CN=api")
    assert httpx.get(f"http://127.0.0.1:{permissive_server}/").json() == {"tls": None}
    anonymous = client_for(tmp_path, development_set, None, name="anonymous")
    with anonymous, pytest.raises(httpx.TransportError):  # TLS still requires a certificate
        get(anonymous, permissive_server)


def test_permissive_closes_a_connection_that_never_speaks(tmp_path, development_set, monkeypatch):
    monkeypatch.setenv("HOKUSAI_MTLS_HEADER_TIMEOUT_SECONDS", "0.2")
    tls = ReloadableServerContext(
        server_files(tmp_path / "server", development_set.identities["server"], development_set.trust_bundle)
    )
    port = free_port()
    with (
        running(Serving([Listener("permissive", "127.0.0.1", port, echo_tls, tls, plain_too=True)])),
        socket.create_connection(("127.0.0.1", port), timeout=5) as silent,
    ):
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed by the server, not left hanging


def test_a_client_context_takes_up_a_rotated_certificate_without_a_restart(
    tls_server, tmp_path, development_set
):
    """What the API service does every refresh: the loader rewrites the files, the context reloads."""
    from runtime.clients.adaptive_client import ClientTLS

    directory = tmp_path / "api-client"
    old = development_set.identities["api"]

    def publish(identity) -> None:
        publish_files(
            directory,
            {
                "ca.crt": (pem.bundle_pem(development_set.trust_bundle), 0o644),
                "tls.pem": (identity.combined_pem(), 0o600),
            },
        )

    publish(old)
    environ = {
        "HOKUSAI_MTLS_SECURITY_LEVEL": "MTLS",
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(directory / "ca.crt"),
        "MLFLOW_TRACKING_CLIENT_CERT_PATH": str(directory / "tls.pem"),
    }
    tls = ClientTLS.from_environ(environ)

    def presented_serial() -> int:
        with httpx.Client(verify=tls.context) as client:  # a new connection: a new handshake
            chain = get(client, tls_server["port"])["tls"]["client_cert_chain"]
        return x509.load_pem_x509_certificate(chain[0].encode()).serial_number

    assert presented_serial() == old.certificate.serial_number
    rotated = development_set.ca.issue_client("development", "api")
    publish(rotated)
    tls.reload()
    assert presented_serial() == rotated.certificate.serial_number
