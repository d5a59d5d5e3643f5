"""The external path as deployed: a client on another host → the ALB (TLS) → the API's port →
MLflow, which the API dials by its Cloud Map name with its own certificate.

The client is curl in the `attacker` namespace (an ordinary host with no certificate of its
own): it resolves the ALB's name through its hosts file and trusts the ALB's CA only.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.deployed, pytest.mark.slow]

SEARCH = "/mlflow/api/2.0/mlflow/experiments/search?max_results=5"


def through_alb(deployed, path: str, *headers: str, role: str = "attacker", files=None):
    args = ["--cacert", str(deployed.alb.certificate.ca_file), "-w", "\n%{http_code}"]
    for header in headers:
        args += ["-H", header]
    if files is not None:  # a client certificate for the ALB's mutual TLS
        args += ["--cert", str(files.cert), "--key", str(files.key)]
    ran = deployed.curl(role, [*args, f"{deployed.alb_url}{path}"])
    assert ran.returncode == 0, ran.stderr
    body, _, status = ran.stdout.rpartition("\n")
    return int(status), body


def test_an_api_key_reaches_mlflow_through_the_alb_and_the_api(deployed):
    status, body = through_alb(deployed, SEARCH, f"X-API-Key: {deployed.active_key}")
    assert status == 200, body
    assert "Default" in [e["name"] for e in json.loads(body)["experiments"]]


def test_a_bearer_key_works_too(deployed):
    status, body = through_alb(deployed, SEARCH, f"Authorization: Bearer {deployed.active_key}")
    assert status == 200, body


@pytest.mark.parametrize(
    "headers", [(), ("X-API-Key: hk_test_unknown_0123456789abcdef",)], ids=["no-key", "unknown-key"]
)
def test_without_a_valid_key_401(deployed, headers):
    status, body = through_alb(deployed, SEARCH, *headers)
    assert status == 401, body


def test_the_api_reports_its_mlflow_by_the_cloud_map_name(deployed):
    status, body = through_alb(deployed, "/health")
    assert status == 200, body
    report = json.loads(body)
    assert report["mlflow"] == deployed.mlflow_url and report["security_level"] == "MTLS"


def test_a_service_with_its_certificate_at_the_alb_needs_no_key(deployed):
    """The ALB verifies the worker's certificate and forwards it (`X-Amzn-Mtls-Clientcert-Leaf`);
    the API, told its proxy is an ALB, maps it to `worker` without an API key."""
    status, body = through_alb(deployed, SEARCH, role="worker", files=deployed.client_files("worker"))
    assert status == 200, body
