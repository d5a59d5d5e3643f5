"""What serve-mlflow sets up as `mlflow server` would: allowed hosts, the database driver, import order."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import sys

import pytest
from packaging.requirements import Requirement

from runtime import names
from runtime.services import mlflow_setup


def allowed(patterns: list[str], host: str) -> bool:
    """MLflow's own matching (mlflow/server/security_utils.py `is_allowed_host_header`)."""
    return any(fnmatch.fnmatch(host, p) if "*" in p else host == p for p in patterns)


@pytest.mark.parametrize(
    "host",
    [
        "mlflow.hokusai-staging.local",
        "mlflow.hokusai-staging.local:5000",
        "localhost:5000",
        "127.0.0.1",
        "127.0.0.1:5001",
    ],
)
def test_the_cloud_map_name_and_the_loopback_names_are_allowed(host):
    assert allowed(mlflow_setup.allowed_hosts("staging", {}), host)


@pytest.mark.parametrize(
    "host", ["mlflow.hokusai-production.local:5000", "attacker.example", "10.0.0.5:5000", ""]
)
def test_other_hosts_stay_refused(host):
    """Not MLflow's default (private IPs): a client that verified our certificate dialed a name in it."""
    assert not allowed(mlflow_setup.allowed_hosts("staging", {}), host)


def test_certificate_names_and_operator_hosts_are_added_verbatim():
    hosts = mlflow_setup.allowed_hosts(
        "staging",
        {names.ENV_MLFLOW_ALLOWED_HOSTS: " ops.example.com , mlflow.hokusai-staging.local"},
        extra=["mlflow.internal.example"],
    )
    assert allowed(hosts, "mlflow.internal.example:5000")
    assert allowed(hosts, "ops.example.com") and not allowed(hosts, "ops.example.com:5000")
    assert len(hosts) == len(set(hosts))


def test_configure_refuses_to_run_after_mlflow_server_was_imported(monkeypatch):
    """MLflow's host check would keep the hosts of that first import (its localhost default)."""
    monkeypatch.setitem(sys.modules, "mlflow.server", object())
    with pytest.raises(RuntimeError, match="imported before"):
        mlflow_setup.configure(
            environment="staging", backend_store_uri="sqlite:///x.db", artifacts_destination=None, environ={}
        )


def test_job_execution_follows_mlflow_s_switch():
    assert mlflow_setup.job_execution_enabled({})
    assert not mlflow_setup.job_execution_enabled({names.ENV_MLFLOW_JOB_EXECUTION: "false"})


def _extra_requirements(extra: str, seen: frozenset[str] = frozenset()) -> list[Requirement]:
    """What `pip install hokusai-mtls[extra]` installs of ours, through the extras it names
    (`server` -> `hokusai-mtls[serving,keys]` -> ...)."""
    found = []
    for text in importlib.metadata.requires("hokusai-mtls") or []:
        requirement = Requirement(text)
        if requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
            continue
        if requirement.name == "hokusai-mtls":
            for inner in requirement.extras - seen:
                found += _extra_requirements(inner, seen | {extra})
        else:
            found.append(requirement)
    return found


def test_the_server_image_has_the_driver_of_a_plain_postgresql_url():
    """`postgresql://...` (the backend store secret) loads whatever driver SQLAlchemy defaults to."""
    from sqlalchemy.engine import make_url

    dialect = make_url("postgresql://user:secret@db.example:5432/mlflow").get_dialect()
    dialect.import_dbapi()  # ModuleNotFoundError without the driver
    pinned = {r.name.lower(): r for r in _extra_requirements("server")}
    assert dialect.driver in pinned, f"the server extra must install {dialect.driver}"
    assert pinned[dialect.driver].specifier, "pinned with a range"
    assert "sqlalchemy" in pinned, "SQLAlchemy's minor decides the default driver: pinned with it"


def test_our_copy_of_mlflow_s_artifact_root_variable_is_mlflow_s():
    from mlflow.server.constants import ARTIFACT_ROOT_ENV_VAR

    assert mlflow_setup.ARTIFACT_ROOT_ENV_VAR == ARTIFACT_ROOT_ENV_VAR
