"""Which MLflow requests read and which write: the scope an mTLS caller needs, by route.

The HTTP method alone is wrong for MLflow: its client and UI search with POST
(`runs/search`, `experiments/search`, `logged-models/search`, `traces/search`, GraphQL), so a
read-only identity chosen by method could not even list experiments. The rule here:

- GET, HEAD and OPTIONS read (no MLflow route changes anything on them);
- POST to a route in `POST_READS` reads: MLflow's REST API (`/api/<v>/...` and the UI's
  `/ajax-api/<v>/...` twins, versions 2.0 and 3.0), its GraphQL endpoint (whose "mutations"
  are searches) and the jobs search;
- everything else writes, including routes MLflow adds in a later release, until this table
  names them (tests/unit/test_mlflow_routes.py checks the table against MLflow's own).

Paths are compared exactly after removing the API prefix: a route this table does not know
needs `mlflow:write`, so a crafted path can only ever ask for more, never less.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

READ = "mlflow:read"
WRITE = "mlflow:write"

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

POST_READS = frozenset(
    {
        "mlflow/experiments/search",
        "mlflow/experiments/search-datasets",
        "mlflow/runs/search",
        "mlflow/logged-models/search",
        "mlflow/registered-models/get-latest-versions",
        "mlflow/artifacts/presigned-download-url",
        "mlflow/traces/search",
        "mlflow/traces/batchGetInfos",
        "mlflow/traces/calculate-filter-correlation",
        "mlflow/traces/metrics",
        "mlflow/issues/search",
        "mlflow/datasets/search",
        "mlflow/prompt-optimization/jobs/search",
    }
)
"""MLflow REST routes (below `/api/<v>/` or `/ajax-api/<v>/`) that only read but take POST."""

POST_READ_PATHS = frozenset({"/graphql", "/ajax-api/3.0/jobs/search"})
"""Whole paths that read over POST: GraphQL (its schema's mutations are `mlflowSearchRuns` and
`mlflowSearchDatasets` plus an echo) and the jobs API's search."""

_API_PREFIX = re.compile(r"/(?:ajax-)?api/(?:2\.0|3\.0)/")


def required_scope(method: str, path: str) -> str:
    """`mlflow:read` or `mlflow:write` for a request to MLflow's `path` (decoded, no query)."""
    if method in READ_METHODS:
        return READ
    if method == "POST":
        if path in POST_READ_PATHS:
            return READ
        prefix = _API_PREFIX.match(path)
        if prefix and path[prefix.end() :] in POST_READS:
            return READ
    return WRITE


def mlflow_scope(scope: Mapping) -> str:
    """The scope a request to MLflow's own app needs (the MLflow server's middleware)."""
    return required_scope(scope.get("method", ""), scope.get("path", ""))
