"""Authorization by identity and route: what a policy allows, what it refuses to read, and what the
middleware does with it (enforce: 403 and counted; audit: let through, counted, logged once)."""

from __future__ import annotations

import json
import logging

import pytest

from runtime import names
from runtime.auth.route_policy import parse_policy, policy_from_environ
from tests.support.asgi import RecordingApp, call, http_scope, tls_extension

RULES = [
    {"identities": ["worker"], "methods": ["GET", "POST"], "paths": ["/api/2.0/mlflow/runs/**"]},
    {"identities": ["api"], "methods": ["*"], "paths": ["/api/2.0/mlflow/*/search"]},
    {"identities": ["*"], "methods": ["GET"], "paths": ["/version", "/"]},
]
POLICY = parse_policy({"mode": "enforce", "rules": RULES})


@pytest.mark.parametrize(
    ("identity", "method", "path", "allowed"),
    [
        ("worker", "POST", "/api/2.0/mlflow/runs/create", True),
        ("worker", "GET", "/api/2.0/mlflow/runs/get", True),
        ("worker", "HEAD", "/api/2.0/mlflow/runs/get", True),  # GET allows HEAD
        ("worker", "DELETE", "/api/2.0/mlflow/runs/delete", False),  # method not listed
        ("worker", "GET", "/api/2.0/mlflow/runs", True),  # ** matches no rest too
        ("worker", "GET", "/api/2.0/mlflow/runsX/get", False),  # a segment is whole, not a prefix
        ("worker", "GET", "/api/2.0/mlflow/runs/../experiments/delete", False),  # never a .. path
        ("worker", "GET", "/api/2.0/mlflow/experiments/search", False),  # another identity's rule
        ("api", "PATCH", "/api/2.0/mlflow/experiments/search", True),  # * matches one segment
        ("api", "GET", "/api/2.0/mlflow/a/b/search", False),  # ...only one
        ("rogue", "GET", "/version", True),  # identity * (the server accepts it at all elsewhere)
        ("rogue", "GET", "/", True),
        ("rogue", "POST", "/version", False),
        ("worker", "get", "/version", True),  # methods compare in upper case
        ("worker", "GET", "version", False),  # not a path
    ],
)
def test_a_request_is_allowed_only_by_a_rule_naming_its_identity_method_and_path(
    identity, method, path, allowed
):
    assert POLICY.allows(identity, method, path) is allowed


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ([], "expected an object"),
        ({"mode": "dry-run", "rules": []}, ".mode: expected one of enforce, audit"),
        ({"rules": [], "extra": 1}, "unknown field(s) extra"),
        ({"rules": "all"}, ".rules: expected a list"),
        ({"rules": [{"identities": ["worker"], "methods": ["GET"]}]}, ".rules[0]: expected exactly"),
        ({"rules": [{"identities": [], "methods": ["GET"], "paths": ["/"]}]}, ".rules[0].identities"),
        (
            {"rules": [{"identities": ["w"], "methods": ["FETCH"], "paths": ["/"]}]},
            "FETCH is not an HTTP method",
        ),
        ({"rules": [{"identities": ["w"], "methods": ["GET"], "paths": ["api/x"]}]}, "is not a path pattern"),
        ({"rules": [{"identities": ["w"], "methods": ["GET"], "paths": ["/a/**/b"]}]}, "** may only end"),
        ({"rules": [{"identities": ["w"], "methods": ["GET"], "paths": ["/a/../b"]}]}, ".. segment"),
    ],
)
def test_a_policy_that_cannot_be_read_is_refused_naming_the_field(document, words):
    with pytest.raises(ValueError, match="HOKUSAI_MTLS_ROUTE_POLICY") as refused:
        parse_policy(document)
    assert words in str(refused.value)


def test_the_variable_is_json_or_refused_and_unset_means_no_policy():
    assert policy_from_environ({}) is None
    assert policy_from_environ({names.ENV_ROUTE_POLICY: json.dumps({"rules": RULES})}).mode == "enforce"
    with pytest.raises(ValueError, match="not JSON"):
        policy_from_environ({names.ENV_ROUTE_POLICY: "{rules: all}"})
    assert parse_policy({"rules": RULES}).identities() == {"worker", "api"}


TABLE = parse_policy(
    {
        "rules": [
            {"identities": ["worker"], "routes": ["mlflow:read"]},
            {"identities": ["api"], "routes": ["mlflow:read", "mlflow:write"]},
        ]
    }
)


@pytest.mark.parametrize(
    ("identity", "method", "path", "allowed"),
    [
        ("worker", "GET", "/api/2.0/mlflow/experiments/get", True),
        ("worker", "HEAD", "/api/2.0/mlflow/experiments/get", True),
        ("worker", "POST", "/api/2.0/mlflow/runs/search", True),  # a search over POST reads
        ("worker", "POST", "/ajax-api/2.0/mlflow/runs/search", True),  # the UI's twin
        ("worker", "POST", "/graphql", True),
        ("worker", "POST", "/api/2.0/mlflow/runs/create", False),
        ("worker", "POST", "/api/2.0/mlflow/experiments/delete", False),
        ("worker", "POST", "/api/2.0/mlflow/runs/search/../create", False),  # never a .. path
        ("worker", "POST", "/api/9.9/mlflow/runs/search", False),  # a route the table does not know writes
        ("worker", "DELETE", "/api/2.0/mlflow/runs/search", False),
        ("api", "POST", "/api/2.0/mlflow/runs/create", True),
        ("rogue", "GET", "/api/2.0/mlflow/experiments/get", False),
    ],
)
def test_mlflows_route_table_allows_reads_and_writes_as_mlflow_defines_them(identity, method, path, allowed):
    assert TABLE.allows(identity, method, path) is allowed


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ({"identities": ["w"], "routes": ["mlflow:admin"]}, "'mlflow:admin' is not a built-in route table"),
        ({"identities": ["w"], "routes": ["mlflow:read"], "paths": ["/"]}, ".rules[0]: expected exactly"),
        ({"identities": ["w"], "routes": []}, ".rules[0].routes"),
    ],
)
def test_a_route_table_rule_that_cannot_be_read_is_refused(rule, words):
    with pytest.raises(ValueError, match="HOKUSAI_MTLS_ROUTE_POLICY") as refused:
        parse_policy({"rules": [rule]})
    assert words in str(refused.value)


def test_only_mlflows_server_may_use_its_route_table():
    variable = {
        names.ENV_ROUTE_POLICY: json.dumps({"rules": [{"identities": ["w"], "routes": ["mlflow:read"]}]})
    }
    assert policy_from_environ(variable, route_tables=True).rules[0].routes == {"mlflow:read"}
    with pytest.raises(
        ValueError, match=r"HOKUSAI_MTLS_ROUTE_POLICY\.rules\[0\]\.routes: only MLflow's server"
    ):
        policy_from_environ(variable)


# --- in the middleware ----------------------------------------------------------------------------
def worker_scope(ca, method: str, path: str) -> dict:
    worker = ca.issue_client("development", "worker")
    return http_scope(extensions=tls_extension(worker.certificate), method=method, path=path)


def counts(middleware) -> tuple[int, int]:
    text = middleware.metrics.prometheus().decode()

    def total(name: str) -> int:
        return sum(
            int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith(name + "{")
        )

    return total("hokusai_mtls_route_policy_denied_total"), total(
        "hokusai_mtls_route_policy_would_deny_total"
    )


def test_enforce_refuses_what_no_rule_allows_and_counts_it(middleware, ca):
    app = RecordingApp()
    guarded = middleware(app=app, route_policy=POLICY)
    assert call(guarded, worker_scope(ca, "POST", "/api/2.0/mlflow/runs/create"))[0] == 200
    status, _, body = call(guarded, worker_scope(ca, "DELETE", "/api/2.0/mlflow/runs/delete"))
    assert status == 403 and b"route policy" in body
    assert len(app.scopes) == 1  # the refused request never reached the app
    assert counts(guarded) == (1, 0)
    emf = [d for d in guarded.metrics.flush() if names.METRIC_ROUTE_POLICY_DENIED in d]
    assert emf and emf[0][names.METRIC_ROUTE_POLICY_DENIED] == 1


def test_audit_lets_it_through_counts_it_and_logs_it_once_a_minute(middleware, ca, caplog):
    caplog.set_level(logging.WARNING, logger="hokusai_mtls.auth")
    app = RecordingApp()
    audit = parse_policy({"mode": "audit", "rules": RULES})
    guarded = middleware(app=app, route_policy=audit)
    for _ in range(3):
        assert call(guarded, worker_scope(ca, "DELETE", "/api/2.0/mlflow/runs/delete\nINFO forged"))[0] == 200
    assert len(app.scopes) == 3 and counts(guarded) == (0, 3)
    lines = [r.getMessage() for r in caplog.records if "would deny" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]  # once, and the client's newline stays escaped


def test_api_key_callers_are_not_subject_to_the_route_policy(middleware, ca):
    guarded = middleware(route_policy=parse_policy({"rules": []}))  # no identity may call anything
    assert call(guarded, http_scope(headers=[("X-API-Key", "good-key")], method="DELETE"))[0] == 200
    assert call(guarded, worker_scope(ca, "GET", "/version"))[0] == 403
