"""Give the ASGI app the verified client certificate, as the ASGI TLS extension says.

No mainstream ASGI server fills `scope["extensions"]["tls"]` yet (docs/DESIGN.md), so with
`ssl_cert_reqs=CERT_REQUIRED` alone a request is verified but anonymous. This module
subclasses uvicorn's h11 protocol (through `runtime.serving.bounded_h11`, which adds the header, body and
write timeouts every listener of ours applies): when a TLS connection is made (after the handshake),
it reads the peer certificate from the `ssl_object` and wraps the app for that connection
so every request on it carries the extension
(https://asgi.readthedocs.io/en/latest/specs/tls.html).

Only the TLS layer can put it there: headers cannot, and a plain-HTTP connection gets no
extension at all. The class depends on uvicorn internals (`connection_made`, `self.app`):
the uvicorn range is pinned and tests/integration exercises it.

What the extension says of a certificate (its PEM, its subject, or why it cannot be read) depends
on the certificate alone, so it is worked out once per certificate (`_described`, a bounded cache
keyed by the DER OpenSSL verified), not once per connection: a client making a new connection per
request costs a lookup, not a parse. Each connection still gets its own dict and list.

Once a connection is up, `refusal` decides whether it may be served at all; if not, it is dropped
before a request is read, and it counts as a handshake that failed, with its reason (`on_tls_refused`,
which the acceptor sets: the failure log and metrics of every other refused handshake):

- a revoked client certificate (`revoked`): OpenSSL has no list of ours to check (see
  `runtime.certificates.revocation`), so it is checked here, against the latest context's revocations,
  and again before every request of the connection (a keep-alive connection made before the revocation
  gets 403 and is closed);
- a resumed TLS session (`ssl_object.session_reused`) was not verified by this handshake: OpenSSL
  brings back the certificate of the full handshake it descends from. It is served only if that
  certificate would pass a full handshake now (`runtime.certificates.tls_context.ResumedSessions`,
  the current context's), else refused with the reason a full handshake would give.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.wsproto_impl import WSProtocol

from runtime import names
from runtime.certificates.inspection import describe_certificate
from runtime.certificates.pem import certificate_pem, load_der_certificate
from runtime.errors import PemError
from runtime.serving.bounded_h11 import BoundedH11Protocol, Slot

log = logging.getLogger("hokusai_mtls")

TLS_EXTENSION = "tls"
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
DESCRIBED_CERTIFICATES_KEPT = 512
"""Distinct client certificates whose description `_described` keeps (a few per service and rotation)."""


@functools.lru_cache(maxsize=DESCRIBED_CERTIFICATES_KEPT)
def _described(der: bytes) -> tuple[str | None, str | None, str | None]:
    """(PEM, RFC 4514 subject, None) of a verified certificate, or (None, None, why it cannot be read)."""
    try:  # OpenSSL verified it, but cryptography may still refuse a field: then it names no one
        certificate = load_der_certificate(der, "the client certificate")
    except PemError as exc:
        return None, None, str(exc)
    return certificate_pem(certificate).decode(), certificate.subject.rfc4514_string(), None


def tls_extension(ssl_object: ssl.SSLObject, der: bytes | None = None) -> dict[str, Any]:
    """The asgiref TLS extension for one connection; no client certificate unless verified.

    `der`: the peer certificate if the caller has read it already (`getpeercert(binary_form=True)`).
    """
    if der is None:
        der = ssl_object.getpeercert(binary_form=True)
    # With CERT_NONE OpenSSL hands over a peer certificate it never checked: never expose that.
    certificate_pem_text, name, error = None, None, None
    if der is not None and ssl_object.context.verify_mode != ssl.CERT_NONE:
        certificate_pem_text, name, error = _described(der)
    return {
        "server_cert": None,
        "client_cert_chain": [certificate_pem_text] if certificate_pem_text else [],
        "client_cert_name": name,
        "client_cert_error": error,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,  # the ssl module exposes the cipher's name, not its IANA number
    }


def refusal(ssl_object: ssl.SSLObject, der: bytes | None) -> tuple[str, str] | None:
    """None if the connection may be served, else (reason, detail for the failure log).

    Only a context of ours knows the revocations and how to re-check a resumed session
    (`ServerContext.revocations`, `.resumed_sessions`); with any other, a resumed session is refused:
    nothing re-checks it.
    """
    if der and revoked_now(ssl_object, der):
        return names.HANDSHAKE_REVOKED, f"{_who(der)} is revoked"
    if ssl_object.session_reused:
        check = getattr(ssl_object.context, "resumed_sessions", None)
        reason = check.refusal(der) if check is not None else names.HANDSHAKE_BAD_CERTIFICATE
        if reason is not None:
            return (
                reason,
                f"{_who(der) if der else 'no certificate'}: its resumed TLS session would fail a full handshake now",
            )
    return None


def revoked_now(ssl_object: ssl.SSLObject, der: bytes | None) -> bool:
    """Whether the connection's client certificate is revoked by the latest context's lists: a revocation
    published after a keep-alive connection was made refuses its next request."""
    context = ssl_object.context
    latest = getattr(context, "latest", None)
    revocations = getattr(latest() if latest is not None else context, "revocations", None)
    return bool(der) and revocations is not None and revocations.refuses_der(der)


def _who(der: bytes) -> str:
    try:
        return describe_certificate(load_der_certificate(der, "the client certificate"))
    except PemError as exc:
        return str(exc)


REVOKED_BODY = b"the client certificate of this connection has been revoked\n"


async def _refuse_revoked(scope, send) -> None:
    """403 and close (a WebSocket: closed with 1008, policy violation): the connection cannot be used."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [(b"content-type", b"text/plain"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": REVOKED_BODY})


def with_tls_extension(app, extension: dict[str, Any], revoked: Callable[[], bool] | None = None):
    """`app`, with `extension` set on every HTTP and WebSocket scope of this connection; `revoked` (asked
    before each request) refuses the requests of a connection whose certificate was revoked since."""

    async def app_with_tls(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            if revoked is not None and revoked():
                log.warning("refused a request on a connection whose client certificate is revoked")
                await _refuse_revoked(scope, send)
                return
            # The server makes a new scope for each request: set the key on it, copy only `extensions`.
            scope["extensions"] = {**(scope.get("extensions") or {}), TLS_EXTENSION: extension}
        await app(scope, receive, send)

    return app_with_tls


class TLSExtensionH11Protocol(BoundedH11Protocol):
    """uvicorn's h11 protocol with our timeouts (`runtime.serving.bounded_h11`), plus the TLS extension;
    use as `uvicorn.Config(http=...)`."""

    on_tls_connection: Callable[[], None] | None = None
    """Called once per completed handshake (the metrics count them); see `with_hook`."""
    on_tls_refused: Callable[[str, str], None] | None = None
    """Called with (reason, detail) when `refusal` drops a connection; the acceptor sets it per connection."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        if (refused := refusal(ssl_object, der)) is not None:
            log.debug("dropping %s: %s (%s)", self.client, *refused)
            transport.abort()  # before any request is read; connection_lost releases the slot
            if self.on_tls_refused is not None:
                self.on_tls_refused(*refused)
            return
        self.app = with_tls_extension(
            self.app, tls_extension(ssl_object, der), functools.partial(revoked_now, ssl_object, der)
        )
        if self.on_tls_connection is not None:
            self.on_tls_connection()

    @classmethod
    def with_hook(cls, on_tls_connection: Callable[[], None]) -> type[TLSExtensionH11Protocol]:
        """A subclass that reports every completed TLS connection to `on_tls_connection`."""
        return type(cls.__name__, (cls,), {"on_tls_connection": staticmethod(on_tls_connection)})


class TLSExtensionWSProtocol(WSProtocol):
    """uvicorn's wsproto WebSocket protocol, plus the TLS extension on the WebSocket scope.

    The h11 protocol (`TLSExtensionH11Protocol`) hands an upgraded connection to this one
    (`BoundedH11Protocol.handle_websocket_upgrade`): it already checked a resumed session, so here the
    extension is only described, with the same helper, from the same TLS connection. The connection
    bound's slot comes along and is released when the connection is lost. On a plain connection
    (a permissive listener's plain twin) there is no TLS object and no extension: the middleware
    takes the API-key path. Use as `uvicorn.Config(ws=...)`; depends on uvicorn's `WSProtocol`
    (`app`, `connection_made`, `connection_lost`), pinned with uvicorn.
    """

    slot: Slot | None = None
    """Set by the h11 protocol that upgraded the connection."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            # Its own app, not the h11 protocol's wrapped one: the revocation check comes along.
            self.app = with_tls_extension(
                self.app, tls_extension(ssl_object, der), functools.partial(revoked_now, ssl_object, der)
            )

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            slot, self.slot = self.slot, None
            if slot is not None:
                slot.release()
