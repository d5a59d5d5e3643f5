"""The failure log's bounds and the reasons of failures that need no certificate (timeout, reset); the
certificate reasons are proved over real TLS in tests/integration/test_handshake_failures.py."""

from __future__ import annotations

import logging
import ssl

import pytest

from runtime import names
from runtime.observability.metrics import Metrics
from runtime.serving.handshake_failures import FailureLog, classify


def test_a_handshake_timeout_and_a_reset_have_their_own_reasons():
    timed_out = ConnectionAbortedError(
        "SSL handshake is taking longer than 5.0 seconds: aborting the connection"
    )
    assert classify(timed_out) == names.HANDSHAKE_TIMEOUT
    assert classify(TimeoutError()) == names.HANDSHAKE_TIMEOUT
    assert classify(ConnectionResetError()) == names.HANDSHAKE_RESET
    assert classify(ssl.SSLEOFError()) == names.HANDSHAKE_RESET


def test_the_log_names_each_address_and_reason_once_per_interval_and_remembers_a_bounded_number(caplog):
    now = [0.0]
    failures = FailureLog("mtls", interval=60, max_peers=2, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="hokusai_mtls"):
        for _ in range(3):
            failures.failed(names.HANDSHAKE_EXPIRED, "10.0.1.5", "certificate has expired")
        failures.failed(names.HANDSHAKE_UNKNOWN_CA, "10.0.1.5", "unable to get local issuer certificate")
        for n in range(50):  # a scanner: beyond max_peers, only counted
            failures.failed(names.HANDSHAKE_PROTOCOL, f"10.9.0.{n}", "WRONG_VERSION_NUMBER")
        assert len(caplog.records) == 2
        now[0] = 61.0
        failures.failed(names.HANDSHAKE_EXPIRED, "10.0.1.5", "certificate has expired")
    lines = [record.getMessage() for record in caplog.records]
    assert "50 more refused handshakes from other addresses were not logged" in lines[2]
    assert "10.0.1.5 refused: expired" in lines[3]
    assert len(lines) == 4


def test_worker_intervals_carry_the_reasons_to_the_supervisor_and_refuse_unknown_ones():
    worker = Metrics(environment="staging", service="mlflow")
    worker.handshake_failed(names.HANDSHAKE_EXPIRED)
    worker.handshake_failed(names.HANDSHAKE_EXPIRED)
    supervisor = Metrics(environment="staging", service="mlflow")
    supervisor.add_interval(worker.take_interval())
    assert 'reason="expired",service="mlflow"} 2.0' in supervisor.prometheus().decode()
    with pytest.raises(ValueError, match="unknown handshake failure reason"):
        supervisor.add_interval(
            {**Metrics(environment="staging", service="mlflow").take_interval(), "failed": [["x", 1]]}
        )
    with pytest.raises(ValueError, match="not a handshake failure reason"):
        worker.handshake_failed("because")
