"""What an attacker on its own host does: exact bytes on a socket, a listener the VPC must never dial.

Everything here runs inside a namespace of the deployed-shape environment through
`Namespace.call`, so the sockets carry that host's address: the servers see the attacker's
address, not loopback. Clients such as httpx or curl normalise what they send (they encode,
split or refuse odd request targets), so attacks on path handling are written as raw
request lines.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import Namespace
from tests.support.raw_http import Victim


@dataclass
class Answer:
    status: int | None
    head: bytes
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("latin-1")


def _read_answer(sock: socket.socket, deadline: float) -> Answer:
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
        head, separator, body = data.partition(b"\r\n\r\n")
        length = _content_length(head) if separator else None
        if length is not None and len(body) >= length:
            break
    head, _, body = data.partition(b"\r\n\r\n")
    status = None
    if head.startswith(b"HTTP/1."):
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = None
    return Answer(status, head, body)


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def raw_exchange(
    namespace: Namespace,
    address: str,
    port: int,
    request: bytes,
    *,
    tls_ca: Path | None = None,
    server_name: str | None = None,
    client_cert: tuple[Path, Path] | None = None,
    seconds: float = 15,
) -> Answer:
    """Send `request` byte for byte from `namespace` to address:port (TLS when `tls_ca`) and read the answer."""

    def exchange() -> Answer:
        deadline = time.monotonic() + seconds
        sock = socket.create_connection((address, port), timeout=seconds)
        try:
            if tls_ca is not None:
                context = ssl.create_default_context(cafile=str(tls_ca))
                if client_cert is not None:
                    context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
                sock = context.wrap_socket(sock, server_hostname=server_name or address)
            sock.sendall(request)
            return _read_answer(sock, deadline)
        finally:
            sock.close()

    return namespace.call(exchange, timeout=seconds + 10)


def listener_in(namespace: Namespace) -> Victim:
    """A listener on `namespace`'s address that nothing we run may ever connect to (`connections()`
    counts what arrived, from the kernel's accept queue, so there is no race with accept())."""
    return Victim(namespace.call(socket.create_server, (namespace.address, 0), backlog=128))


def open_idle_connections(namespace: Namespace, address: str, port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections from `namespace` that then send nothing (a slowloris's opening)."""

    def connect_all() -> list[socket.socket]:
        opened = []
        for _ in range(count):
            sock = socket.create_connection((address, port), timeout=10)
            sock.setblocking(False)
            opened.append(sock)
        return opened

    return namespace.call(connect_all, timeout=120)


def closed_by_peer(sock: socket.socket) -> bool:
    """The server closed (or reset) this connection; it is not merely quiet."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
