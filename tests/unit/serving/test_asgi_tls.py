"""The ASGI TLS extension our TLS protocol builds, and what it does with a resumed session.

The `ssl_object` here is a stand-in with what asyncio's TLS transport hands the protocol after the
handshake; tests/integration/test_tls_resumption.py runs the real thing over sockets.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from runtime.certificates import pem
from runtime.serving import asgi_tls
from runtime.serving.asgi_tls import (
    TLS_EXTENSION,
    TLSExtensionH11Protocol,
    refusal,
    tls_extension,
    with_tls_extension,
)


class Check:
    """A context's `resumed_sessions`: admits what it is told to, and records what it was asked."""

    def __init__(self, admit: bool) -> None:
        self.admit = admit
        self.asked: list[bytes | None] = []

    def refusal(self, der: bytes | None) -> str | None:
        self.asked.append(der)
        return None if self.admit else "expired"


class Context:
    def __init__(self, verify_mode=ssl.CERT_REQUIRED, resumed_sessions: Check | None = None) -> None:
        self.verify_mode = verify_mode
        if resumed_sessions is not None:
            self.resumed_sessions = resumed_sessions


class SSLObject:
    def __init__(self, der: bytes | None, *, reused: bool = False, context: Context | None = None) -> None:
        self.der = der
        self.session_reused = reused
        self.context = context or Context()
        self.calls = 0

    def getpeercert(self, binary_form: bool = False):
        assert binary_form
        self.calls += 1
        return self.der

    def version(self) -> str:
        return "TLSv1.3"


def der_of(identity) -> bytes:
    return identity.certificate.public_bytes(Encoding.DER)


def test_the_extension_carries_the_verified_certificate(development_set):
    api = development_set.identities["api"]
    extension = tls_extension(SSLObject(der_of(api)))
    assert extension == {
        "server_cert": None,
        "client_cert_chain": [pem.certificate_pem(api.certificate).decode()],
        "client_cert_name": api.certificate.subject.rfc4514_string(),
        "client_cert_error": None,
        "tls_version": 0x0304,
        "cipher_suite": None,
    }


def test_an_unverified_peer_certificate_is_never_exposed(development_set):
    extension = tls_extension(
        SSLObject(der_of(development_set.identities["api"]), context=Context(ssl.CERT_NONE))
    )
    assert extension["client_cert_chain"] == [] and extension["client_cert_name"] is None


def test_no_certificate_no_chain():
    extension = tls_extension(SSLObject(None))
    assert extension["client_cert_chain"] == [] and extension["client_cert_error"] is None


def test_a_certificate_cryptography_cannot_read_names_no_one():
    extension = tls_extension(SSLObject(b"\x30\x03\x02\x01\x01"))
    assert extension["client_cert_chain"] == [] and extension["client_cert_name"] is None
    assert "the client certificate" in extension["client_cert_error"]


def test_a_certificate_is_described_once_and_each_connection_gets_its_own_extension(
    development_set, monkeypatch
):
    parsed = []
    real = asgi_tls.load_der_certificate
    monkeypatch.setattr(
        asgi_tls, "load_der_certificate", lambda der, source: parsed.append(der) or real(der, source)
    )
    asgi_tls._described.cache_clear()
    der = der_of(development_set.identities["worker"])
    first, second = (
        tls_extension(SSLObject(der)),
        tls_extension(SSLObject(bytes(der))),
    )  # equal, not the same bytes
    assert len(parsed) == 1
    assert first == second and first is not second
    assert first["client_cert_chain"] is not second["client_cert_chain"]
    first["client_cert_chain"].append("an app that writes into its scope")
    assert tls_extension(SSLObject(der))["client_cert_chain"] == second["client_cert_chain"]
    assert len(second["client_cert_chain"]) == 1


def test_the_extension_is_added_to_http_scopes_only_and_keeps_other_extensions():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope)

    wrapped = with_tls_extension(app, {"client_cert_chain": ["x"]})
    asyncio.run(wrapped({"type": "http", "extensions": {"other": {}}}, None, None))
    asyncio.run(wrapped({"type": "lifespan"}, None, None))
    assert seen[0]["extensions"] == {"other": {}, TLS_EXTENSION: {"client_cert_chain": ["x"]}}
    assert "extensions" not in seen[1]


@pytest.mark.parametrize(
    ("context", "refused"),
    [
        (Context(resumed_sessions=Check(True)), None),
        (Context(resumed_sessions=Check(False)), "expired"),
        (Context(), "bad_certificate"),
    ],
)
def test_only_a_context_of_ours_can_admit_a_resumed_session(context, refused):
    """A context that cannot re-check a resumed session refuses it; ours refuses with the check's reason."""
    found = refusal(SSLObject(b"der", reused=True, context=context), b"der")
    assert (found[0] if found else None) == refused


# --- the protocol ------------------------------------------------------------------------------
class Transport:
    def __init__(self, ssl_object: SSLObject) -> None:
        self.ssl_object = ssl_object
        self.aborted = False

    def get_extra_info(self, name, default=None):
        info = {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 443), "sslcontext": object()}
        info["ssl_object"] = self.ssl_object
        return info.get(name, default)

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def connect(loop, ssl_object: SSLObject) -> tuple[TLSExtensionH11Protocol, Transport, list]:
    import uvicorn
    from uvicorn.server import ServerState

    async def app(scope, receive, send):  # pragma: no cover - never called here
        raise AssertionError

    completed: list[int] = []
    refused: list[tuple[str, str]] = []
    config = uvicorn.Config(
        app,
        http=TLSExtensionH11Protocol.with_hook(lambda: completed.append(1)),
        interface="asgi3",
        log_config=None,
    )
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    protocol.on_tls_refused = lambda reason, detail: refused.append((reason, detail))
    transport = Transport(ssl_object)
    protocol.connection_made(transport)
    protocol.refused = refused
    return protocol, transport, completed


@pytest.mark.parametrize(
    ("reused", "admit", "served"),
    [(False, False, True), (True, True, True), (True, False, False)],
    ids=["full handshake", "resumed and admitted", "resumed and refused"],
)
def test_a_resumed_session_is_served_only_if_admitted(development_set, reused, admit, served):
    loop = asyncio.new_event_loop()
    try:
        check = Check(admit)
        der = der_of(development_set.identities["api"])
        ssl_object = SSLObject(der, reused=reused, context=Context(resumed_sessions=check))
        protocol, transport, completed = connect(loop, ssl_object)
        assert transport.aborted is not served
        assert completed == ([1] if served else [])  # a refused one counts as a handshake not completed
        assert [reason for reason, _ in protocol.refused] == ([] if served else ["expired"])  # ...and why
        assert check.asked == ([der] if reused else [])  # a full handshake was verified by OpenSSL
        assert ssl_object.calls == 1  # the peer certificate is read once per connection
        assert (protocol.app is not protocol.config.loaded_app) is served  # wrapped with the extension
        protocol.connection_lost(None)
    finally:
        loop.close()


# --- revocation after the connection was made ----------------------------------------------------
class RevokingContext(Context):
    """Our context's `revocations`, refusing what it is told to."""

    def __init__(self, refused: bytes) -> None:
        super().__init__()
        self.refused = refused
        self.revocations = self

    def refuses_der(self, der: bytes) -> bool:
        return der == self.refused


def run_app(app, scope) -> list[dict]:
    sent: list[dict] = []

    async def receive():  # pragma: no cover - a refused scope reads nothing
        raise AssertionError

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_a_websocket_upgraded_after_a_revocation_is_closed_before_the_app_sees_it(development_set):
    """The WebSocket protocol wraps its own app (not the h11 protocol's): it must check revocation too."""
    import uvicorn
    from uvicorn.server import ServerState

    from runtime.serving.asgi_tls import TLSExtensionWSProtocol

    seen = []

    async def app(scope, receive, send):
        seen.append(scope)

    der = der_of(development_set.identities["api"])
    config = uvicorn.Config(app, ws=TLSExtensionWSProtocol, interface="asgi3", log_config=None)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        protocol = TLSExtensionWSProtocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)
        protocol.connection_made(Transport(SSLObject(der, context=RevokingContext(der))))
        sent = run_app(protocol.app, {"type": "websocket", "path": "/ws", "headers": []})
    finally:
        loop.close()
    assert sent == [{"type": "websocket.close", "code": 1008}] and seen == []


def test_a_request_on_a_connection_revoked_since_gets_403_and_closes():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope)

    sent = run_app(with_tls_extension(app, {}, lambda: True), {"type": "http", "path": "/", "headers": []})
    assert sent[0]["status"] == 403 and (b"connection", b"close") in sent[0]["headers"] and seen == []
    run_app(with_tls_extension(app, {}, lambda: False), {"type": "http", "path": "/", "headers": []})
    assert len(seen) == 1 and seen[0]["extensions"]["tls"] == {}
