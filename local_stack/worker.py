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
ENV_STREAMING_URL = "HOKUSAI_LOCAL_STREAMING_URL"
"""The local streaming server's `wss://` base URL; unset: the worker streams nothing."""
STREAM_SECONDS = 10.0


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


def open_stream(base_url: str, path: str) -> dict:
    """One WebSocket to `path` over mTLS, with the certificate and bundle the loader exported for MLflow.

    Returns what the server said: the accepted stream's messages, or the status of its refusal.
    """
    import ssl

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage

    parts = urlsplit(base_url)
    context = ssl.create_default_context(cafile=os.environ[names.ENV_MLFLOW_SERVER_CERT])
    context.load_cert_chain(os.environ[names.ENV_MLFLOW_CLIENT_CERT])
    raw = socket.create_connection((parts.hostname, parts.port or 443), timeout=STREAM_SECONDS)
    with context.wrap_socket(raw, server_hostname=parts.hostname) as sock:
        connection = WSConnection(ConnectionType.CLIENT)
        sock.sendall(connection.send(Request(host=parts.netloc, target=path)))
        messages: list[dict] = []
        while True:
            data = sock.recv(65536)
            connection.receive_data(data or None)
            for event in connection.events():
                if isinstance(event, RejectConnection):
                    return {"path": path, "status": event.status_code}
                if isinstance(event, TextMessage):
                    messages.append(json.loads(event.data))
                elif isinstance(event, CloseConnection):
                    sock.sendall(connection.send(event.response()))
                    caller = messages[0].get("caller") if messages else None
                    return {"path": path, "status": 101, "caller": caller, "messages": len(messages)}
                elif not isinstance(event, AcceptConnection):
                    continue
            if not data:
                return {"path": path, "status": None, "messages": len(messages)}


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
    if streaming := os.environ.get(ENV_STREAMING_URL):
        from local_stack.streaming_app import ADMIN_PATH, METRICS_PATH

        wait_for_port(streaming.replace("wss://", "https://"))
        result["streaming"] = {
            "allowed": open_stream(streaming, METRICS_PATH),
            "refused": open_stream(streaming, ADMIN_PATH),
        }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
