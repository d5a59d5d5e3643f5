"""MLflow's own client against MLflow as ECS runs it: by its Cloud Map name, over mTLS, on
PostgreSQL with artifacts in S3, from the worker's own host with the files its loader wrote.

Each client is a separate process in the `worker` namespace (`ip netns exec`), so
`mlflow.hokusai-staging.local` resolves through that namespace's hosts file to MLflow's
address, as Cloud Map's DNS answers in the VPC; the server's certificate names only that name.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.deployed import ARTIFACT_PREFIX, MLFLOW_NAME

pytestmark = [pytest.mark.deployed, pytest.mark.slow]

WORKFLOW = """
import json, os, tempfile, time
from pathlib import Path
import mlflow
from mlflow import MlflowClient
from cryptography import x509

name = os.environ["EXPERIMENT"]
client = MlflowClient()
experiment_id = mlflow.create_experiment(name)
with mlflow.start_run(experiment_id=experiment_id) as run:
    mlflow.log_params({"alpha": "0.5", "rows": "1000"})
    for step, loss in enumerate([1.0, 0.5, 0.25]):
        mlflow.log_metric("loss", loss, step=step)
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.txt"
        report.write_text(os.environ["ARTIFACT_TEXT"])
        mlflow.log_artifact(str(report), artifact_path="reports")
run_id = run.info.run_id
model = f"{name}-model"
client.create_registered_model(model)
version = client.create_model_version(model, source=f"runs:/{run_id}/reports", run_id=run_id)
found = client.search_runs([experiment_id], filter_string="params.alpha = '0.5'")
fetched = client.get_run(run_id)
downloaded = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="reports/report.txt")
leaf = x509.load_pem_x509_certificate(Path(os.environ["MLFLOW_TRACKING_CLIENT_CERT_PATH"]).read_bytes())
print(json.dumps({
    "tracking_uri": mlflow.get_tracking_uri(),
    "security_level": os.environ.get("HOKUSAI_MTLS_SECURITY_LEVEL"),
    "presented": [u.value for u in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                  if isinstance(u, x509.UniformResourceIdentifier)],
    "experiment_id": experiment_id,
    "experiments": [e.name for e in client.search_experiments(filter_string=f"name = '{name}'")],
    "run_id": run_id,
    "found_runs": [r.info.run_id for r in found],
    "params": fetched.data.params,
    "loss": [m.value for m in client.get_metric_history(run_id, "loss")],
    "artifact_uri": fetched.info.artifact_uri,
    "artifact": Path(downloaded).read_text(),
    "model_version_run": client.get_model_version(model, version.version).run_id,
    "models": [m.name for m in client.search_registered_models(filter_string=f"name = '{model}'")],
}))
"""


@pytest.fixture(scope="module")
def worker_run(deployed):
    """One run logged by the worker, as the worker image runs its command."""
    name = f"deployed-{time.time_ns()}"
    text = f"written by the worker over mTLS at {time.time()}\n"
    result = deployed.worker(WORKFLOW, EXPERIMENT=name, ARTIFACT_TEXT=text).json()
    return {"name": name, "text": text, **result}


def test_the_worker_reaches_mlflow_by_its_cloud_map_name_with_its_own_certificate(worker_run, deployed):
    assert worker_run["tracking_uri"] == f"https://{MLFLOW_NAME}:5000"
    assert worker_run["security_level"] == "MTLS"
    assert worker_run["presented"] == ["spiffe://hokusai/staging/worker"]


def test_the_worker_logs_and_reads_back_a_run(worker_run):
    assert worker_run["experiments"] == [worker_run["name"]]
    assert worker_run["found_runs"] == [worker_run["run_id"]]
    assert worker_run["params"] == {"alpha": "0.5", "rows": "1000"}
    assert worker_run["loss"] == [1.0, 0.5, 0.25]
    assert worker_run["artifact"] == worker_run["text"]


def test_the_model_registry_works(worker_run):
    assert worker_run["models"] == [f"{worker_run['name']}-model"]
    assert worker_run["model_version_run"] == worker_run["run_id"]


def test_artifacts_land_in_the_s3_bucket_through_mlflow_s_proxy(worker_run, deployed):
    """The client sends artifacts to MLflow (`mlflow-artifacts:`); MLflow writes them to S3."""
    assert worker_run["artifact_uri"].startswith("mlflow-artifacts:/")
    key = (
        f"{ARTIFACT_PREFIX}/{worker_run['experiment_id']}/{worker_run['run_id']}/artifacts/reports/report.txt"
    )
    assert key in deployed.s3_keys()


def test_runs_are_stored_in_postgresql(worker_run, deployed):
    code = (
        "import json, os, psycopg\n"
        "with psycopg.connect(os.environ['DB'], connect_timeout=10) as c:\n"
        "    rows = c.execute('SELECT run_uuid FROM runs WHERE run_uuid = %s', (os.environ['RUN'],)).fetchall()\n"
        "print(json.dumps([r[0] for r in rows]))\n"
    )
    env = deployed.base_env(DB=deployed.postgres.url(), RUN=worker_run["run_id"])
    assert deployed.python("mlflow", code, env=env).json() == [worker_run["run_id"]]


# --- an identity that may only read (HOKUSAI_MTLS_SERVICE_SCOPES: reporter -> mlflow:read) -------
READS = """
import json, os
import mlflow
from mlflow import MlflowClient
client = MlflowClient()
out = {}
def attempt(label, fn):
    try:
        out[label] = {"ok": True, "value": fn()}
    except Exception as exc:
        out[label] = {"ok": False, "error": type(exc).__name__, "code": getattr(exc, "error_code", None),
                      "message": str(exc)[:300]}
run_id, experiment_id, name = os.environ["RUN"], os.environ["EXPERIMENT_ID"], os.environ["EXPERIMENT"]
OPERATIONS = os.environ["OPERATIONS"].split(",")
if "get" in OPERATIONS:
    attempt("get_run", lambda: client.get_run(run_id).data.params)
    attempt("get_experiment", lambda: client.get_experiment(experiment_id).name)
    attempt("get_metric_history", lambda: [m.value for m in client.get_metric_history(run_id, "loss")])
    attempt("get_registered_model", lambda: client.get_registered_model(name + "-model").name)
    attempt("download_artifact", lambda: open(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="reports/report.txt")).read())
if "search" in OPERATIONS:
    attempt("search_experiments", lambda: [e.name for e in client.search_experiments(filter_string=f"name = '{name}'")])
    attempt("search_runs", lambda: [r.info.run_id for r in client.search_runs([experiment_id])])
    attempt("search_registered_models", lambda: [m.name for m in client.search_registered_models()])
if "write" in OPERATIONS:
    attempt("create_experiment", lambda: client.create_experiment(name + "-by-reporter"))
    attempt("log_metric", lambda: client.log_metric(run_id, "reporter", 1.0))
    attempt("set_tag", lambda: client.set_tag(run_id, "reporter", "yes"))
    attempt("create_registered_model", lambda: client.create_registered_model(name + "-reporter").name)
print(json.dumps(out))
"""


def as_reporter(deployed, worker_run, operations: str) -> dict:
    files = deployed.client_files("reporter")
    return deployed.mlflow_client(
        "worker",
        READS,
        files,
        RUN=worker_run["run_id"],
        EXPERIMENT_ID=worker_run["experiment_id"],
        EXPERIMENT=worker_run["name"],
        OPERATIONS=operations,
    ).json()


def test_a_read_only_identity_can_get(deployed, worker_run):
    results = as_reporter(deployed, worker_run, "get")
    failed = {k: v for k, v in results.items() if not v["ok"]}
    assert not failed, json.dumps(failed, indent=1)
    assert results["get_run"]["value"] == {"alpha": "0.5", "rows": "1000"}
    assert results["download_artifact"]["value"] == worker_run["text"]


def test_a_read_only_identity_can_search(deployed, worker_run):
    """MLflow searches with POST: read or write must follow MLflow's route, not the HTTP method."""
    results = as_reporter(deployed, worker_run, "search")
    failed = {k: v for k, v in results.items() if not v["ok"]}
    assert not failed, json.dumps(failed, indent=1)
    assert results["search_experiments"]["value"] == [worker_run["name"]]
    assert results["search_runs"]["value"] == [worker_run["run_id"]]


def test_a_read_only_identity_cannot_write(deployed, worker_run):
    results = as_reporter(deployed, worker_run, "write")
    allowed = {k: v for k, v in results.items() if v["ok"]}
    assert not allowed, f"a read-only identity wrote: {allowed}"
    for label, outcome in results.items():
        assert outcome["code"] == "PERMISSION_DENIED" or "403" in outcome["message"], (label, outcome)
