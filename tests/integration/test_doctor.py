"""`hokusai-mtls doctor` against the real serve-mlflow (mTLS from moto's Secrets Manager), as an operator
runs it inside a task: every step passes for a caller of MLflow; a stopped server, an environment
without secrets and a server of another environment each fail at their own step, with a fix, exit 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from local_stack.environment import service_environment
from runtime.certificates.tls_context import ReloadableServerContext
from runtime.serving.server import Listener, Serving
from tests.integration.conftest import ENV
from tests.integration.test_tls_serving import server_files
from tests.support.servers import echo_tls, free_port, running

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "runtime.cli"]


def doctor(aws: dict, *args: str, env: str = ENV) -> subprocess.CompletedProcess:
    environment = service_environment(env, aws["endpoint"])
    return subprocess.run(
        [*CLI, "doctor", *args], capture_output=True, text=True, check=False, env=environment, timeout=120
    )


def steps(result: subprocess.CompletedProcess) -> dict[str, dict]:
    document = json.loads(result.stdout)
    return {step["name"]: step for step in document["steps"]}


def test_every_step_passes_for_a_caller_of_mlflow(aws, mlflow_server):
    result = doctor(aws, "--role", "api", "--connect", f"mlflow=127.0.0.1:{mlflow_server['port']}", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    found = steps(result)
    assert list(found) == [
        "secrets",
        "certificate",
        "mlflow: dns",
        "mlflow: tcp",
        "mlflow: tls",
        "mlflow: accepted",
        "mlflow: mlflow",
    ]
    assert {step["status"] for step in found.values()} == {"ok"}
    assert f"mlflow.hokusai-{ENV}.local" in found["mlflow: tls"]["detail"]
    assert "HTTP 200" in found["mlflow: accepted"]["detail"]
    assert "PRIVATE KEY" not in result.stdout + result.stderr


def test_a_server_that_does_not_answer_fails_at_tcp_with_the_security_group_fix(aws):
    result = doctor(aws, "--role", "worker", "--connect", f"mlflow=127.0.0.1:{free_port()}", "--timeout", "2")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL    mlflow: tcp:"), result.stdout
    assert any("fix: only the declared callers of mlflow reach port" in line for line in lines)
    assert any(line.startswith("SKIPPED mlflow: tls") for line in lines)


def test_an_environment_without_secrets_fails_at_the_first_step_naming_them(aws):
    # moto's state is one per process: an environment no other test writes secrets for
    result = doctor(aws, "--role", "api", "--json", env="doctor-empty")
    assert result.returncode == 1
    found = steps(result)
    assert list(found) == ["secrets"]
    assert found["secrets"]["status"] == "fail"
    assert "hokusai/doctor-empty/mlflow/api-identity" in found["secrets"]["fix"]


def test_a_server_of_another_environment_fails_at_tls_naming_the_certificate_problem(
    aws, tmp_path, development_set
):
    """A server presenting development's leaf to a staging caller: our CA did not sign it."""
    tls = ReloadableServerContext(
        server_files(tmp_path / "server", development_set.identities["server"], development_set.trust_bundle)
    )
    port = free_port()
    with running(Serving([Listener("mtls", "127.0.0.1", port, echo_tls, tls)])):
        result = doctor(aws, "--role", "api", "--connect", f"mlflow=127.0.0.1:{port}", "--json")
    assert result.returncode == 1
    found = steps(result)
    assert found["mlflow: tcp"]["status"] == "ok"
    assert found["mlflow: tls"]["status"] == "fail"
    assert "certificate" in found["mlflow: tls"]["detail"] and "CA" in found["mlflow: tls"]["fix"]
    assert found["mlflow: accepted"]["status"] == "skipped"


def test_connect_may_name_only_a_server_the_role_calls(aws):
    result = doctor(aws, "--role", "api", "--connect", "billing=127.0.0.1:1")
    assert result.returncode == 2 and "role api does not call it" in result.stderr


def test_a_server_role_reads_the_revocation_lists_as_its_loader_does(aws):
    """serve-mlflow's loader reads `ca-crl`; so does its doctor, and a list nobody can trust fails there."""
    from runtime import names
    from runtime.certificates import pem
    from tests.support.certs import forged_list

    lists = names.secret_name(ENV, names.CA_REVOCATIONS_SECRET)
    result = doctor(aws, "--role", "mlflow-server", "--json")
    found = steps(result)
    assert found["secrets"]["status"] == "ok" and lists in found["secrets"]["detail"], result.stdout
    assert lists not in steps(doctor(aws, "--role", "worker", "--json"))["secrets"]["detail"]  # a client
    forged = pem.crls_pem([forged_list(aws["set"].ca, [1])]).decode()
    aws["client"].put_secret_value(SecretId=lists, SecretString=forged)
    try:
        found = steps(doctor(aws, "--role", "mlflow-server", "--json"))
    finally:
        aws["client"].put_secret_value(SecretId=lists, SecretString="\n")  # nothing revoked, as before
    assert found["secrets"]["status"] == "fail" and "revocation list #1" in found["secrets"]["detail"]
    assert lists in found["secrets"]["fix"]
