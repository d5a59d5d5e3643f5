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
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from runtime.certificates.pem import certificate_pem, load_der_certificate
from runtime.errors import PemError
from runtime.serving.bounded_h11 import BoundedH11Protocol

TLS_EXTENSION = "tls"
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The asgiref TLS extension for one connection; no client certificate unless verified."""
    der = ssl_object.getpeercert(binary_form=True)
    # With CERT_NONE OpenSSL hands over a peer certificate it never checked: never expose that.
    certificate, error = None, None
    if der is not None and ssl_object.context.verify_mode != ssl.CERT_NONE:
        try:  # OpenSSL verified it, but cryptography may still refuse a field: then it names no one
            certificate = load_der_certificate(der, "the client certificate")
        except PemError as exc:
            error = str(exc)
    return {
        "server_cert": None,
        "client_cert_chain": [certificate_pem(certificate).decode()] if certificate else [],
        "client_cert_name": certificate.subject.rfc4514_string() if certificate else None,
        "client_cert_error": error,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,  # the ssl module exposes the cipher's name, not its IANA number
    }


def with_tls_extension(app, extension: dict[str, Any]):
    """`app`, with `extension` set on every HTTP and WebSocket scope of this connection."""

    async def app_with_tls(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), TLS_EXTENSION: extension}}
        await app(scope, receive, send)

    return app_with_tls


class TLSExtensionH11Protocol(BoundedH11Protocol):
    """uvicorn's h11 protocol with our timeouts (`runtime.serving.bounded_h11`), plus the TLS extension;
    use as `uvicorn.Config(http=...)`."""

    on_tls_connection: Callable[[], None] | None = None
    """Called once per completed handshake (the metrics count them); see `with_hook`."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = with_tls_extension(self.app, tls_extension(ssl_object))
            if self.on_tls_connection is not None:
                self.on_tls_connection()

    @classmethod
    def with_hook(cls, on_tls_connection: Callable[[], None]) -> type[TLSExtensionH11Protocol]:
        """A subclass that reports every completed TLS connection to `on_tls_connection`."""
        return type(cls.__name__, (cls,), {"on_tls_connection": staticmethod(on_tls_connection)})
