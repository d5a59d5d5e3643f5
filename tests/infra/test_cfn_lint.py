"""cfn-lint passes on every synthesized template: the session app's and the variant app's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.infra, pytest.mark.slow]


def template_paths(assembly) -> list[str]:
    return [
        stack.template_full_path
        for nested in assembly.nested_assemblies
        for stack in nested.nested_assembly.stacks
    ]


@pytest.mark.parametrize("app", ["cloud_assembly", "variant_assembly"])
def test_templates_pass_cfn_lint(request, app):
    paths = template_paths(request.getfixturevalue(app))
    assert len(paths) >= 2
    # Exit 0: no error, no warning, no informational finding (`make lint` fails on any of them).
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), "--format", "parseable", *paths],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
