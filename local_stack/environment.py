"""How our services start outside ECS: the images' commands, a task's environment, health polling.

The local stack and the integration tests (tests/integration/conftest.py imports this) start
the servers the same way, and both run what the Dockerfiles run: `container_command` reads
ENTRYPOINT + CMD from docker/Dockerfile.* instead of repeating them, so a changed image
command changes what is tested and demonstrated too.

Every process gets dummy AWS credentials and `AWS_ENDPOINT_URL_SECRETS_MANAGER` (honoured by
boto3 itself, so by `runtime.secrets.secret_store`): nothing here can reach real AWS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from runtime import names

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
LOCAL_ENVIRONMENT = names.check_environment("development")
"""The local stack's ENVIRONMENT: the only one allowed to degrade (the stack checks that nothing did)."""
DEFAULT_RUN_DIR = REPO / ".local"
"""Where `python -m local_stack up` keeps its state, logs, certificates and data (git-ignored)."""
BIN = Path(sys.executable).parent
"""The virtualenv's executables (`hokusai-mtls`, `python`): what the images have on their PATH."""

AWS_REGION = "us-east-1"
DUMMY_AWS: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": AWS_REGION,
    "AWS_DEFAULT_REGION": AWS_REGION,
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance metadata endpoint
}
"""Credentials moto accepts and real AWS refuses."""


def container_command(dockerfile: str) -> list[str]:
    """ENTRYPOINT + CMD of one of our images, run here with the virtualenv's executables."""
    entrypoint: list[str] = []
    command: list[str] = []
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            entrypoint = json.loads(line.removeprefix("ENTRYPOINT "))
        elif line.startswith("CMD "):
            command = json.loads(line.removeprefix("CMD "))
    argv = entrypoint + command
    return [str(BIN / argv[0]), *argv[1:]]


def service_environment(
    environment: str, secrets_endpoint: str, *, base: Mapping[str, str] | None = None, **extra: str
) -> dict[str, str]:
    """What an ECS task of ours gets, pointed at moto's Secrets Manager at `secrets_endpoint`.

    The caller's own MLFLOW_*, HOKUSAI_* and AWS_* variables are dropped, so a developer's
    shell (an AWS profile, a tracking URI) cannot leak into a service.
    """
    base = os.environ if base is None else base
    return {
        **{k: v for k, v in base.items() if not k.startswith(("MLFLOW_", "HOKUSAI_", "AWS_"))},
        names.ENV_ENVIRONMENT: names.check_environment(environment),
        **DUMMY_AWS,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": secrets_endpoint,
        # one worker process per service, as the stacks configure today's task sizes (1 vCPU and
        # less): a laptop's many cores would otherwise start an MLflow process per core
        names.ENV_WORKERS: "1",
        **extra,
    }


class NotHealthy(RuntimeError):
    """A server exited or did not answer its health check in time; the message ends with its log."""


def log_tail(log: Path, characters: int = 3000) -> str:
    return log.read_text(errors="replace")[-characters:] if log.exists() else "(no log)"


def wait_healthy(
    process: subprocess.Popen, port: int, log: Path, seconds: float = 90, path: str = "/health"
) -> dict:
    """Poll `http://127.0.0.1:port/health` until it answers 200 with JSON; return that report."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise NotHealthy(f"{process.args} exited {process.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise NotHealthy(
                    f"{process.args} did not become healthy in {seconds:.0f} s:\n{log_tail(log)}"
                ) from None
            time.sleep(0.2)
