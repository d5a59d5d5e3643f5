"""`hokusai-mtls run`'s supervision: the command runs as a real child process while its files are refreshed."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest

from runtime.errors import MtlsError, RefreshError
from runtime.secrets.loader import REFRESH_JITTER, refresh_delay
from runtime.secrets.refreshing_command import run_refreshing

WAIT_FOR_SECOND_SET = """
import pathlib, sys, time
path = pathlib.Path(sys.argv[1])
first = path.read_text()
deadline = time.monotonic() + 20
while path.read_text() == first:
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.02)
print("saw", path.read_text())
sys.exit(7)
"""


def test_the_command_sees_the_refreshed_file_at_the_same_path_and_its_code_is_ours(tmp_path, capfd):
    certificate = tmp_path / "tls.pem"
    certificate.write_text("set 0")
    refreshes = []

    def refresh() -> None:
        refreshes.append(time.monotonic())
        certificate.write_text(f"set {len(refreshes)}")

    code = run_refreshing(
        [sys.executable, "-c", WAIT_FOR_SECOND_SET, str(certificate)],
        environ={"PATH": "/usr/bin:/bin"},
        refresh=refresh,
        next_delay=lambda: 0.05,
    )
    assert code == 7  # the command's own exit code, not 0
    assert "saw set" in capfd.readouterr().out
    assert refreshes


def test_a_failed_refresh_is_logged_and_the_command_runs_on(tmp_path, caplog):
    calls = []

    def refresh() -> None:
        calls.append(1)
        raise RefreshError("hokusai/staging/mlflow/worker-identity: AccessDeniedException")

    with caplog.at_level(logging.WARNING, logger="hokusai_mtls"):
        code = run_refreshing(
            [sys.executable, "-c", "import time; time.sleep(0.5)"],
            environ={},
            refresh=refresh,
            next_delay=lambda: 0.05,
        )
    assert code == 0
    assert len(calls) >= 2  # tried again at every interval
    assert "certificate refresh failed [refresh-failed]" in caplog.text
    assert "worker-identity: AccessDeniedException" in caplog.text


def test_sigterm_goes_to_the_command_and_its_signal_becomes_128_plus_n(tmp_path):
    """ECS stops a task with SIGTERM to PID 1: the command must get it, and the task's exit code says so."""
    ready = tmp_path / "ready"
    sleeper = f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(30)"
    # Signal handlers belong to a main thread: the supervisor runs as its own interpreter, as in a task.
    script = (
        "import sys; from runtime.secrets.refreshing_command import run_refreshing\n"
        f"sys.exit(run_refreshing([sys.executable, '-c', {sleeper!r}], environ={{}}, "
        "refresh=lambda: None, next_delay=lambda: 0.05))"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.02)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=20) == 128 + signal.SIGTERM


def test_a_command_that_cannot_start_is_a_named_error():
    with pytest.raises(MtlsError, match="cannot start '/nonexistent/worker'"):
        run_refreshing(["/nonexistent/worker"], environ={}, refresh=lambda: None, next_delay=lambda: 1)


def test_refresh_waits_are_jittered_below_the_interval_never_above():
    assert refresh_delay(300, draw=lambda: 0.0) == 300
    assert refresh_delay(300, draw=lambda: 1.0) == 300 * (1 - REFRESH_JITTER)
    assert {round(refresh_delay(300), 6) for _ in range(50)} != {300.0}


def test_a_refresh_interval_too_long_for_the_leaf_is_named_at_start(caplog, staging_set):
    """24-hour leaves renew before half-life: a task refreshing less than every 6 hours may meet its
    rotated leaf only shortly before the old one runs out; the start says so, naming the variable."""
    from runtime.secrets.loader import check_refresh_interval

    leaf = staging_set.identities["api"].certificate  # 24 hours (and the 5-minute skew allowance)
    with caplog.at_level("WARNING", logger="hokusai_mtls"):
        assert check_refresh_interval(300, leaf)
        assert check_refresh_interval(6 * 3600, leaf)
        assert not caplog.records
        assert not check_refresh_interval(12 * 3600, leaf)
    (record,) = caplog.records
    assert "HOKUSAI_MTLS_REFRESH_SECONDS=43200 is longer than a quarter of this leaf's life" in record.message
    assert check_refresh_interval(10**6, None)  # no leaf (INSECURE): nothing to compare
