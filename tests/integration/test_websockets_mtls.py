"""`hokusai-mtls serve --app`: a Starlette WebSocket streaming app behind mTLS (issue 15, seed 003).

The server runs as ECS would run it (a subprocess, the task's environment, certificates from moto's
Secrets Manager); clients speak WebSocket with `wsproto` over a real TLS socket.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from local_stack.environment import BIN
from runtime import names
from runtime.certificates import pem
from runtime.security_level import SecurityLevel
from tests.integration.conftest import server_environment, wait_healthy
from tests.support.servers import free_port
from tests.support.ws_app import STREAMED

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
POLICY = {
    "mode": "enforce",
    "rules": [
        {"identities": ["api", "worker"], "methods": ["GET"], "paths": ["/stream", "/whoami"]},
        {"identities": ["api"], "methods": ["GET"], "paths": ["/admin"]},
    ],
}


def start(aws, tmp_path_factory, **extra: str):
    root = tmp_path_factory.mktemp("asgi")
    port, health = free_port(), free_port()
    env = server_environment(
        aws,
        **{
            **extra,
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_ROUTE_POLICY: json.dumps(POLICY),
            "HOKUSAI_MTLS_METRICS_SECONDS": "1",
            "PYTHONPATH": str(ROOT),  # the test app's module
        },
    )
    log = root / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                str(BIN / "hokusai-mtls"),
                "serve",
                "--app",
                "tests.support.ws_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--health-port",
                str(health),
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    report = wait_healthy(process, health, log)
    yield {"port": port, "health": health, "report": report, "log": log, "root": root, "process": process}
    process.terminate()
    assert process.wait(timeout=20) == 0


@pytest.fixture(scope="module")
def server(aws, tmp_path_factory):
    yield from start(aws, tmp_path_factory)


@pytest.fixture(scope="module")
def permissive(aws, tmp_path_factory):
    """Plain HTTP beside mTLS on one port, no API-key backend: a plain caller is unverified."""
    yield from start(aws, tmp_path_factory, **{names.ENV_MTLS_MODE: names.MTLS_MODE_PERMISSIVE})


class PlainClient:
    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.conn.send(Request(host="localhost", target=path)))


def context(aws, tmp: Path, identity: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pem.bundle_pem(aws["set"].trust_bundle).decode())
    if identity is not None:
        path = tmp / f"{identity}.pem"
        path.write_bytes(aws["set"].identities[identity].combined_pem())
        ctx.load_cert_chain(str(path))
    return ctx


@pytest.fixture(scope="module")
def clients(aws, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    return {name: context(aws, tmp, name) for name in ("api", "worker")} | {None: context(aws, tmp, None)}


class Client:
    """A WebSocket client: wsproto over a TLS socket."""

    def __init__(self, port: int, ctx: ssl.SSLContext, path: str) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.conn.send(Request(host="localhost", target=path)))
        self.pending: list = []

    def event(self):
        while not self.pending:
            data = self.sock.recv(65536)
            self.conn.receive_data(data or None)
            for event in self.conn.events():
                if isinstance(event, Ping):
                    self.sock.sendall(self.conn.send(event.response()))
                elif isinstance(event, TextMessage) and not event.message_finished:
                    self.pending.append(event)  # the caller joins fragments
                else:
                    self.pending.append(event)
            if not data and not self.pending:
                return None
        return self.pending.pop(0)

    def text(self) -> str:
        parts = []
        while True:
            event = self.event()
            assert isinstance(event, TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts)

    def send(self, text: str) -> None:
        self.sock.sendall(self.conn.send(Message(data=text)))

    def close(self) -> None:
        self.sock.close()


def test_a_verified_caller_streams_and_is_known(server, clients):
    client = Client(server["port"], clients["api"], "/stream")
    try:
        assert isinstance(client.event(), AcceptConnection)
        hello = json.loads(client.text())
        assert hello == {"hello": {"service_id": "api", "auth_path": names.AUTH_PATH_MTLS}}
        assert [json.loads(client.text()) for _ in range(STREAMED)] == [{"tick": i} for i in range(STREAMED)]
        client.send("ping me")
        assert client.text() == "echo 7"
    finally:
        client.close()


def test_a_caller_without_certificate_is_refused_at_the_handshake(server, clients):
    client = Client(server["port"], clients[None], "/stream")
    try:
        # TLS 1.3: the server's refusal of the handshake arrives with the first read, never a response
        try:
            answer = client.sock.recv(65536)
        except (ssl.SSLError, ConnectionError) as exc:
            answer = repr(exc).encode()
        assert not answer.startswith(b"HTTP/"), answer
    finally:
        client.close()


def test_a_caller_the_route_policy_does_not_allow_is_refused(server, clients):
    client = Client(server["port"], clients["worker"], "/admin")
    try:
        event = client.event()
        assert isinstance(event, RejectConnection), event
        assert event.status_code == 403
        while not isinstance(event, RejectData) or not event.body_finished:
            event = client.event()
            if event is None:
                break
    finally:
        client.close()
    # the same identity may open the route the policy gives it
    allowed = Client(server["port"], clients["worker"], "/stream")
    try:
        assert isinstance(allowed.event(), AcceptConnection)
        assert json.loads(allowed.text())["hello"]["service_id"] == "worker"
    finally:
        allowed.close()


def test_a_message_over_one_mebibyte_closes_the_connection(server, clients):
    client = Client(server["port"], clients["api"], "/stream")
    try:
        assert isinstance(client.event(), AcceptConnection)
        for _ in range(STREAMED + 1):
            client.text()
        client.send("x" * (1024 * 1024 + 1))
        event = client.event()
        assert isinstance(event, CloseConnection), event
        assert event.code == 1009
    finally:
        client.close()


def test_an_unverified_websocket_caller_is_refused_before_accept(permissive, clients):
    """A plain WebSocket (permissive port) without certificate or key: 403 at the upgrade, never the app."""
    plain = PlainClient(permissive["port"], "/stream")
    try:
        plain.conn.receive_data(plain.sock.recv(65536))
        events = list(plain.conn.events())
        assert isinstance(events[0], RejectConnection), events
        assert events[0].status_code == 403
    finally:
        plain.sock.close()
    # on the same port, a verified caller is let through and identified
    client = Client(permissive["port"], clients["api"], "/stream")
    try:
        assert isinstance(client.event(), AcceptConnection)
        assert json.loads(client.text())["hello"]["service_id"] == "api"
    finally:
        client.close()


def test_http_routes_of_the_same_app_know_the_caller(server, clients):
    with httpx.Client(verify=clients["api"], timeout=10) as http:
        response = http.get(f"https://localhost:{server['port']}/whoami")
    assert response.status_code == 200
    assert response.json() == {"service_id": "api", "auth_path": names.AUTH_PATH_MTLS}


def test_health_and_metrics_on_the_loopback_port(server):
    assert server["report"]["security_level"] == SecurityLevel.MTLS.value
    assert server["report"]["mode"] == names.MTLS_MODE_STRICT
    response = httpx.get(f"http://127.0.0.1:{server['health']}/metrics", timeout=5)
    assert response.status_code == 200


def test_the_log_has_no_traceback(server):
    assert "Traceback" not in server["log"].read_text()
    assert os.path.exists(server["log"])


@pytest.fixture(scope="module")
def bounded(aws, tmp_path_factory):
    """A listener that holds 2 connections: an upgraded connection must give its place back."""
    yield from start(aws, tmp_path_factory, **{names.ENV_MAX_CONNECTIONS: "2"})


def test_a_closed_websocket_gives_its_connection_place_back(bounded, clients):
    for _ in range(5):  # more sessions than the bound holds: each closed one released its slot
        client = Client(bounded["port"], clients["api"], "/stream")
        try:
            assert isinstance(client.event(), AcceptConnection)
            for _ in range(STREAMED + 1):
                client.text()
            client.sock.sendall(client.conn.send(CloseConnection(code=1000)))
            event = client.event()
            assert isinstance(event, CloseConnection), event
        finally:
            client.close()
        time.sleep(0.2)  # the server sees the TCP close


def test_sigterm_closes_open_websockets_and_exits_cleanly(aws, tmp_path_factory, clients):
    """ECS stops a task with SIGTERM: an open session is told (1012, service restart), the exit is 0."""
    running = start(aws, tmp_path_factory)
    server = next(running)
    client = Client(server["port"], clients["api"], "/stream")
    try:
        assert isinstance(client.event(), AcceptConnection)
        for _ in range(STREAMED + 1):
            client.text()
        started = time.monotonic()
        server["process"].terminate()
        event = client.event()
        assert isinstance(event, CloseConnection), event
        assert event.code == 1012  # service restart: reconnect elsewhere
        client.sock.sendall(client.conn.send(event.response()))
        with pytest.raises(StopIteration):
            next(running)  # terminate() again and wait(): exit 0 asserted
        assert time.monotonic() - started < 5  # the answered close lets the app end: no 10 s drain
    finally:
        client.close()


@pytest.fixture(scope="module")
def rollback(aws, tmp_path_factory):
    yield from start(
        aws, tmp_path_factory, **{names.ENV_MTLS_MODE: names.MTLS_MODE_OFF, names.ENV_ENABLE_MTLS: "false"}
    )


def test_rollback_serves_plain_and_refuses_anonymous_websockets(rollback):
    assert rollback["report"]["mode"] == names.MTLS_MODE_OFF
    plain = PlainClient(rollback["port"], "/stream")
    try:
        plain.conn.receive_data(plain.sock.recv(65536))
        events = list(plain.conn.events())
        assert isinstance(events[0], RejectConnection) and events[0].status_code == 403, events
    finally:
        plain.sock.close()
