"""HTTPS requests to a name that resolves somewhere else, like `curl --resolve NAME:PORT:ADDRESS`.

Clients in ECS dial `mlflow.hokusai-<env>.local:5000`: the TLS layer checks the certificate
against that name and MLflow sees it in the Host header. A test on the loopback can only
reach 127.0.0.1, so this connects the socket to `address` while TLS (SNI, name check) and
HTTP (Host) use `name`, exactly as a client that resolved the name would.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from pathlib import Path


class _PinnedConnection(http.client.HTTPSConnection):
    def __init__(self, name: str, port: int, address: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(name, port, context=context, timeout=timeout)
        self._address = address
        self._context = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def request_by_name(
    name: str,
    port: int,
    address: str,
    path: str,
    *,
    ca: Path,
    client_pem: Path | None = None,
    method: str = "GET",
    body: dict | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15,
) -> tuple[int, bytes]:
    """One request to https://name:port/path over a socket to `address`; (status, body)."""
    context = ssl.create_default_context(cafile=str(ca))
    if client_pem is not None:
        context.load_cert_chain(str(client_pem))
    connection = _PinnedConnection(name, port, address, context, timeout)
    data = json.dumps(body).encode() if body is not None else None
    try:
        connection.request(
            method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
