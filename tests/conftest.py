"""Fixtures shared by unit and integration tests: moto-backed AWS and issued certificate sets."""

from __future__ import annotations

import os
import subprocess
import urllib.request

import boto3
import pytest
from hypothesis import HealthCheck, settings
from moto import mock_aws

from runtime import names
from runtime.certificates.certset import CertificateSet
from runtime.secrets import mlflow_config

REGION = "us-east-1"

# Hypothesis profiles. `suite` (what `make test` loads): 100 examples per property, no deadline,
# because a loaded CI machine makes per-example timing noise, not a finding. `fuzz` (`make fuzz`,
# `pytest --hypothesis-profile=fuzz`): HOKUSAI_MTLS_FUZZ_EXAMPLES per property (20,000).
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "fuzz",
    parent=settings.get_profile("suite"),
    max_examples=int(os.environ.get("HOKUSAI_MTLS_FUZZ_EXAMPLES", "20000")),
)
settings.load_profile("suite")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """No test sees the developer's AWS profile or a previous test's variables; no real AWS call."""
    for variable in (
        names.ENV_ENVIRONMENT,
        names.ENV_ENABLE_MTLS,
        names.ENV_ROLE,
        names.ENV_CERT_DIR,
        names.ENV_MLFLOW_CLIENT_CERT,
        names.ENV_MLFLOW_SERVER_CERT,
        names.ENV_MLFLOW_INSECURE_TLS,
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SECRETS_MANAGER",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv(names.ENV_DEV_CA_DIR, str(tmp_path / "dev-ca"))
    mlflow_config.reset_for_tests()
    yield
    mlflow_config.reset_for_tests()


@pytest.fixture
def secretsmanager():
    """A Secrets Manager client backed by moto, in-process."""
    with mock_aws():
        yield boto3.client("secretsmanager", region_name=REGION)


@pytest.fixture(scope="session")
def development_set() -> CertificateSet:
    return CertificateSet.issue("development", server_sans=("localhost", "127.0.0.1"))


@pytest.fixture(scope="session")
def staging_set() -> CertificateSet:
    return CertificateSet.issue("staging", server_sans=("localhost", "127.0.0.1"))


@pytest.fixture
def moto_server(monkeypatch):
    """moto's real HTTP server on 127.0.0.1 for subprocesses (the CLI); stopped after the test.

    Yields the environment a subprocess needs to reach it through boto3's standard
    `AWS_ENDPOINT_URL_SECRETS_MANAGER` variable, as a user would point the CLI at it.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))  # noqa: S310
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", endpoint)
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on 127.0.0.1 (no persistence) for the session; FAILS if it is missing."""
    from local_stack.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    problem = None
    try:
        server.start()
    except RuntimeError as exc:
        problem = str(exc)
    if problem:  # outside the except: the message alone, no chained traceback
        pytest.fail(problem, pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL on 127.0.0.1 (tests/support/postgres.py) for the session; FAILS if it is missing."""
    from local_stack.ports import free_port
    from tests.support.postgres import PostgresServer

    server = PostgresServer("127.0.0.1", free_port())
    problem = None
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
        server.stop()
    if problem:  # outside the except: the message alone, no chained traceback
        pytest.fail(problem, pytrace=False)
    try:
        yield server
    finally:
        server.stop()
