"""A whole CA rollover under live mutual TLS traffic, with zero refused handshakes.

The MLflow side is a real listener (`runtime.serving.server` + `ReloadableServerContext`) on the files
the loader writes from Secrets Manager (moto). The api and worker clients make requests all the
time from background threads, each over a keep-alive connection and over fresh connections.
Between the rollover steps every service reloads the way it does in ECS: the server re-runs the
loader and `tls.reload()` (its refresh loop), a client re-runs the loader and rebuilds its SSL
context from the new files (what a restarted task does). Not a single request may fail.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from runtime import names
from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
from runtime.clients.adaptive_client import ClientTLS
from runtime.secrets import rollover
from runtime.secrets.loader import LoaderSettings, load_certificates
from runtime.secrets.rollover import RolloverStore
from runtime.serving.server import Listener, Serving
from tests.support.servers import echo_tls, free_port, running

pytestmark = pytest.mark.integration
ENV = "staging"
HOST = names.mlflow_hostname(ENV)


class Fleet:
    """One MLflow server and the api and worker clients, each loading from the store as in ECS."""

    def __init__(self, store: RolloverStore, root: Path) -> None:
        self.store, self.root = store, root
        self.server_dir = root / "mlflow-server"
        self._load(names.SERVER.role, self.server_dir)
        self.tls = ReloadableServerContext(ServerFiles.from_directory(self.server_dir))
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.generation = 0
        self.reload_seconds: list[float] = []
        for role in ("api", "worker"):
            self.reload_client(role)

    def _load(self, role: str, directory: Path):
        settings = LoaderSettings(environment=ENV, role=role, cert_dir=directory)
        return load_certificates(settings, store=self.store)

    def reload_server(self) -> None:
        """`MlflowServer.refresh`: the loader, then the swap into the live listener (timed)."""
        started = time.perf_counter()
        self._load(names.SERVER.role, self.server_dir)
        assert self.tls.reload() is True
        self.reload_seconds.append(time.perf_counter() - started)

    def reload_client(self, role: str) -> None:
        """A (re)started client task: the loader, then an SSL context from the files it wrote."""
        exports = self._load(role, self.root / role).exports()
        context = ClientTLS.from_environ({k: v for k, v in exports.items() if v is not None}).context
        self.contexts[role] = context
        self.generation += 1

    def reload_clients(self) -> None:
        for role in ("api", "worker"):
            self.reload_client(role)


class Traffic:
    """Background callers: per role, one keep-alive client and one fresh connection per request."""

    def __init__(self, fleet: Fleet, port: int) -> None:
        self.fleet, self.url = fleet, f"https://127.0.0.1:{port}/"
        self.done = threading.Event()
        self.failures: list[str] = []
        self.served: dict[str, int] = {}
        self.phase = "start"
        self.threads = [
            threading.Thread(target=loop, args=(role,), daemon=True)
            for role in ("api", "worker")
            for loop in (self._keep_alive, self._fresh)
        ]

    def _request(self, client: httpx.Client, name: str) -> None:
        try:
            response = client.get(self.url, extensions={"sni_hostname": HOST})
            response.raise_for_status()
            self.served[name] = self.served.get(name, 0) + 1
        except Exception as exc:  # every failure counts, whatever it is
            self.failures.append(f"{self.phase} {name}: {exc!r}")

    def _keep_alive(self, role: str) -> None:
        generation, client = -1, None
        while not self.done.is_set():
            if generation != self.fleet.generation:  # new files: rebuild, as a restarted task does
                generation = self.fleet.generation
                if client is not None:
                    client.close()
                client = httpx.Client(verify=self.fleet.contexts[role], timeout=10)
            self._request(client, f"{role} keep-alive")
        client.close()

    def _fresh(self, role: str) -> None:
        while not self.done.is_set():
            with httpx.Client(verify=self.fleet.contexts[role], timeout=10) as client:
                self._request(client, f"{role} fresh")

    def settle(self, at_least: int = 5) -> None:
        """Let every caller complete `at_least` more requests in the current state."""
        marks = {name: self.served.get(name, 0) for name in self._names()}
        deadline = time.monotonic() + 30
        while any(self.served.get(n, 0) < marks[n] + at_least for n in marks):
            assert time.monotonic() < deadline, f"traffic stalled in {self.phase}: {self.served}"
            time.sleep(0.02)

    @staticmethod
    def _names() -> list[str]:
        return [f"{r} {k}" for r in ("api", "worker") for k in ("keep-alive", "fresh")]


def served_certificate(port: int, context: ssl.SSLContext) -> x509.Certificate:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_a_whole_ca_rollover_refuses_no_handshake(secretsmanager, staging_set, tmp_path, capsys):
    store = RolloverStore(ENV, client=secretsmanager)
    store.upload(staging_set)
    old_ca = staging_set.ca.certificate
    fleet = Fleet(store, tmp_path)
    port = free_port()
    with running(Serving([Listener("mtls", "127.0.0.1", port, echo_tls, fleet.tls)])):
        traffic = Traffic(fleet, port)
        for thread in traffic.threads:
            thread.start()
        try:
            traffic.settle()

            traffic.phase = "begin"
            rollover.begin(store)
            new_ca = store.fetch_next_ca().certificate
            traffic.settle()  # nobody has loaded anything yet
            fleet.reload_server()
            traffic.settle()
            fleet.reload_clients()
            traffic.settle()
            assert fleet.tls.certificate.issuer == old_ca.subject  # still the old leaf

            traffic.phase = "switch"
            rollover.switch(store)
            fleet.reload_clients()  # clients first: they present new-CA leaves to a two-CA server
            traffic.settle()
            fleet.reload_server()
            traffic.settle()
            assert fleet.tls.certificate.verify_directly_issued_by(new_ca) is None
            assert served_certificate(port, fleet.contexts["api"]) == fleet.tls.certificate

            traffic.phase = "finish"
            rollover.finish(store)
            fleet.reload_server()
            traffic.settle()
            fleet.reload_clients()
            traffic.settle()
        finally:
            traffic.done.set()
            for thread in traffic.threads:
                thread.join(15)
        assert traffic.failures == []
        assert sum(traffic.served.values()) > 100

        assert store.fetch_trust_bundle() == [new_ca]
        stale = ssl.create_default_context(cafile=str(tmp_path / "api" / names.CA_BUNDLE_FILE))
        stale_pem = tmp_path / "old-api.pem"
        stale_pem.write_bytes(staging_set.identities["api"].combined_pem())
        stale.load_cert_chain(stale_pem)
        with httpx.Client(verify=stale) as client, pytest.raises(httpx.TransportError):
            client.get(f"https://127.0.0.1:{port}/", extensions={"sni_hostname": HOST})

    with capsys.disabled():
        print(
            f"\nCA rollover: {sum(traffic.served.values())} requests, 0 failed; server reload "
            f"(loader + tls.reload) max {max(fleet.reload_seconds) * 1000:.0f} ms over "
            f"{len(fleet.reload_seconds)} reloads"
        )
