"""The server TLS context: its settings, the SNI switch after a reload, and resumed sessions.

Handshakes here run in memory (two `ssl` objects over memory BIOs, no sockets): OpenSSL's real
work, the context's real callback. tests/integration/test_tls_resumption.py does it over sockets.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from runtime.certificates import pem, tls_context
from runtime.certificates.certset import CertificateSet
from runtime.certificates.files import publish_files
from runtime.certificates.tls_context import (
    TICKETS_PER_HANDSHAKE,
    ReloadableServerContext,
    ResumedSessions,
    ServerContext,
    ServerFiles,
)
from tests.support.certs import CLIENT_AUTH

SNI = "localhost"


def publish(directory: Path, certificates: CertificateSet, bundle: list | None = None) -> ServerFiles:
    server = certificates.identities["server"]
    publish_files(
        directory,
        {
            "tls.crt": (server.certificate_pem(), 0o644),
            "tls.key": (server.private_key_pem(), 0o600),
            "ca.crt": (pem.bundle_pem(bundle or certificates.trust_bundle), 0o644),
        },
    )
    return ServerFiles.from_directory(directory)


def client_context(directory: Path, certificates: CertificateSet, service: str = "api") -> ssl.SSLContext:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{service}.pem").write_bytes(certificates.identities[service].combined_pem())
    context = ssl.create_default_context(cadata=pem.bundle_pem(certificates.trust_bundle).decode())
    context.load_cert_chain(directory / f"{service}.pem")
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None):
    """A full or resumed handshake in memory; (server's SSLObject, client's SSLObject).

    The client reads once after the handshake, as a real one reading a response does: that is when a
    TLS 1.3 client takes the server's session tickets.
    """
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(client_in, client_out, server_hostname=SNI, session=session)
    tls_server = server.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(8):
        for name, tls, incoming, outgoing in (
            ("client", tls_client, server_out, client_in),
            ("server", tls_server, client_out, server_in),
        ):
            outgoing.write(incoming.read())
            if not done[name]:
                try:
                    tls.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        if all(done.values()):
            break
    assert all(done.values())
    client_in.write(server_out.read())
    with pytest.raises(ssl.SSLWantReadError):
        tls_client.read(1)
    return tls_server, tls_client


@pytest.fixture
def reloadable(tmp_path, development_set) -> ReloadableServerContext:
    return ReloadableServerContext(publish(tmp_path / "server", development_set))


def test_the_context_keeps_its_security_settings_and_sends_one_ticket(reloadable):
    context = reloadable.front
    assert isinstance(context, ServerContext)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert not context.options & ssl.OP_NO_TICKET  # TLS 1.3 tickets stay stateless (no server-side cache)
    assert context.num_tickets == TICKETS_PER_HANDSHAKE == 1
    assert isinstance(context.resumed_sessions, ResumedSessions)


def test_until_a_reload_the_front_context_serves_and_then_the_callback_switches(
    reloadable, tmp_path, development_set
):
    client = client_context(tmp_path / "client", development_set)
    server, _ = handshake(reloadable.front, client)
    assert reloadable.current is reloadable.front
    assert server.context is reloadable.front  # nothing to switch: no copy of the certificate structures
    assert reloadable.reload()
    assert reloadable.current is not reloadable.front
    server, _ = handshake(reloadable.front, client)
    assert server.context is reloadable.current


def test_the_callback_reports_every_handshake_resumed_ones_too(tmp_path, development_set):
    started = []
    tls = ReloadableServerContext(
        publish(tmp_path / "server", development_set), on_handshake=lambda: started.append(1)
    )
    client = client_context(tmp_path / "client", development_set)
    _, first = handshake(tls.front, client)
    handshake(tls.front, client, first.session)
    assert len(started) == 2


def test_a_resumed_session_presents_the_certificate_of_its_full_handshake(
    reloadable, tmp_path, development_set
):
    api = client_context(tmp_path / "api", development_set, "api")
    worker = client_context(tmp_path / "worker", development_set, "worker")
    full, api_client = handshake(reloadable.front, api)
    assert not full.session_reused
    original = full.getpeercert(binary_form=True)
    assert original == der(development_set.identities["api"].certificate)
    _, worker_client = handshake(reloadable.front, worker)  # another client in between

    resumed, resumed_client = handshake(reloadable.front, api, api_client.session)
    assert resumed.session_reused and resumed_client.session_reused
    assert resumed.getpeercert(binary_form=True) == original
    worker_again, _ = handshake(reloadable.front, worker, worker_client.session)
    assert worker_again.session_reused
    assert worker_again.getpeercert(binary_form=True) != original


def test_one_ticket_resumes_connections_opened_in_parallel(reloadable, tmp_path, development_set):
    client = client_context(tmp_path / "client", development_set)
    _, first = handshake(reloadable.front, client)
    assert first.session.has_ticket
    for _ in range(3):  # the same ticket each time, as connections a pool opens at once would
        resumed, _ = handshake(reloadable.front, client, first.session)
        assert resumed.session_reused


def test_without_tickets_a_tls13_client_cannot_resume(tmp_path, development_set):
    tls = ReloadableServerContext(publish(tmp_path / "server", development_set), session_tickets=0)
    client = client_context(tmp_path / "client", development_set)
    _, first = handshake(tls.front, client)
    assert not first.session.has_ticket
    assert tls.reload() and tls.current.num_tickets == 0  # a reload keeps the choice
    again, _ = handshake(tls.front, client, first.session)
    assert not again.session_reused


def test_a_session_still_resumes_after_a_reload_and_the_new_context_rechecks_it(
    reloadable, tmp_path, development_set
):
    client = client_context(tmp_path / "client", development_set)
    _, first = handshake(reloadable.front, client)
    assert reloadable.reload()  # the ticket keys are the front context's: the session survives
    resumed, _ = handshake(reloadable.front, client, first.session)
    assert resumed.session_reused
    assert resumed.context is reloadable.current
    assert resumed.context.resumed_sessions.admits(resumed.getpeercert(binary_form=True))


def test_after_a_reload_without_its_ca_a_resumed_session_is_not_admitted(
    reloadable, tmp_path, development_set
):
    client = client_context(tmp_path / "client", development_set)
    _, first = handshake(reloadable.front, client)
    successor = CertificateSet.issue("development", server_sans=(SNI,))
    publish(tmp_path / "server", successor)
    assert reloadable.reload()
    # OpenSSL resumes it all the same (no certificate is exchanged): only the re-check refuses it.
    resumed, _ = handshake(reloadable.front, client, first.session)
    assert resumed.session_reused
    assert not resumed.context.resumed_sessions.admits(resumed.getpeercert(binary_form=True))


# --- ResumedSessions on its own ------------------------------------------------------------------
def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.DER)


def leaf_valid(ca, not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    """A client leaf of `ca` with exactly this validity (our issuance refuses to outlive the CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "api")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.ExtendedKeyUsage([CLIENT_AUTH]), critical=False)
        .sign(ca.identity.private_key, hashes.SHA256())
    )


def at(monkeypatch, moment: dt.datetime) -> None:
    monkeypatch.setattr(tls_context, "_now", lambda: moment.timestamp())


def test_a_certificate_of_the_bundle_is_admitted_within_its_validity_only(monkeypatch, development_set):
    api = development_set.identities["api"].certificate
    check = ResumedSessions(development_set.trust_bundle)
    assert check.admits(der(api))
    at(monkeypatch, api.not_valid_after_utc + dt.timedelta(seconds=1))
    assert not check.admits(der(api))  # the remembered answer is a window, not a yes
    at(monkeypatch, api.not_valid_before_utc - dt.timedelta(seconds=1))
    assert not check.admits(der(api))
    at(monkeypatch, api.not_valid_before_utc + dt.timedelta(seconds=1))
    assert check.admits(der(api))


def test_the_window_ends_with_the_ca(monkeypatch, development_set):
    ca = development_set.ca
    ca_end = ca.certificate.not_valid_after_utc
    leaf = leaf_valid(ca, ca.certificate.not_valid_before_utc, ca_end + dt.timedelta(days=30))
    check = ResumedSessions(development_set.trust_bundle)
    at(monkeypatch, ca_end - dt.timedelta(seconds=1))
    assert check.admits(der(leaf))
    at(monkeypatch, ca_end + dt.timedelta(seconds=1))
    assert not check.admits(der(leaf))  # the leaf is still in date, its CA is not


def test_a_certificate_no_ca_of_the_bundle_signed_is_refused(development_set):
    stranger = CertificateSet.issue("development").identities["api"].certificate
    check = ResumedSessions(development_set.trust_bundle)
    assert not check.admits(der(stranger))
    assert not check.admits(der(stranger))  # remembered as never


@pytest.mark.parametrize("value", [None, b"", b"\x30\x03\x02\x01\x01", b"not a certificate"])
def test_nothing_or_garbage_is_refused(development_set, value):
    assert not ResumedSessions(development_set.trust_bundle).admits(value)


def test_what_it_remembers_is_bounded(monkeypatch, development_set):
    monkeypatch.setattr(tls_context, "RESUMED_CERTIFICATES_KEPT", 2)
    check = ResumedSessions(development_set.trust_bundle)
    for service in ("api", "worker", "server"):
        check.admits(der(development_set.identities[service].certificate))
    assert len(check._windows) <= 2


# --- revocations -------------------------------------------------------------------------------
def test_resumed_refusals_name_the_reason_a_full_handshake_would_give(monkeypatch, development_set):
    api = development_set.identities["api"].certificate
    check = ResumedSessions(development_set.trust_bundle)
    assert check.refusal(der(api)) is None
    at(monkeypatch, api.not_valid_after_utc + dt.timedelta(seconds=1))
    assert check.refusal(der(api)) == "expired"
    at(monkeypatch, api.not_valid_before_utc - dt.timedelta(seconds=1))
    assert check.refusal(der(api)) == "not_yet_valid"
    stranger = CertificateSet.issue("development").identities["api"].certificate
    assert check.refusal(der(stranger)) == "unknown_ca"
    assert check.refusal(None) == "no_certificate"


def publish_revocations(files: ServerFiles, certificates: CertificateSet, crls) -> None:
    """The set again, with `crl.pem` (the loader's file), in one swap."""
    server = certificates.identities["server"]
    publish_files(
        files.certificate.parent,
        {
            "tls.crt": (server.certificate_pem(), 0o644),
            "tls.key": (server.private_key_pem(), 0o600),
            "ca.crt": (pem.bundle_pem(certificates.trust_bundle), 0o644),
            "crl.pem": (pem.crls_pem(crls), 0o644),
        },
    )


def test_a_reload_brings_the_revocations_and_a_revoked_peer_is_refused_after_its_handshake(
    tmp_path, development_set
):
    from runtime.certificates.revocation import with_revoked
    from runtime.serving.asgi_tls import refusal, revoked_now

    files = publish(tmp_path / "server", development_set)
    tls = ReloadableServerContext(files)
    api = client_context(tmp_path / "client", development_set, "api")
    worker = client_context(tmp_path / "client", development_set, "worker")
    before, _ = handshake(tls.front, api)  # a keep-alive connection made before the revocation
    before_der = before.getpeercert(binary_form=True)
    assert refusal(before, before_der) is None

    api_serial = development_set.identities["api"].certificate.serial_number
    publish_revocations(files, development_set, [with_revoked(development_set.ca, [api_serial])])
    assert tls.reload()
    assert len(tls.current.revocations) == 1
    server, _ = handshake(tls.front, api)  # OpenSSL lets it through; our check refuses it
    reason, detail = refusal(server, server.getpeercert(binary_form=True))
    assert (
        reason == "revoked"
        and f"serial {api_serial:x}" in detail
        and "spiffe://hokusai/development/api" in detail
    )
    assert revoked_now(before, before_der)  # the old connection's next request is refused too
    other, _ = handshake(tls.front, worker)
    assert refusal(other, other.getpeercert(binary_form=True)) is None


def test_a_forged_list_is_refused_by_the_reload_and_the_old_context_stays(tmp_path, development_set):
    from tests.support.certs import forged_list

    files = publish(tmp_path / "server", development_set)
    tls = ReloadableServerContext(files)
    current = tls.current
    api_serial = development_set.identities["api"].certificate.serial_number
    publish_revocations(files, development_set, [forged_list(development_set.ca, [api_serial])])
    assert tls.reload() is False
    assert tls.current is current and len(current.revocations) == 0
