"""TLS session resumption against a real listener on loopback: it happens, and it proves no more
than a full handshake would.

The app sits behind `APIKeyAuthMiddleware` and answers with the identity the middleware gave the
request and the client certificate the TLS extension carried, so each test sees who the server
believes it talks to on a resumed connection. Clients are Python's `ssl` (which resumes only when
handed a session) and `openssl s_client -sess_out/-sess_in`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runtime.auth.client_address import AddressPolicy
from runtime.auth.middleware import APIKeyAuthMiddleware
from runtime.auth.peer_identity import IdentityPolicy
from runtime.auth.rate_limit import MemoryRateLimiter
from runtime.certificates import pem, tls_context
from runtime.certificates.certset import CertificateSet
from runtime.certificates.files import publish_files
from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
from runtime.observability.metrics import Metrics
from runtime.serving.asgi_tls import TLS_EXTENSION
from runtime.serving.server import Listener, Serving
from tests.support.servers import free_port, running

pytestmark = pytest.mark.integration
HOST = "mlflow.hokusai-development.local"
REQUEST = f"GET /whoami HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


async def whoami(request: Request) -> JSONResponse:
    chain = request.scope["extensions"][TLS_EXTENSION]["client_cert_chain"]
    return JSONResponse({"service": request.state.service_id, "certificate": chain[0]})


def publish(directory: Path, certificates: CertificateSet) -> ServerFiles:
    server = certificates.identities["server"]
    publish_files(
        directory,
        {
            "tls.crt": (server.certificate_pem(), 0o644),
            "tls.key": (server.private_key_pem(), 0o600),
            "ca.crt": (pem.bundle_pem(certificates.trust_bundle), 0o644),
        },
    )
    return ServerFiles.from_directory(directory)


@dataclass
class Answer:
    reused: bool
    session: ssl.SSLSession | None
    status: int | None  # None: the server closed the connection without answering
    body: dict | None


@dataclass
class Caller:
    """One service's client: a context with its certificate, trusting `trusted` CAs."""

    context: ssl.SSLContext
    certificate_pem: str

    @classmethod
    def of(cls, directory: Path, certificates: CertificateSet, service: str, trusted: list) -> Caller:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{service}.pem").write_bytes(certificates.identities[service].combined_pem())
        context = ssl.create_default_context(cadata=pem.bundle_pem(trusted).decode())
        context.load_cert_chain(directory / f"{service}.pem")
        return cls(context, pem.certificate_pem(certificates.identities[service].certificate).decode())

    def get(self, port: int, session: ssl.SSLSession | None = None) -> Answer:
        """One request on a new connection, offering `session` to resume."""
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            self.context.wrap_socket(raw, server_hostname=HOST, session=session) as tls,
        ):
            reused = tls.session_reused
            data = b""
            try:
                tls.sendall(REQUEST)
                while chunk := tls.recv(65536):
                    data += chunk
            except (ssl.SSLError, OSError):
                pass  # refused after the handshake: a reset or an EOF without close_notify
            if not data:
                return Answer(reused, None, None, None)
            head, _, body = data.partition(b"\r\n\r\n")
            return Answer(reused, tls.session, int(head.split()[1]), json.loads(body))


@pytest.fixture
def listener(tmp_path, development_set):
    tls = ReloadableServerContext(publish(tmp_path / "server", development_set))
    app = APIKeyAuthMiddleware(
        Starlette(routes=[Route("/whoami", whoami)]),
        identities=IdentityPolicy("development"),
        addresses=AddressPolicy(internal=(ipaddress.ip_network("127.0.0.0/8"),)),
        validator=None,
        limiter=MemoryRateLimiter(),
        metrics=Metrics(environment="development", service="mlflow"),
    )
    port = free_port()
    serving = Serving([Listener("mtls", "127.0.0.1", port, app, tls)])
    with running(serving):
        yield {"port": port, "tls": tls, "serving": serving}


def caller(tmp_path: Path, certificates: CertificateSet, service: str = "api", trusted=None) -> Caller:
    return Caller.of(
        tmp_path / "clients" / service, certificates, service, trusted or certificates.trust_bundle
    )


def held_connections(serving: Serving) -> int:
    """Connections the listener holds once the ones just closed are gone."""
    deadline = time.monotonic() + 5
    while (held := sum(acceptor.open for acceptor in serving.acceptors)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return held


def test_a_reconnecting_client_resumes_with_the_identity_of_its_certificate(
    listener, tmp_path, development_set
):
    port = listener["port"]
    api, worker = caller(tmp_path, development_set, "api"), caller(tmp_path, development_set, "worker")
    first = api.get(port)
    assert (first.reused, first.status, first.body) == (
        False,
        200,
        {"service": "api", "certificate": api.certificate_pem},
    )
    worker_first = worker.get(port)  # another service in between: caches keyed by certificate, not by order
    assert worker_first.body["service"] == "worker"

    session = first.session
    for _ in range(3):  # every resumption hands out the next ticket
        again = api.get(port, session)
        assert again.reused, "the server did not resume the session"
        assert (again.status, again.body) == (200, {"service": "api", "certificate": api.certificate_pem})
        session = again.session
    worker_again = worker.get(port, worker_first.session)
    assert worker_again.reused and worker_again.body == {
        "service": "worker",
        "certificate": worker.certificate_pem,
    }


def test_a_resumed_session_still_serves_after_a_reload_that_keeps_its_ca(listener, tmp_path, development_set):
    api = caller(tmp_path, development_set)
    first = api.get(listener["port"])
    assert listener["tls"].reload()  # every refresh reloads: resumption must survive it
    again = api.get(listener["port"], first.session)
    assert again.reused and (again.status, again.body["service"]) == (200, "api")


def test_a_resumed_session_is_refused_once_the_bundle_no_longer_holds_its_ca(
    listener, tmp_path, development_set
):
    port, tls = listener["port"], listener["tls"]
    successor = CertificateSet.issue("development", server_sans=("localhost", "127.0.0.1"))
    both = development_set.trust_bundle + successor.trust_bundle
    old_api = caller(tmp_path / "old", development_set, trusted=both)
    first = old_api.get(port)
    assert first.status == 200

    publish(tmp_path / "server", successor)  # the last step of a CA rollover: the old CA is gone
    assert tls.reload()
    refused = old_api.get(port, first.session)
    assert refused.reused, "OpenSSL did resume: only our re-check stands between it and the app"
    assert refused.status is None
    assert old_api.get(port).status is None  # what a full handshake with the same certificate gets
    new_api = caller(tmp_path / "new", successor)
    assert new_api.get(port).body["service"] == "api"
    assert held_connections(listener["serving"]) == 0  # the refused connections gave their slots back


def test_a_resumed_session_is_refused_once_the_client_certificate_expired(
    listener, tmp_path, development_set, monkeypatch
):
    port = listener["port"]
    api = caller(tmp_path, development_set)
    first = api.get(port)
    second = api.get(port, first.session)
    assert second.reused and second.status == 200  # checked, and the answer remembered

    expired = development_set.identities["api"].certificate.not_valid_after_utc + dt.timedelta(seconds=1)
    monkeypatch.setattr(tls_context, "_now", lambda: expired.timestamp())
    refused = api.get(port, second.session)
    assert refused.reused and refused.status is None
    assert held_connections(listener["serving"]) == 0


def test_openssl_s_client_resumes_against_the_listener(listener, tmp_path, development_set):
    if shutil.which("openssl") is None:  # .ci/run installs it: a missing one fails, never skips
        pytest.fail("the openssl CLI is missing: apt-get install -y openssl", pytrace=False)
    api = development_set.identities["api"]
    (tmp_path / "api.crt").write_bytes(api.certificate_pem())
    (tmp_path / "api.key").write_bytes(api.private_key_pem())
    (tmp_path / "ca.crt").write_bytes(pem.bundle_pem(development_set.trust_bundle))

    command = [
        *("openssl", "s_client", "-connect", f"127.0.0.1:{listener['port']}", "-servername", HOST),
        *("-cert", str(tmp_path / "api.crt"), "-key", str(tmp_path / "api.key")),
        *("-CAfile", str(tmp_path / "ca.crt"), "-verify_return_error", "-ign_eof"),
    ]

    def s_client(*session: str) -> str:
        done = subprocess.run(
            [*command, *session], input=REQUEST, capture_output=True, timeout=30, check=False
        )
        return done.stdout.decode(errors="replace")

    sessions = tmp_path / "session.pem"
    first = s_client("-sess_out", str(sessions))
    assert "New, TLSv1.3" in first and '"service":"api"' in first
    again = s_client("-sess_in", str(sessions))
    assert "Reused, TLSv1.3" in again and '"service":"api"' in again
