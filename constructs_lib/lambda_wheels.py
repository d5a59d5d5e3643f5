"""The lifecycle Lambdas' pinned wheels: fetched once at set-up, bundled from disk at every synth.

`make setup` (its `lambda-wheels` step) runs `python -m constructs_lib.lambda_wheels`: one
`pip download` of `lambda_requirements/requirements.lock` for the Lambda platform
(manylinux2014 x86_64, CPython 3.13, wheels only) into `.wheels/lambda/`, plus `fetched.json`,
which records the lock's sha256 and the pip platform options the wheels were fetched for.
`lambda_bundle` then installs with `--no-index --find-links .wheels/lambda` and no pip
configuration, so a synth never touches the network and bundles the same wheels on any machine;
it refuses (naming the make target) when `fetched.json` is missing or does not match the lock.

No aws-cdk import here: the Makefile runs this module before the CDK is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = Path(__file__).resolve().parent / "lambda_requirements" / "requirements.lock"
WHEEL_DIR = ROOT / ".wheels" / "lambda"
STAMP_NAME = "fetched.json"
FETCH_TARGET = "make lambda-wheels"
"""What to run when the wheels are missing (`make setup` and `make synth` run it too)."""

PIP_TARGET_OPTIONS: tuple[str, ...] = (
    "--platform",
    "manylinux2014_x86_64",
    "--implementation",
    "cp",
    "--python-version",
    "3.13",
    "--only-binary=:all:",
)
"""The Lambda platform, for both the download and the install (`--no-compile` is install-only)."""


def expected_stamp(lock_file: Path | None = None) -> dict[str, object]:
    lock = (lock_file or LOCK_FILE).read_bytes()
    return {"lock_sha256": hashlib.sha256(lock).hexdigest(), "pip_options": list(PIP_TARGET_OPTIONS)}


def problem(wheel_dir: Path | None = None, lock_file: Path | None = None) -> str | None:
    """Why the wheel directory cannot be bundled from (with the make target to run), or None."""
    wheel_dir = wheel_dir or WHEEL_DIR
    stamp = wheel_dir / STAMP_NAME
    try:
        fetched = json.loads(stamp.read_text())
    except FileNotFoundError:
        return (
            f"the lifecycle Lambdas' wheels are not fetched ({stamp} is missing): "
            f"run `{FETCH_TARGET}` (part of `make setup`; it needs the package index once)"
        )
    except (OSError, ValueError) as exc:
        return f"{stamp} is unreadable ({exc}): run `{FETCH_TARGET}` again"
    if fetched != expected_stamp(lock_file):
        return (
            f"the wheels in {wheel_dir} were fetched for another requirements.lock or platform: "
            f"run `{FETCH_TARGET}` again"
        )
    return None


def download_command(destination: Path) -> list[str]:
    """`pip download` with the machine's pip configuration (its index): set-up only."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        *PIP_TARGET_OPTIONS,
        "--requirement",
        str(LOCK_FILE),
        "--dest",
        str(destination),
    ]


def install_command(output_dir: str, wheel_dir: Path | None = None) -> list[str]:
    """`pip install` from the wheel directory only: `--no-index`, `--isolated` (no PIP_* variables).

    Run it with `install_environment()`, which also keeps pip's configuration files out, so no
    index, find-links or constraint of the machine takes part.
    """
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--isolated",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "--no-index",
        "--find-links",
        str(wheel_dir or WHEEL_DIR),
        *PIP_TARGET_OPTIONS,
        "--no-compile",
        "--requirement",
        str(LOCK_FILE),
        "--target",
        output_dir,
    ]


def install_environment() -> dict[str, str]:
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull}


def fetch(wheel_dir: Path | None = None) -> int:
    """Download into a fresh directory next to `wheel_dir`, then put it in place (old wheels go)."""
    wheel_dir = wheel_dir or WHEEL_DIR
    wheel_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{wheel_dir.name}-", dir=wheel_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        command = download_command(staging)
        shown = [arg.replace(f"{ROOT}/", "") for arg in command[3:]]
        sys.stdout.write(f"  pip {' '.join(shown)}\n")
        sys.stdout.flush()
        done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            sys.stderr.write(
                f"lambda wheels: pip download exited {done.returncode}: fetching the wheels needs the "
                "package index (once; synth then bundles from .wheels/lambda without it)\n"
            )
            return 1
        (staging / STAMP_NAME).write_text(json.dumps(expected_stamp(), indent=2) + "\n")
        shutil.rmtree(wheel_dir, ignore_errors=True)
        staging.rename(wheel_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for wheel in sorted(wheel_dir.glob("*.whl")):
        sys.stdout.write(f"  {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)\n")
    return 0


if __name__ == "__main__":
    sys.exit(fetch())
