"""`hokusai-mtls serve --app`: a bad app is one line naming it, exit 1, no traceback."""

from __future__ import annotations

import pytest

from runtime import cli

BAD = [
    ("no_colon_here", "expected module:attribute"),
    ("tests.no_such_module_xyz:app", "no module named"),
    ("tests.support.ws_app:missing", "has no attribute"),
    ("tests.support.ws_app:STREAMED", "is not callable"),
    (":app", "expected module:attribute"),
    ("tests.support.ws_app:", "expected module:attribute"),
]


@pytest.mark.parametrize(("target", "why"), BAD)
def test_a_bad_app_exits_1_naming_it(target, why, capsys):
    assert cli.main(["serve", "--app", target, "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert target in err and why in err
    assert "Traceback" not in err


def test_app_is_required(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve"])
    assert exited.value.code == 2
    assert "--app" in capsys.readouterr().err
