"""The adaptive client's SSL context per security level, checked by real in-memory handshakes.

Every level verifies the server and its name; the level only decides what the client presents
and which CAs it trusts. A file that the declared level needs and cannot have is an error.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.clients.adaptive_client import (
    DEFAULT_TIMEOUT,
    ClientTLS,
    create_adaptive_client,
    create_adaptive_sync_client,
)
from runtime.errors import ClientConfigError, MtlsError
from runtime.secrets.loader import LoaderSettings, load_certificates
from runtime.secrets.secret_store import SecretStore
from runtime.security_level import SecurityLevel

HOST = names.mlflow_hostname("development")
LEVEL = names.ENV_SECURITY_LEVEL
CLIENT_CERT = names.ENV_MLFLOW_CLIENT_CERT
SERVER_CERT = names.ENV_MLFLOW_SERVER_CERT


def write_client_files(
    directory: Path, certificates: CertificateSet, service: str = "api"
) -> dict[str, Path]:
    """The files the loader writes for a client role: ca.crt and the combined tls.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "ca": directory / names.CA_BUNDLE_FILE,
        "pem": directory / names.COMBINED_PEM_FILE,
        "crt": directory / names.CERT_FILE,
    }
    files["ca"].write_bytes(pem.bundle_pem(certificates.trust_bundle))
    files["pem"].write_bytes(certificates.identities[service].combined_pem())
    files["crt"].write_bytes(certificates.identities[service].certificate_pem())
    return files


def mtls_environ(files: dict[str, Path]) -> dict[str, str]:
    return {LEVEL: "MTLS", CLIENT_CERT: str(files["pem"]), SERVER_CERT: str(files["ca"])}


def server_context(directory: Path, certificates: CertificateSet, verify: int) -> ssl.SSLContext:
    directory.mkdir(parents=True, exist_ok=True)
    server = certificates.identities["server"]
    (directory / "server.crt").write_bytes(server.certificate_pem())
    (directory / "server.key").write_bytes(server.private_key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    context.load_verify_locations(cadata=pem.bundle_pem(certificates.trust_bundle).decode())
    context.verify_mode = verify
    return context


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str = HOST) -> bytes | None:
    """A complete TLS handshake in memory; returns the client certificate the server verified."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(client_in, client_out, server_hostname=hostname)
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    pending = {client_side, server_side}
    for _ in range(20):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.discard(side)
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if not pending:
            return server_side.getpeercert(binary_form=True)
    raise AssertionError("the handshake did not finish")


@pytest.fixture
def client_files(tmp_path, development_set) -> dict[str, Path]:
    return write_client_files(tmp_path / "client", development_set)


@pytest.fixture
def strict_server(tmp_path, development_set) -> ssl.SSLContext:
    return server_context(tmp_path / "server", development_set, ssl.CERT_REQUIRED)


def assert_verifies(context: ssl.SSLContext) -> None:
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def ca_serials(context: ssl.SSLContext) -> set[int]:
    return {int(ca["serialNumber"], 16) for ca in context.get_ca_certs()}


# --- each level -------------------------------------------------------------------------
def test_mtls_trusts_only_the_bundle_and_presents_the_identity(client_files, strict_server, development_set):
    tls = ClientTLS.from_environ(mtls_environ(client_files))
    assert tls.level is SecurityLevel.MTLS
    assert (tls.ca_bundle, tls.client_certificate) == (client_files["ca"], client_files["pem"])
    assert_verifies(tls.context)
    assert ca_serials(tls.context) == {development_set.trust_bundle[0].serial_number}  # no system CAs
    presented = handshake(tls.context, strict_server)
    assert presented == development_set.identities["api"].certificate.public_bytes(Encoding.DER)


def test_tls_trusts_the_bundle_and_presents_nothing(client_files, tmp_path, development_set, strict_server):
    tls = ClientTLS.from_environ({LEVEL: "TLS", SERVER_CERT: str(client_files["ca"])})
    assert (tls.level, tls.client_certificate) == (SecurityLevel.TLS, None)
    assert_verifies(tls.context)
    assert ca_serials(tls.context) == {development_set.trust_bundle[0].serial_number}
    optional = server_context(tmp_path / "optional", development_set, ssl.CERT_OPTIONAL)
    assert handshake(tls.context, optional) is None  # the server is verified, we stay anonymous
    with pytest.raises(ssl.SSLError):
        handshake(tls.context, strict_server)


def test_insecure_still_verifies_against_the_system_store(development_set, strict_server):
    tls = ClientTLS.from_environ({LEVEL: "INSECURE"})
    assert (tls.level, tls.ca_bundle, tls.client_certificate) == (SecurityLevel.INSECURE, None, None)
    assert_verifies(tls.context)
    assert development_set.trust_bundle[0].serial_number not in ca_serials(tls.context)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(tls.context, strict_server)  # our private CA is no public CA: refused, not ignored


def test_the_tls_bundle_falls_back_to_the_hokusai_variable(client_files):
    tls = ClientTLS.from_environ({LEVEL: "TLS", names.ENV_CA_BUNDLE_FILE: str(client_files["ca"])})
    assert tls.ca_bundle == client_files["ca"]


@pytest.mark.parametrize("level", ["MTLS", "TLS", "INSECURE"])
def test_no_level_verifies_less(level, client_files):
    environ = mtls_environ(client_files) | {LEVEL: level.lower()}
    assert_verifies(ClientTLS.from_environ(environ).context)


def test_hostname_is_checked(client_files, strict_server):
    tls = ClientTLS.from_environ(mtls_environ(client_files))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(tls.context, strict_server, hostname=names.mlflow_hostname("production"))


def test_a_server_of_another_ca_is_refused(client_files, tmp_path):
    impostor = server_context(tmp_path / "impostor", CertificateSet.issue("development"), ssl.CERT_NONE)
    tls = ClientTLS.from_environ(mtls_environ(client_files))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(tls.context, impostor)


# --- what the level needs and cannot have ----------------------------------------------------
def unset(files, variable):
    return {k: v for k, v in mtls_environ(files).items() if k != variable}


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("no level", "HOKUSAI_MTLS_SECURITY_LEVEL is not set"),
        ("bad level", "is not a security level"),
        ("no client certificate variable", "needs MLFLOW_TRACKING_CLIENT_CERT_PATH"),
        ("no CA variable", "needs MLFLOW_TRACKING_SERVER_CERT_PATH"),
        ("client certificate missing", "cannot be read"),
        ("CA bundle missing", "cannot be read"),
        ("CA bundle is a directory", "cannot be read"),
        ("CA bundle is not PEM", "not a usable PEM bundle"),
        ("certificate without its key", "unencrypted key in one PEM file"),
        ("key of another certificate", "unencrypted key in one PEM file"),
    ],
)
def test_what_the_level_needs_must_be_there(case, pattern, client_files, tmp_path, development_set):
    environ = mtls_environ(client_files)
    other = CertificateSet.issue("development").identities["api"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(development_set.identities["api"].certificate_pem() + other.private_key_pem())
    environ = {
        "no level": unset(client_files, LEVEL),
        "bad level": environ | {LEVEL: "MAXIMUM"},
        "no client certificate variable": unset(client_files, CLIENT_CERT),
        "no CA variable": unset(client_files, SERVER_CERT),
        "client certificate missing": environ | {CLIENT_CERT: str(tmp_path / "gone.pem")},
        "CA bundle missing": environ | {SERVER_CERT: str(tmp_path / "gone.crt")},
        "CA bundle is a directory": environ | {SERVER_CERT: str(tmp_path)},
        "CA bundle is not PEM": environ | {SERVER_CERT: str(garbage)},
        "certificate without its key": environ | {CLIENT_CERT: str(client_files["crt"])},
        "key of another certificate": environ | {CLIENT_CERT: str(mixed)},
    }[case]
    with pytest.raises(ClientConfigError, match=pattern) as raised:
        create_adaptive_client(environ=environ)
    assert isinstance(raised.value, MtlsError)
    assert raised.value.code == "client-config"


def test_tls_does_not_need_a_client_certificate_and_insecure_needs_nothing(client_files, tmp_path):
    ClientTLS.from_environ({LEVEL: "TLS", SERVER_CERT: str(client_files["ca"]), CLIENT_CERT: ""})
    ClientTLS.from_environ({LEVEL: "INSECURE", SERVER_CERT: str(tmp_path / "gone"), CLIENT_CERT: None})


# --- the httpx clients ---------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["verify", "cert", "transport", "mounts"])
def test_verification_cannot_be_switched_off_by_the_caller(option, client_files):
    with pytest.raises(ValueError, match="the security level decides TLS"):
        create_adaptive_client(environ=mtls_environ(client_files), **{option: False})


def test_async_client_uses_the_context_timeouts_and_keeps_no_cookies(client_files):
    client = create_adaptive_client(
        environ=mtls_environ(client_files), base_url=f"https://{HOST}:5000", headers={"x-service": "api"}
    )
    try:
        assert isinstance(client, httpx.AsyncClient)
        assert client.timeout == DEFAULT_TIMEOUT
        assert (client.timeout.connect, client.timeout.read) == (2.0, 30.0)
        assert client.base_url == httpx.URL(f"https://{HOST}:5000")
        assert client.headers["x-service"] == "api"
        # httpx keeps the context in its connection pool (no public accessor): it must be ours, verifying
        assert_verifies(client._transport._pool._ssl_context)
        assert ca_serials(client._transport._pool._ssl_context)
        request = httpx.Request("GET", f"https://{HOST}:5000/")
        client.cookies.extract_cookies(httpx.Response(200, headers={"set-cookie": "s=1"}, request=request))
        assert not client.cookies
    finally:
        asyncio.run(client.aclose())


def test_options_override_the_defaults_and_the_sync_twin_matches(client_files):
    with create_adaptive_sync_client(environ=mtls_environ(client_files), timeout=0.5) as client:
        assert isinstance(client, httpx.Client)
        assert client.timeout == httpx.Timeout(0.5)
        assert_verifies(client._transport._pool._ssl_context)


def test_the_level_is_logged_once_without_secrets(client_files, caplog):
    caplog.set_level(logging.DEBUG, logger="hokusai_mtls")
    create_adaptive_sync_client(
        environ=mtls_environ(client_files), base_url=f"https://svc:hunter2@{HOST}:5000"
    ).close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "security level MTLS" in lines[0] and str(client_files["pem"]) in lines[0]
    assert f"https://{HOST}:5000" in lines[0]
    assert "hunter2" not in caplog.text and "PRIVATE KEY" not in caplog.text


def test_a_plain_url_with_certificates_is_called_out(client_files, caplog):
    caplog.set_level(logging.WARNING, logger="hokusai_mtls")
    create_adaptive_sync_client(environ=mtls_environ(client_files), base_url=f"http://{HOST}:5080").close()
    assert "plain http:// URL, so no certificate is used" in caplog.text


# --- from the real loader's exports ---------------------------------------------------------------
def test_the_loaders_exports_build_an_mtls_client(secretsmanager, development_set, tmp_path, strict_server):
    store = SecretStore("development", client=secretsmanager)
    store.upload(development_set)
    result = load_certificates(LoaderSettings("development", "api", cert_dir=tmp_path / "api"), store=store)
    tls = ClientTLS.from_environ(result.exports())  # None values (unset) are read as absent
    assert tls.level is SecurityLevel.MTLS
    assert handshake(tls.context, strict_server) is not None


def test_the_rollback_exports_build_a_verifying_client(tmp_path):
    settings = LoaderSettings("staging", "api", enable_mtls=False, cert_dir=tmp_path / "api")
    exports = load_certificates(settings).exports()
    tls = ClientTLS.from_environ(exports)
    assert tls.level is SecurityLevel.INSECURE
    assert_verifies(tls.context)
