"""Bytes-exact HTTP for the proxy's tests: a victim listener, raw requests, an upstream that drops connections.

httpx and http.client normalise what they send (they encode, split or refuse odd targets), so
attacks on the proxy's path handling are written as raw request lines here. The victim is a
bare listening socket: whether anything connected is read from the kernel's accept queue
after the response, so there is no race with a thread that has not called `accept()` yet.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


class Victim:
    """A listener on 127.0.0.1 that no request may ever reach; `connections()` drains its queue."""

    def __init__(self, listening: socket.socket | None = None) -> None:
        """On 127.0.0.1, or on `listening` (a socket bound elsewhere, e.g. in a test namespace)."""
        self.socket = listening or socket.create_server(("127.0.0.1", 0), backlog=64)
        self.socket.setblocking(False)
        host, self.port = self.socket.getsockname()[:2]
        self.address = f"{host}:{self.port}"
        self.seen = 0

    def connections(self) -> int:
        """How many connections have arrived in total (each is accepted and closed)."""
        while True:
            try:
                connection, _ = self.socket.accept()
            except BlockingIOError:
                return self.seen
            connection.close()
            self.seen += 1

    def close(self) -> None:
        self.socket.close()


@contextlib.contextmanager
def victim() -> Iterator[Victim]:
    listener = Victim()
    try:
        yield listener
    finally:
        listener.close()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_request(port: int, target: bytes, *, method: bytes = b"GET", headers: bytes = b"") -> RawResponse:
    """Send `METHOD target HTTP/1.1` exactly as given to 127.0.0.1:port and read the whole answer."""
    request = method + b" " + target + b" HTTP/1.1\r\n"
    if b"host:" not in headers.lower():
        request += b"host: 127.0.0.1:%d\r\n" % port
    request += headers + b"connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(request)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1]) if lines and lines[0] else 0
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return RawResponse(status, fields, body)


@dataclass
class Received:
    connection: int
    request_line: str
    headers: dict[str, str]
    answered: bool


@dataclass
class DroppingUpstream:
    """Plain HTTP/1.1 with keep-alive, closing a connection when a request arrives on it unanswered.

    `answer(connection_index, request_index_on_connection) -> bool` decides; a dropped request is
    read completely and then the socket is closed (`how="close"`, a FIN: h11's "Server disconnected
    without sending a response") or reset (`how="reset"`, an RST: a ReadError). This is what a
    server that has just decided to close an idle keep-alive connection looks like to the next
    request sent on it.
    """

    answer: object
    how: str = "close"
    received: list[Received] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with self._lock:
                index = self.connections
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(connection, index), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, connection: socket.socket, index: int) -> None:
        buffer = b""
        with connection:
            connection.settimeout(10)
            for number in range(1000):
                while b"\r\n\r\n" not in buffer:
                    try:
                        chunk = connection.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                while len(buffer) < length:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                buffer = buffer[length:]
                answered = bool(self.answer(index, number))
                with self._lock:
                    self.received.append(Received(index, lines[0], headers, answered))
                if not answered:
                    if self.how == "reset":
                        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                body = b"answered %d/%d" % (index, number)
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body)
                )

    def requests(self, request_line_contains: str = "") -> list[Received]:
        with self._lock:
            return [r for r in self.received if request_line_contains in r.request_line]

    def close(self) -> None:
        self._stopped = True
        self.socket.close()
        for thread in self._threads:
            thread.join(2)


@contextlib.contextmanager
def dropping_upstream(answer, how: str = "close") -> Iterator[DroppingUpstream]:
    upstream = DroppingUpstream(answer, how)
    try:
        yield upstream
    finally:
        upstream.close()
