"""`hokusai-mtls run`: a command (a worker) with certificate files that stay fresh for as long as it runs.

Leaves live a day, so a loader that ran once at start-up (`exec` after `load-certs`) leaves a worker
with an expired certificate a day later. Instead the command runs as our child and we stay its
parent: every refresh interval (with jitter, `loader.refresh_delay`) we load the role's set again;
a new verified set is swapped in at the same paths the command was given (MLFLOW_TRACKING_CLIENT_CERT_PATH
and friends), atomically, so a TLS client that opens a connection reads the old set or the new one,
never half of each. A refresh that fails leaves the files as they were, logs why, and is tried again
at the next interval: the expiry alarms page long before the leaf runs out.

SIGTERM, SIGINT, SIGHUP and SIGQUIT go to the command (ECS stops a task with SIGTERM to PID 1); we exit
with its code (128 + N when signal N ended it, as a shell does), so the task's exit code is the command's.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

from runtime.errors import MtlsError
from runtime.secrets.loader import refresh_or_keep

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def run_refreshing(
    command: Sequence[str],
    *,
    environ: Mapping[str, str],
    refresh: Callable[[], object],
    next_delay: Callable[[], float],
) -> int:
    """Start `command` with `environ`, call `refresh` every `next_delay()` seconds until it exits,
    and return its exit code. `refresh` raising `MtlsError` is logged and retried next time."""
    try:
        child = subprocess.Popen(list(command), env=dict(environ))  # noqa: S603 - the container's own command
    except OSError as exc:
        raise MtlsError(f"cannot start {command[0]!r}: {exc.strerror or exc}") from exc
    previous = {
        sig: signal.signal(sig, lambda number, _frame: _forward(child, number)) for sig in FORWARDED_SIGNALS
    }
    try:
        while True:
            try:
                code = child.wait(timeout=next_delay())
            except subprocess.TimeoutExpired:
                refresh_or_keep(refresh)
                continue
            return 128 - code if code < 0 else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # we are going (an error of ours): the command must not outlive us
            child.kill()
            child.wait()


def _forward(child: subprocess.Popen, number: int) -> None:
    if child.poll() is None:
        child.send_signal(number)


__all__ = ["FORWARDED_SIGNALS", "run_refreshing"]
