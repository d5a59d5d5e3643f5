"""docker/entrypoint.sh hands the container's role and command to `hokusai-mtls run`.

`hokusai-mtls run` itself (load, export, exec; a failed load never starts the command) is
tested in tests/integration/test_cli.py. Here a stand-in on PATH records what it is given.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from runtime import names

ENTRYPOINT = Path(__file__).resolve().parents[2] / "docker" / "entrypoint.sh"


def stand_in(directory: Path, script: str) -> dict[str, str]:
    program = directory / "hokusai-mtls"
    program.write_text(f"#!/bin/sh\n{script}\n")
    program.chmod(0o755)
    return {"PATH": f"{directory}{os.pathsep}{os.environ['PATH']}", names.ENV_ROLE: names.API.role}


def run(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *command], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_role_and_command_reach_hokusai_mtls_run_unchanged(tmp_path):
    env = stand_in(tmp_path, 'for arg in "$@"; do echo "[$arg]"; done')
    result = run(env, "mlflow", "server", "--port", "5000", "two words")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[run]",
        "[--role]",
        f"[{names.API.role}]",
        "[--]",
        "[mlflow]",
        "[server]",
        "[--port]",
        "[5000]",
        "[two words]",
    ]


def test_its_exit_status_is_the_containers(tmp_path):
    env = stand_in(tmp_path, "echo 'hokusai-mtls: error [load]: no identity' >&2; exit 1")
    result = run(env, "true")
    assert result.returncode == 1
    assert "no identity" in result.stderr


def test_a_missing_role_stops_before_anything_runs(tmp_path):
    marker = tmp_path / "called"
    env = stand_in(tmp_path, f"touch {marker}")
    del env[names.ENV_ROLE]
    result = run(env, "true")
    assert result.returncode != 0
    assert not marker.exists()
