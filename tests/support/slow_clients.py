"""What a slow or silent client does, and how a test sees that the server closed it."""

from __future__ import annotations

import socket
import ssl
import time

HALF_HEADERS = b"GET / HTTP/1.1\r\nhost: localhost\r\nx-half: "
"""A request line and part of the headers: never finished."""


def closed_within(
    sock: socket.socket, seconds: float, since: float | None = None
) -> tuple[float | None, bytes]:
    """Read until the server closes (EOF or reset): seconds since `since`, or None if still open."""
    since = time.monotonic() if since is None else since
    deadline = since + seconds
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, data
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None, data
        except (ssl.SSLError, OSError):
            return time.monotonic() - since, data
        if not chunk:
            return time.monotonic() - since, data
        data += chunk


def still_open(sock: socket.socket, seconds: float) -> bool:
    return closed_within(sock, seconds)[0] is None
