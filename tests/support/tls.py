"""A real TLS server on 127.0.0.1 that requires client certificates, and a client for it.

Python's `ssl` module (OpenSSL) on both ends: the same stack uvicorn and requests use.
The server answers each connection with the URI SAN of the verified peer, so a test can
see who the server believes it talks to.
"""

from __future__ import annotations

import socket
import ssl
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from cryptography import x509


@dataclass
class Outcome:
    peer_uri: str | None = None
    error: str | None = None


@dataclass
class MutualTLSServer:
    cert_file: str
    key_file: str
    ca_file: str
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca_file)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    uri = (
                        x509.load_der_x509_certificate(der)
                        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
                        .value.get_values_for_type(x509.UniformResourceIdentifier)[0]
                    )
                    self.outcomes.append(Outcome(peer_uri=uri))
                    tls.sendall(uri.encode())
            except (ssl.SSLError, OSError) as exc:
                self.outcomes.append(Outcome(error=str(exc)))
                raw.close()

    def __enter__(self) -> MutualTLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()


def client_context(ca_file: str, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """What requests/httpx build from `verify=ca_file, cert=cert_file`: hostname and chain checked."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def exchange(port: int, context: ssl.SSLContext, server_hostname: str) -> bytes:
    """Handshake, then read the server's answer (TLS 1.3 reports a refused client cert here)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return tls.recv(1024)


@contextmanager
def serving(cert_file: str, key_file: str, ca_file: str):
    with MutualTLSServer(cert_file, key_file, ca_file) as server:
        yield server
