"""The code asset of the certificate-lifecycle Lambdas: `runtime/` plus its pinned dependencies.

Built on this machine, never in Docker (there is no Docker engine here or in CI): `pip install`
fetches manylinux2014 x86_64 CPython 3.13 wheels (`--only-binary=:all:`, so nothing compiles
for the wrong platform) into the asset, then `runtime/` is copied next to them.

The asset hash is ours (`AssetHashType.CUSTOM`): sha256 over every `runtime/**/*.py` file (path
and bytes), the lock file and the pip arguments. The CDK's own fingerprint of a source folder
would not see the lock file or the pip flags, and hashing the repository root would walk
.venv/, node_modules/ and cdk.out/. Same sources, same hash, on any machine.

Unit tests skip bundling (`aws:cdk:bundling-stacks: []`): the asset then points at `runtime/`
unbuilt and nothing touches the network.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import jsii
from aws_cdk import AssetHashType, BundlingOptions, DockerImage, ILocalBundling
from aws_cdk import aws_lambda as lambda_

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIR = ROOT / "runtime"
LOCK_FILE = Path(__file__).resolve().parent / "lambda_requirements" / "requirements.lock"

PYTHON_RUNTIME = lambda_.Runtime.PYTHON_3_13
ARCHITECTURE = lambda_.Architecture.X86_64
PIP_TARGET_OPTIONS: tuple[str, ...] = (
    "--platform",
    "manylinux2014_x86_64",
    "--implementation",
    "cp",
    "--python-version",
    "3.13",
    "--only-binary=:all:",
    "--no-compile",
)
_SKIPPED_PARTS = frozenset({"__pycache__"})


def runtime_sources() -> list[Path]:
    """The files of `runtime/` that go into the asset, sorted (no caches, no compiled files)."""
    return sorted(
        path
        for path in RUNTIME_DIR.rglob("*")
        if path.is_file() and path.suffix == ".py" and not _SKIPPED_PARTS & set(path.parts)
    )


def asset_hash() -> str:
    digest = hashlib.sha256()
    for path in runtime_sources():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(LOCK_FILE.read_bytes() + b"\0")
    digest.update(" ".join(PIP_TARGET_OPTIONS).encode())
    return digest.hexdigest()


def pip_command(output_dir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        *PIP_TARGET_OPTIONS,
        "--requirement",
        str(LOCK_FILE),
        "--target",
        output_dir,
    ]


def copy_runtime(output_dir: str) -> None:
    for path in runtime_sources():
        destination = Path(output_dir) / path.relative_to(ROOT)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)


@jsii.implements(ILocalBundling)
class LocalPipBundling:
    """`pip install` for the Lambda platform plus a copy of `runtime/`; failing raises (synth stops)."""

    def try_bundle(self, output_dir: str, options: BundlingOptions) -> bool:
        command = pip_command(output_dir)  # a fixed argv, no shell
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise RuntimeError(
                f"bundling the lifecycle Lambdas failed: {' '.join(result.args)}\n{result.stdout}{result.stderr}"
            )
        copy_runtime(output_dir)
        return True


def lifecycle_code() -> lambda_.Code:
    """The asset every lifecycle Lambda shares (one upload per stack, one build per synth)."""
    return lambda_.Code.from_asset(
        str(RUNTIME_DIR),
        asset_hash_type=AssetHashType.CUSTOM,
        asset_hash=asset_hash(),
        bundling=BundlingOptions(
            # Never run: local bundling always succeeds or raises. BundlingOptions requires an image.
            image=DockerImage.from_registry("docker-is-not-used-see-lambda_bundle.py"),
            local=LocalPipBundling(),
        ),
    )
