"""The local stack's data-pipeline worker: log one MLflow run over mTLS, print what it did, exit.

It runs as the worker image runs its command, behind `docker/entrypoint.sh`
(`hokusai-mtls run --role worker -- python -m local_stack.worker`): the loader has fetched
the worker's identity from Secrets Manager, written it, and exported the only two TLS
variables MLflow's client knows (`MLFLOW_TRACKING_CLIENT_CERT_PATH`,
`MLFLOW_TRACKING_SERVER_CERT_PATH`). This code sets no TLS option itself, which is the point:
a real worker's MLflow code runs unchanged.

The last line on stdout is one JSON object (run, experiment, security level, the identity it
presented) for the local stack to report.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from runtime import names
from runtime.certificates.inspection import uris

EXPERIMENT = "local-stack"
RUN_NAME = "local-stack-worker"
PARAMS = {"source": "local_stack.worker", "identity": "worker"}
LOSSES = [1.0, 0.5, 0.25, 0.125, 0.0625]
ARTIFACT = "report.txt"


def wait_for_port(url: str, seconds: float = 60) -> None:
    """Wait until the tracking server accepts TCP connections (ECS starts tasks in parallel too).

    Only the connection is awaited: a TLS or HTTP refusal afterwards is an error, not a retry.
    """
    parts = urlsplit(url)
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((parts.hostname, parts.port or 443), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def presented_identity() -> dict[str, str | None]:
    """The certificate MLflow's client will present: its serial and SPIFFE ID (None at TLS/INSECURE)."""
    path = os.environ.get(names.ENV_MLFLOW_CLIENT_CERT)
    if not path:
        return {"serial": None, "spiffe_id": None}
    certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())  # the first block: the leaf
    return {"serial": f"{certificate.serial_number:x}", "spiffe_id": next(iter(uris(certificate)), None)}


def main() -> int:
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    import mlflow  # after the environment is read: MLflow reads its variables at call time anyway

    wait_for_port(tracking_uri)
    experiment = mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=RUN_NAME) as run:
        mlflow.log_params(PARAMS)
        for step, loss in enumerate(LOSSES):
            mlflow.log_metric("loss", loss, step=step)
        with tempfile.TemporaryDirectory() as scratch:
            report = Path(scratch) / ARTIFACT
            report.write_text("logged by the local stack's worker over mTLS\n")
            mlflow.log_artifact(str(report))  # proxied artifacts: the same certificate
    result = {
        "run_id": run.info.run_id,
        "experiment_id": experiment.experiment_id,
        "experiment": EXPERIMENT,
        "tracking_uri": tracking_uri,
        "security_level": os.environ.get(names.ENV_SECURITY_LEVEL),
        **presented_identity(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
