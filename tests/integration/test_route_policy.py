"""Authorization by identity and route on the real MLflow server (`serve-mlflow`, the image's
command), its callers presenting their certificates over real TLS:

- enforce: the worker may read and write runs but not delete an experiment; the api may only
  search. A refused request never reaches MLflow (the experiment is still there), and is counted;
- audit (Istio's dry-run): the same request goes through, and is counted as would-deny;
- MLflow's built-in route table (`routes: ["mlflow:read"]`): the api may search (a POST that reads) and
  get, and may not create, without the policy listing MLflow's routes;
- an identity the server does not accept at all (a certificate from the same CA for a service it
  was not configured with) is refused whatever the policy says.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path

import httpx
import pytest

from runtime import names
from runtime.certificates import pem
from tests.integration.conftest import server_environment, start_serve_mlflow, wait_healthy
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = [
    {"identities": ["worker"], "methods": ["GET", "POST"], "paths": ["/api/2.0/mlflow/**"]},
    {"identities": ["api"], "methods": ["POST", "GET"], "paths": ["/api/2.0/mlflow/experiments/search"]},
]


def start(aws, root: Path, mode: str, rules: list[dict] = RULES):
    root.mkdir(parents=True, exist_ok=True)
    port, health = free_port(), free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{root}/mlflow.db",
            names.ENV_MLFLOW_ARTIFACTS_DESTINATION: str(root / "artifacts"),
            names.ENV_ROUTE_POLICY: json.dumps({"mode": mode, "rules": rules}),
        },
    )
    log = root / "server.log"
    process = start_serve_mlflow(env, port, health, log)
    try:
        wait_healthy(process, health, log)
    except BaseException:
        process.kill()
        raise
    return process, port, health, log


def client(aws, root: Path, identity: str) -> httpx.Client:
    files = aws["set"].identities[identity]
    path = root / f"{identity}.pem"
    path.write_bytes(files.combined_pem())
    context = ssl.create_default_context(cadata=pem.bundle_pem(aws["set"].trust_bundle).decode())
    context.load_cert_chain(str(path))
    return httpx.Client(base_url="", verify=context, timeout=30)


def metric(health: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics", timeout=5) as response:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in response.read().decode().splitlines()
            if line.startswith(name + "{")
        )


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_the_route_policy_refuses_or_counts_what_no_rule_allows(aws, tmp_path, mode):
    process, port, health, log = start(aws, tmp_path / mode, mode)
    base = f"https://localhost:{port}/api/2.0/mlflow"
    worker, api = client(aws, tmp_path, "worker"), client(aws, tmp_path, "api")
    try:
        made = worker.post(f"{base}/experiments/create", json={"name": f"policy-{mode}"})
        assert made.status_code == 200, made.text
        experiment = made.json()["experiment_id"]
        assert api.post(f"{base}/experiments/search", json={"max_results": 5}).status_code == 200

        # DELETE is not among the worker's methods (MLflow's delete is a POST: use a GET the api lacks)
        got = api.get(f"{base}/experiments/get", params={"experiment_id": experiment})
        if mode == "enforce":
            assert got.status_code == 403 and "route policy" in got.text
            assert metric(health, "hokusai_mtls_route_policy_denied_total") == 1
        else:
            assert got.status_code == 200 and got.json()["experiment"]["name"] == f"policy-{mode}"
            assert metric(health, "hokusai_mtls_route_policy_would_deny_total") == 1
            assert "route policy (audit mode) would deny api: GET" in log.read_text()
        deleted = api.post(f"{base}/experiments/delete", json={"experiment_id": experiment})
        assert deleted.status_code == (403 if mode == "enforce" else 200)
        still = worker.get(f"{base}/experiments/get", params={"experiment_id": experiment})
        assert still.json()["experiment"]["lifecycle_stage"] == ("active" if mode == "enforce" else "deleted")
    finally:
        worker.close()
        api.close()
        process.terminate()
        process.wait(timeout=30)


def test_an_identity_the_server_was_not_configured_with_is_refused_whatever_the_policy(aws, tmp_path):
    process, port, _health, _log = start(aws, tmp_path / "rogue", "audit")
    rogue = aws["set"].ca.issue_client("staging", "rogue")  # the environment's own CA, an undeclared service
    path = tmp_path / "rogue.pem"
    path.write_bytes(rogue.combined_pem())
    context = ssl.create_default_context(cadata=pem.bundle_pem(aws["set"].trust_bundle).decode())
    context.load_cert_chain(str(path))
    try:
        with httpx.Client(verify=context, timeout=30) as rogue_client:
            refused = rogue_client.post(
                f"https://localhost:{port}/api/2.0/mlflow/experiments/search", json={"max_results": 1}
            )
        assert refused.status_code == 403
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_mlflows_route_table_lets_a_reader_search_over_post_and_refuses_its_writes(aws, tmp_path):
    rules = [
        {"identities": ["worker"], "routes": ["mlflow:read", "mlflow:write"]},
        {"identities": ["api"], "routes": ["mlflow:read"]},
    ]
    process, port, health, _log = start(aws, tmp_path / "table", "enforce", rules)
    base = f"https://localhost:{port}/api/2.0/mlflow"
    worker, api = client(aws, tmp_path, "worker"), client(aws, tmp_path, "api")
    try:
        made = worker.post(f"{base}/experiments/create", json={"name": "route-table"})
        assert made.status_code == 200, made.text
        experiment = made.json()["experiment_id"]
        searched = api.post(f"{base}/experiments/search", json={"max_results": 5})
        assert searched.status_code == 200
        assert "route-table" in {e["name"] for e in searched.json()["experiments"]}
        assert api.get(f"{base}/experiments/get", params={"experiment_id": experiment}).status_code == 200
        refused = api.post(f"{base}/experiments/create", json={"name": "not-yours"})
        assert refused.status_code == 403 and "route policy" in refused.text
        assert api.post(f"{base}/experiments/delete", json={"experiment_id": experiment}).status_code == 403
        assert metric(health, "hokusai_mtls_route_policy_denied_total") == 2
        still = worker.get(f"{base}/experiments/get", params={"experiment_id": experiment})
        assert still.json()["experiment"]["lifecycle_stage"] == "active"
        listed = worker.post(f"{base}/experiments/search", json={"max_results": 100})
        assert listed.status_code == 200, listed.text
        listed_names = {e["name"] for e in listed.json()["experiments"]}
        assert "route-table" in listed_names and "not-yours" not in listed_names
    finally:
        worker.close()
        api.close()
        process.terminate()
        process.wait(timeout=30)
