"""Read or write by MLflow's route, checked against MLflow's own route table.

The expectations come from MLflow (`mlflow.server.handlers.get_endpoints()`, its FastAPI
routers), not from our table: a POST route whose handler searches, gets, lists or queries is a
read; any other POST, PATCH, PUT or DELETE is a write. When an MLflow upgrade adds a search
endpoint our table does not know, this fails, and the read-only identity would otherwise
lose it silently.
"""

from __future__ import annotations

import re

import pytest

from runtime.auth.mlflow_routes import READ, WRITE, required_scope

_READ_HANDLER = re.compile(r"^_(search|get|list|batch_get|query|calculate)_|_search_|^_graphql$")
_NAMES_MISLEAD = {
    "_create_presigned_download_url": READ,  # "creates" a URL to download an artifact: a read
    "_get_or_create_user_queue": WRITE,  # "gets", but creates the queue when there is none
}
_EXAMPLE = re.compile(r"<(?:path:)?[a-z_]+>")


def mlflow_endpoints() -> list[tuple[str, str, str]]:
    """(method, path with examples for <params>, handler name) for every MLflow Flask route."""
    from mlflow.server.handlers import get_endpoints

    found = []
    for path, handler, methods in get_endpoints():
        for method in methods:
            found.append((method, _EXAMPLE.sub("x", path), getattr(handler, "__name__", "")))
    return found


ENDPOINTS = mlflow_endpoints()


def test_every_mlflow_route_that_reads_needs_only_read_and_every_other_needs_write():
    wrong = []
    for method, path, handler in ENDPOINTS:
        expected = READ if method in ("GET", "HEAD") or _READ_HANDLER.search(handler) else WRITE
        expected = _NAMES_MISLEAD.get(handler, expected)
        if required_scope(method, path) != expected:
            wrong.append(f"{method} {path} ({handler}): expected {expected}")
    assert wrong == [], "\n".join(wrong)
    assert len(ENDPOINTS) > 300  # the table was really read


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/2.0/mlflow/experiments/search"),
        ("POST", "/ajax-api/2.0/mlflow/runs/search"),
        ("POST", "/api/2.0/mlflow/logged-models/search"),
        ("POST", "/api/3.0/mlflow/traces/search"),
        ("POST", "/graphql"),
        ("POST", "/ajax-api/3.0/jobs/search"),
        ("GET", "/api/2.0/mlflow/runs/get"),
        ("OPTIONS", "/api/2.0/mlflow/runs/create"),
        ("GET", "/"),
    ],
)
def test_reads(method, path):
    assert required_scope(method, path) == READ


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/2.0/mlflow/runs/create"),
        ("POST", "/api/2.0/mlflow/runs/log-batch"),
        ("POST", "/ajax-api/3.0/jobs/"),  # submitting a job
        ("POST", "/v1/traces"),  # OTLP ingestion
        ("POST", "/api/2.0/mlflow/runs/search/"),  # not the search route: unknown means write
        ("POST", "/api/2.0/mlflow/runs/search/../delete"),
        ("POST", "/api/2.0/mlflow//runs/search"),
        ("POST", "/API/2.0/mlflow/runs/search"),
        ("POST", "/api/9.9/mlflow/runs/search"),
        ("POST", "/x/api/2.0/mlflow/runs/search"),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/x"),
        ("DELETE", "/api/2.0/mlflow/experiments/search"),
        ("PATCH", "/graphql"),
        ("BREW", "/api/2.0/mlflow/runs/get"),
    ],
)
def test_writes_and_everything_unknown(method, path):
    assert required_scope(method, path) == WRITE
