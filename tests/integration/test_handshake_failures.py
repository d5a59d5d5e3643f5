"""Why a handshake failed (issue 16), over real TLS on loopback: each kind of refused client is counted
under its own reason (the Prometheus counter and the EMF view with a `Reason` dimension), and logged once
per address and reason with OpenSSL's words; the failure-rate count (started - completed) is unchanged."""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import ssl
from pathlib import Path

import pytest

from runtime import names
from runtime.certificates.identity import TLSIdentity
from runtime.certificates.tls_context import ReloadableServerContext
from runtime.observability.metrics import Metrics
from runtime.serving.server import Listener, Serving
from tests.integration.test_tls_serving import HOST, client_context, server_files
from tests.support.servers import echo_tls, free_port, running

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path, development_set):
    metrics = Metrics(environment="development", service=names.MLFLOW_SERVICE)
    tls = ReloadableServerContext(
        server_files(tmp_path / "server", development_set.identities["server"], development_set.trust_bundle),
        on_handshake=metrics.handshake_started,
    )
    port = free_port()
    listener = Listener(
        "mtls",
        "127.0.0.1",
        port,
        echo_tls,
        tls,
        metrics.handshake_completed,
        on_handshake_failure=metrics.handshake_failed,
    )
    with running(Serving([listener])):
        yield port, metrics


def attempt(port: int, context: ssl.SSLContext) -> None:
    """Handshake and read: under TLS 1.3 the server's refusal of a client certificate arrives after the
    client thinks the handshake is done, on the first read."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=HOST) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass


def failures(metrics: Metrics) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in metrics.prometheus().decode().splitlines():
        if line.startswith("hokusai_mtls_handshake_failures_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def wait_for(metrics: Metrics, expected: dict[str, int]) -> dict[str, int]:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if failures(metrics) == expected:
            break
        time.sleep(0.05)
    return failures(metrics)


def client_with(tmp_path: Path, trusted: list, identity: TLSIdentity | None, name: str) -> ssl.SSLContext:
    return client_context(trusted, identity, tmp_path / name)


def test_each_refused_client_is_counted_under_its_reason(
    server, tmp_path, development_set, staging_set, caplog
):
    port, metrics = server
    bundle, ca = development_set.trust_bundle, development_set.ca
    now = dt.datetime.now(dt.UTC)
    cases = {
        names.HANDSHAKE_NO_CERTIFICATE: client_with(tmp_path, bundle, None, "none"),
        names.HANDSHAKE_UNKNOWN_CA: client_with(tmp_path, bundle, staging_set.identities["api"], "foreign"),
        names.HANDSHAKE_EXPIRED: client_with(
            tmp_path,
            bundle,
            ca.issue_client("development", "api", lifetime_hours=24, now=now - dt.timedelta(days=3)),
            "old",
        ),
        names.HANDSHAKE_NOT_YET_VALID: client_with(
            tmp_path,
            bundle,
            ca.issue_client("development", "api", lifetime_hours=24, now=now + dt.timedelta(days=3)),
            "new",
        ),
        names.HANDSHAKE_WRONG_USAGE: client_with(
            tmp_path, bundle, development_set.identities["server"], "server"
        ),
        names.HANDSHAKE_PEER_ALERT: client_with(
            tmp_path, staging_set.trust_bundle, development_set.identities["api"], "distrust"
        ),
    }
    expected: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="hokusai_mtls"):
        for reason, context in cases.items():
            attempt(port, context)
            attempt(port, context)  # twice: counted twice, logged once
            expected[reason] = 2
            assert wait_for(metrics, expected) == expected, reason
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # plain HTTP to the TLS port
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.recv(100)
        expected[names.HANDSHAKE_PROTOCOL] = 1
        assert wait_for(metrics, expected) == expected

    refused = [
        r.getMessage() for r in caplog.records if "mTLS handshake from 127.0.0.1 refused" in r.getMessage()
    ]
    assert sorted(line.split("refused: ", 1)[1].split(" ", 1)[0] for line in refused) == sorted(expected)
    assert any("expired (certificate has expired)" in line for line in refused)
    # A good client still gets through, and nothing it does is counted as a failure.
    attempt(port, client_with(tmp_path, bundle, development_set.identities["api"], "good"))
    assert failures(metrics) == expected

    emf = [document for document in metrics.flush() if names.DIM_REASON in document]
    assert {d[names.DIM_REASON]: d[names.METRIC_MTLS_HANDSHAKE_FAILURES] for d in emf} == expected
    for document in emf:
        (dimensions,) = document["_aws"]["CloudWatchMetrics"][0]["Dimensions"]
        assert dimensions == [names.DIM_ENVIRONMENT, names.DIM_SERVICE, names.DIM_REASON]
    assert json.dumps(emf).count("PRIVATE KEY") == 0
