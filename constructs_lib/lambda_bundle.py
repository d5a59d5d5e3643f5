"""The code asset of the certificate-lifecycle Lambdas: `runtime/` plus its pinned dependencies.

Built on this machine, never in Docker (there is no Docker engine here or in CI), and without the
network: `pip install --no-index --find-links .wheels/lambda` installs the manylinux2014 x86_64
CPython 3.13 wheels that set-up fetched once (`lambda_wheels`, `make lambda-wheels`) into the
asset, then `runtime/` is copied next to them. Wheels missing or fetched for another lock: synth
stops with one line naming the make target, not a traceback.

The asset hash is ours (`AssetHashType.CUSTOM`): sha256 over every `runtime/**/*.py` file (path
and bytes), the lock file and the pip platform arguments (not the wheel directory's path). The
CDK's own fingerprint of a source folder would not see the lock file or the pip flags, and
hashing the repository root would walk .venv/, node_modules/ and cdk.out/. Same sources, same
hash, on any machine; the lock pins exact versions, so the same hash means the same wheels.

Unit tests skip bundling (`aws:cdk:bundling-stacks: []`): the asset then points at `runtime/`
unbuilt, nothing is installed and the wheels are not needed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import jsii
from aws_cdk import AssetHashType, BundlingOptions, DockerImage, ILocalBundling, Stack
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from constructs_lib import lambda_wheels

ROOT = lambda_wheels.ROOT
RUNTIME_DIR = ROOT / "runtime"
LOCK_FILE = lambda_wheels.LOCK_FILE

PYTHON_RUNTIME = lambda_.Runtime.PYTHON_3_13
ARCHITECTURE = lambda_.Architecture.X86_64
PIP_TARGET_OPTIONS: tuple[str, ...] = (*lambda_wheels.PIP_TARGET_OPTIONS, "--no-compile")
"""What the asset hash covers of pip's arguments: the platform (the wheel directory's path is not)."""
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
    return lambda_wheels.install_command(output_dir)


class LambdaWheelsMissing(SystemExit):
    """The wheels to bundle are not on disk: exits the app with one line (no traceback)."""


def copy_runtime(output_dir: str) -> None:
    for path in runtime_sources():
        destination = Path(output_dir) / path.relative_to(ROOT)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)


@jsii.implements(ILocalBundling)
class LocalPipBundling:
    """`pip install` from `.wheels/lambda` plus a copy of `runtime/`; failing raises (synth stops)."""

    def try_bundle(self, output_dir: str, options: BundlingOptions) -> bool:
        reason = lambda_wheels.problem()  # lifecycle_code(scope) has normally said so already
        if reason is not None:
            raise RuntimeError(f"bundling the lifecycle Lambdas: {reason}")
        command = pip_command(output_dir)  # a fixed argv, no shell
        result = subprocess.run(  # noqa: S603
            command, capture_output=True, text=True, check=False, env=lambda_wheels.install_environment()
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"bundling the lifecycle Lambdas failed: {' '.join(result.args)}\n{result.stdout}{result.stderr}"
            )
        copy_runtime(output_dir)
        return True


def lifecycle_code(scope: Construct | None = None) -> lambda_.Code:
    """The asset every lifecycle Lambda shares (one upload per stack, one build per synth).

    With `scope`, a stack that will bundle (not skipped by `aws:cdk:bundling-stacks`) checks the
    wheels first and exits with `LambdaWheelsMissing`: one line naming the make target.
    """
    if scope is not None and Stack.of(scope).bundling_required:
        reason = lambda_wheels.problem()
        if reason is not None:
            raise LambdaWheelsMissing(f"synth: {reason}")
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
