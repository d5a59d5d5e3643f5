"""One deployed-shape environment for the whole session (tests/support/deployed.py).

Starting it costs tens of seconds on 2 cores (PostgreSQL, MLflow's migrations, moto, the API,
nginx), so every test in the session shares it; tests must leave it usable (no stopping of its
servers, no changing of its settings; create what you need under names of your own).

Without root or `ip netns`, or without PostgreSQL or nginx, the tests FAIL with the reason:
CI runs as root with all of them installed by .ci/run, so a skip there would hide a suite.
"""

from __future__ import annotations

import pytest

from tests.support.deployed import DeployedEnvironment
from tests.support.netns import NetnsUnavailable

_started: list[DeployedEnvironment] = []


@pytest.fixture(scope="session")
def deployed(tmp_path_factory) -> DeployedEnvironment:
    environment = DeployedEnvironment(tmp_path_factory.mktemp("deployed"))
    problem = None
    try:
        environment.start()
    except (NetnsUnavailable, RuntimeError, OSError) as exc:
        problem = f"the deployed-shape environment did not start: {exc}"
        environment.close()
    if problem:  # outside the except: the message alone, no chained traceback
        pytest.fail(problem, pytrace=False)
    _started.append(environment)
    try:
        yield environment
    finally:
        environment.close()


def pytest_terminal_summary(terminalreporter):
    for environment in _started:
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in environment.timings.items())
        terminalreporter.write_line(f"deployed-shape environment: {stages}")
