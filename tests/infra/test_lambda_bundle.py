"""The lifecycle Lambdas' bundle is built from the wheels set-up fetched, never from the network.

`make setup` fetches `.wheels/lambda` once (`constructs_lib/lambda_wheels.py`); synth installs
from it with `--no-index` and no pip configuration, and refuses with one line naming the make
target when the wheels are missing or were fetched for another lock. The real bundle is built in
`test_certificate_lifecycle.py::test_real_bundle_*`.
"""

from __future__ import annotations

import json
import os

import pytest

from constructs_lib import lambda_wheels

pytestmark = pytest.mark.infra


def test_missing_wheels_name_the_make_target(tmp_path):
    reason = lambda_wheels.problem(tmp_path / "lambda")
    assert reason is not None
    assert "`make lambda-wheels`" in reason
    assert "fetched.json is missing" in reason


def test_wheels_fetched_for_another_lock_are_refused(tmp_path):
    other_lock = tmp_path / "requirements.lock"
    other_lock.write_text(lambda_wheels.LOCK_FILE.read_text() + "six==1.17.0\n")
    wheels = tmp_path / "lambda"
    wheels.mkdir()
    (wheels / lambda_wheels.STAMP_NAME).write_text(json.dumps(lambda_wheels.expected_stamp(other_lock)))
    reason = lambda_wheels.problem(wheels)
    assert reason is not None
    assert "another requirements.lock" in reason
    assert "`make lambda-wheels`" in reason
    (wheels / lambda_wheels.STAMP_NAME).write_text(json.dumps(lambda_wheels.expected_stamp()))
    assert lambda_wheels.problem(wheels) is None


def test_install_reads_the_wheel_directory_only(tmp_path):
    command = lambda_wheels.install_command(str(tmp_path / "out"), tmp_path / "wheels")
    assert command[3] == "install"
    assert "--no-index" in command
    assert "--isolated" in command  # no PIP_INDEX_URL, PIP_FIND_LINKS, ... from the environment
    assert command[command.index("--find-links") + 1] == str(tmp_path / "wheels")
    assert not any(arg.startswith(("--index-url", "--extra-index-url", "-i")) for arg in command)
    assert command[command.index("--target") + 1] == str(tmp_path / "out")
    assert lambda_wheels.install_environment()["PIP_CONFIG_FILE"] == os.devnull
    download = lambda_wheels.download_command(tmp_path / "wheels")
    platform = list(lambda_wheels.PIP_TARGET_OPTIONS)
    assert "".join(platform) in "".join(download) and "".join(platform) in "".join(command)


def test_asset_hash_does_not_depend_on_where_the_wheels_are(tmp_path, monkeypatch):
    from constructs_lib import lambda_bundle

    first = lambda_bundle.asset_hash()
    monkeypatch.setattr(lambda_wheels, "WHEEL_DIR", tmp_path / "elsewhere")
    assert lambda_bundle.asset_hash() == first
    assert "--no-compile" in lambda_bundle.PIP_TARGET_OPTIONS


def test_a_bundling_stack_without_wheels_exits_with_one_line(tmp_path, monkeypatch, cdk_context):
    """SystemExit with the message: the CDK CLI then shows one line, not jsii's traceback."""
    import aws_cdk as cdk

    from constructs_lib import lambda_bundle

    monkeypatch.setattr(lambda_wheels, "WHEEL_DIR", tmp_path / "missing")
    bundling = cdk.Stack(cdk.App(outdir=str(tmp_path / "on")), "Bundling")
    with pytest.raises(lambda_bundle.LambdaWheelsMissing) as raised:
        lambda_bundle.lifecycle_code(bundling)
    assert isinstance(raised.value, SystemExit)
    assert str(raised.value).startswith("synth: the lifecycle Lambdas' wheels are not fetched")
    assert "`make lambda-wheels`" in str(raised.value)

    skipped = cdk.Stack(cdk.App(context=cdk_context, outdir=str(tmp_path / "off")), "Skipped")
    assert lambda_bundle.lifecycle_code(skipped) is not None  # bundling off: no wheels needed
