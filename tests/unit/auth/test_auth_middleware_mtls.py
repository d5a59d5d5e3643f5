"""The middleware's decisions, one at a time (the seed's tests/unit/test_auth_middleware_mtls.py).

Requests are plain ASGI scopes, as uvicorn builds them; the TLS extension is what
`runtime.serving.asgi_tls` would put there for a verified client. The API-key validator here is a
counting stub: these tests are about the dispatch; tests/integration uses the real HTTP double.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging

import pytest

from runtime import names
from runtime.auth.api_keys import fingerprint
from runtime.auth.client_address import AddressPolicy
from runtime.auth.mlflow_routes import mlflow_scope
from runtime.auth.peer_identity import IdentityPolicy
from runtime.keys.key_format import generate
from runtime.serving.http_headers import masked_headers
from tests.support.asgi import RecordingApp, call, echo_state, http_scope, tls_extension
from tests.support.certs import new_ca


# --- _is_internal_request ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("peer", "forwarded", "internal"),
    [
        ("10.0.3.4", None, True),  # a task in the VPC
        ("172.16.0.1", None, False),  # private, but not one of OUR CIDRs
        ("203.0.113.9", "10.0.3.4", False),  # forged X-Forwarded-For from an untrusted peer
        ("10.0.100.7", "203.0.113.9", False),  # our ALB says: an external client
        ("10.0.100.7", "10.0.3.4, 203.0.113.9", False),  # client-written left part is ignored
        ("10.0.100.7", "203.0.113.9, 10.0.3.4", True),  # right-most untrusted hop is internal
        ("10.0.100.7", "not-an-ip", False),  # a garbled chain is believed in no part
    ],
)
def test_is_internal_request_uses_the_socket_peer_and_trusted_proxies_only(
    middleware, peer, forwarded, internal
):
    headers = [("X-Forwarded-For", forwarded)] if forwarded else []
    assert middleware()._is_internal_request(http_scope(peer=peer, headers=headers)) is internal


# --- _verify_mtls_certificate -------------------------------------------------------------------
def test_verify_mtls_certificate_reads_only_the_tls_extension(middleware, ca):
    api = ca.issue_client("development", "api")
    present, identity = middleware()._verify_mtls_certificate(
        http_scope(extensions=tls_extension(api.certificate))
    )
    assert present and identity.service == "api" and identity.uri == "spiffe://hokusai/development/api"
    assert middleware()._verify_mtls_certificate(http_scope()) == (False, None)


def test_a_certificate_of_another_environment_is_not_ours(middleware):
    staging_api = new_ca("staging").issue_client("staging", "api")
    present, identity = middleware()._verify_mtls_certificate(
        http_scope(extensions=tls_extension(staging_api.certificate))
    )
    assert present and identity is None


def test_cn_is_the_fallback_only_without_a_spiffe_uri():
    policy = IdentityPolicy("development")
    imported = new_ca().issue_server("development")  # DNS SAN + a SPIFFE URI for "mlflow": not a caller
    assert policy.identify(imported.certificate) is None


def test_rollback_switch_ignores_certificates(middleware, validator, ca):
    api = ca.issue_client("development", "api")
    status, _, _ = call(middleware(enable_mtls=False), http_scope(extensions=tls_extension(api.certificate)))
    assert status == 401 and validator.calls == 0


# --- dispatch ------------------------------------------------------------------------------------
def test_mtls_path_sets_state_and_skips_the_auth_service(middleware, validator, ca):
    api = ca.issue_client("development", "api")
    status, _, body = call(
        middleware(), http_scope(peer="10.0.3.4", extensions=tls_extension(api.certificate))
    )
    assert status == 200 and validator.calls == 0
    assert "'auth_path': 'mtls'" in body.decode() and "'service_id': 'api'" in body.decode()


def test_values_planted_in_state_are_dropped(middleware, ca):
    scope = http_scope(headers=[("X-API-Key", "good-key")])
    scope["state"] = {"service_id": "api", "auth_path": "mtls", "peer_cert_verified": True, "other": 1}
    _, _, body = call(middleware(), scope)
    assert "'auth_path': 'api_key'" in body.decode() and "'service_id': None" in body.decode()
    assert "'other': 1" in body.decode()  # unrelated state survives


def test_unknown_identity_is_forbidden(middleware, validator, ca):
    stranger = ca.issue_client("development", "stranger")
    status, _, _ = call(middleware(), http_scope(extensions=tls_extension(stranger.certificate)))
    assert status == 403 and validator.calls == 0


def test_required_scope_applies_to_service_identities_and_leaves_the_api_key_path_unchanged(middleware, ca):
    strict = middleware(required_scope=mlflow_scope)
    reporter = IdentityPolicy("development", {"reporter": ["mlflow:read"]})
    strict.identities = reporter
    read_only = ca.issue_client("development", "reporter")
    assert call(strict, http_scope(extensions=tls_extension(read_only.certificate)))[0] == 200
    assert call(strict, http_scope(method="POST", extensions=tls_extension(read_only.certificate)))[0] == 403
    # a key with only mlflow:read may still POST: the API-key path keeps its old rules
    assert call(strict, http_scope(method="POST", headers=[("X-API-Key", "good-key")]))[0] == 200


def test_api_key_path_answers(middleware, validator):
    assert call(middleware(), http_scope())[0] == 401
    assert call(middleware(), http_scope(headers=[("X-API-Key", "bad")]))[0] == 401
    status, headers, _ = call(middleware(), http_scope(headers=[("Authorization", "Bearer good-key")]))
    assert status == 200 and headers["x-ratelimit-limit"] == "100"
    validator.down = True
    assert call(middleware(), http_scope(headers=[("X-API-Key", "good-key")]))[0] == 503


def test_options_is_authenticated_like_any_other_method(middleware, validator):
    app = RecordingApp()
    assert call(middleware(app=app), http_scope(method="OPTIONS"))[0] == 401
    assert call(middleware(app=app), http_scope(method="OPTIONS", path="/mlflow/x"))[0] == 401
    assert app.scopes == []
    assert (
        call(middleware(app=app), http_scope(method="OPTIONS", headers=[("X-API-Key", "good-key")]))[0] == 200
    )


PREFLIGHT = [("Origin", "https://ui.example.com"), ("Access-Control-Request-Method", "POST")]


def test_a_cors_preflight_is_answered_at_the_edge_and_never_forwarded(middleware, validator):
    app = RecordingApp()
    refused, headers, _ = call(middleware(app=app), http_scope(method="OPTIONS", headers=PREFLIGHT))
    assert refused == 400 and "access-control-allow-origin" not in headers
    allowing = middleware(app=app, cors_allowed_origins=["https://ui.example.com"])
    status, headers, _ = call(allowing, http_scope(method="OPTIONS", headers=PREFLIGHT))
    assert status == 200 and headers["access-control-allow-origin"] == "https://ui.example.com"
    other_origin = [("Origin", "https://evil.example"), PREFLIGHT[1]]
    assert call(allowing, http_scope(method="OPTIONS", headers=other_origin))[0] == 400
    assert app.scopes == [] and validator.calls == 0
    # the actual request from an allowed origin is authenticated, then gets its CORS header
    status, headers, _ = call(allowing, http_scope(headers=[PREFLIGHT[0], ("X-API-Key", "good-key")]))
    assert status == 200 and headers["access-control-allow-origin"] == "https://ui.example.com"
    assert call(allowing, http_scope(headers=[PREFLIGHT[0]]))[0] == 401


@pytest.mark.parametrize(
    "path", ["/healthz", "/health/", "/health/x", "/health-anything/x", "/HEALTH", "/x/health"]
)
def test_excluded_paths_match_exactly(middleware, validator, path):
    app = RecordingApp()
    assert call(middleware(app=app), http_scope(path="/health"))[0] == 200
    assert call(middleware(app=app), http_scope(path=path))[0] == 401
    assert [s["path"] for s in app.scopes] == ["/health"] and validator.calls == 0


def test_request_id_is_kept_or_created(middleware):
    _, headers, _ = call(middleware(), http_scope(path="/health", headers=[("X-Request-ID", "abc-123")]))
    assert headers["x-request-id"] == "abc-123"
    _, headers, _ = call(middleware(), http_scope(path="/health", headers=[("X-Request-ID", "bad id\n")]))
    assert len(headers["x-request-id"]) == 32


def test_websocket_refusal_closes_with_policy_violation(middleware):
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    scope = {**http_scope(), "type": "websocket"}
    asyncio.run(middleware()(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "API key required"}]


def test_log_lines_mask_credentials():
    masked = masked_headers([(b"authorization", b"Bearer secret"), (b"x-api-key", b"k"), (b"accept", b"*/*")])
    assert masked == {"authorization": "***", "x-api-key": "***", "accept": "*/*"}


def test_internal_networks_come_from_configuration():
    policy = AddressPolicy.from_environ({names.ENV_INTERNAL_CIDRS: "10.40.0.0/16, 10.41.0.0/16"})
    assert policy.internal == (ipaddress.ip_network("10.40.0.0/16"), ipaddress.ip_network("10.41.0.0/16"))
    with pytest.raises(ValueError, match="HOKUSAI_MTLS_INTERNAL_CIDRS is not set"):
        AddressPolicy.from_environ({})
    with pytest.raises(ValueError, match="'10.300.0.0/16' is not a CIDR"):
        AddressPolicy.from_environ({names.ENV_INTERNAL_CIDRS: "10.300.0.0/16"})


def test_service_scopes_come_from_configuration():
    policy = IdentityPolicy.from_environ(
        {names.ENV_ENVIRONMENT: "development", "HOKUSAI_MTLS_SERVICE_SCOPES": '{"reporter": ["mlflow:read"]}'}
    )
    assert policy.service_scopes == {"reporter": ("mlflow:read",)}
    with pytest.raises(ValueError, match="not valid JSON"):
        IdentityPolicy.from_environ(
            {names.ENV_ENVIRONMENT: "development", "HOKUSAI_MTLS_SERVICE_SCOPES": "{"}
        )


# --- the mTLS path's per-request work (kept cheap, never weaker) ----------------------------------
def test_mtls_path_passes_one_request_id_drops_planted_state_and_counts_once(middleware, ca):
    seen = []

    async def app(scope, receive, send):
        seen.append(scope)
        await echo_state(scope, receive, send)

    built = middleware(app=app)
    api = ca.issue_client("development", "api")
    scope = http_scope(
        headers=[("X-Request-ID", "bad id\n"), ("X-Request-ID", "req-7"), ("X-Service-Id", "admin")],
        extensions=tls_extension(api.certificate),
    )
    scope["state"] = {"service_id": "admin", "scopes": ["admin"], "service_identity": "forged", "other": 1}
    status, headers, _ = call(built, scope)
    assert status == 200 and headers["x-request-id"] == "req-7"
    assert [v for k, v in seen[0]["headers"] if k == b"x-request-id"] == [b"req-7"]
    state = seen[0]["state"]
    assert state["service_id"] == "api" and state["scopes"] == ["mlflow:read", "mlflow:write"]
    assert state["service_identity"].service == "api" and state["other"] == 1
    assert scope["state"]["service_id"] == "admin"  # the caller's scope is not changed
    status, headers, _ = call(built, http_scope(extensions=tls_extension(api.certificate)))
    assert status == 200 and len(headers["x-request-id"]) == 32
    metrics_text = built.metrics.prometheus().decode()
    assert (
        'auth_path="mtls",environment="development",outcome="success",service="mlflow"} 2.0' in metrics_text
    )
    assert 'hokusai_mtls_internal_request_seconds_count{environment="development",service="mlflow"} 2.0' in (
        metrics_text
    )


def test_each_certificate_gets_its_own_cached_decision(middleware, ca):
    built = middleware()
    api = tls_extension(ca.issue_client("development", "api").certificate)
    stranger = tls_extension(ca.issue_client("development", "stranger").certificate)
    for _ in range(2):  # the second round comes from the cache
        assert call(built, http_scope(extensions=api))[0] == 200
        assert call(built, http_scope(extensions=stranger))[0] == 403


def test_an_app_set_request_id_is_not_duplicated(middleware, ca):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"X-Request-ID", b"app")]})
        await send({"type": "http.response.body", "body": b""})

    api = ca.issue_client("development", "api")
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    asyncio.run(middleware(app=app)(http_scope(extensions=tls_extension(api.certificate)), receive, send))
    assert [v for k, v in sent[0]["headers"] if k.lower() == b"x-request-id"] == [b"app"]


# --- what the app, the logs and MLflow's client get ------------------------------------------------
def test_the_consumed_key_never_reaches_the_app(middleware):
    app = RecordingApp()
    headers = [("X-API-Key", "good-key"), ("Authorization", "Basic dXNlcjpwdw=="), ("Accept", "*/*")]
    query = b"max_results=5&api_key=good-key&api%5Fkey=again&filter=a%3Db"
    assert call(middleware(app=app), http_scope(headers=headers, query=query))[0] == 200
    seen = app.scopes[0]
    assert seen["query_string"] == b"max_results=5&filter=a%3Db"
    assert [k for k, _ in seen["headers"] if k == b"x-api-key"] == []
    assert (b"authorization", b"Basic dXNlcjpwdw==") in seen["headers"]  # not ours: left alone
    call(middleware(app=app), http_scope(headers=[("Authorization", "Bearer good-key")]))
    assert [k for k, _ in app.scopes[1]["headers"] if k == b"authorization"] == []


def test_a_read_only_identity_searches_with_post_and_cannot_write(middleware, ca):
    strict = middleware(
        required_scope=mlflow_scope, identities=IdentityPolicy("development", {"reporter": ["mlflow:read"]})
    )
    reporter = tls_extension(ca.issue_client("development", "reporter").certificate)
    search = http_scope(method="POST", path="/api/2.0/mlflow/runs/search", extensions=reporter)
    create = http_scope(method="POST", path="/api/2.0/mlflow/runs/create", extensions=reporter)
    assert call(strict, search)[0] == 200
    assert call(strict, create)[0] == 403


def test_refusals_on_mlflow_routes_have_mlflows_error_shape(middleware, ca, validator):
    mlflow_style = middleware(mlflow_errors=lambda scope: True, required_scope=mlflow_scope)
    status, _, body = call(mlflow_style, http_scope())
    assert status == 401 and json.loads(body) == {
        "error_code": "UNAUTHENTICATED",
        "message": "API key required",
    }
    stranger = tls_extension(ca.issue_client("development", "stranger").certificate)
    assert (
        json.loads(call(mlflow_style, http_scope(extensions=stranger))[2])["error_code"]
        == "PERMISSION_DENIED"
    )
    validator.down = True
    down = call(mlflow_style, http_scope(headers=[("X-API-Key", "good-key")]))
    assert down[0] == 503 and json.loads(down[2])["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert json.loads(call(middleware(), http_scope())[2]) == {"detail": "API key required"}


def test_every_decision_is_one_audit_line_without_the_credential(middleware, ca, caplog):
    caplog.set_level(logging.INFO, logger="hokusai_mtls.audit")
    api = tls_extension(ca.issue_client("development", "api").certificate)
    call(middleware(), http_scope(peer="10.0.3.4", path="/api/x\nforged", extensions=api))
    call(middleware(), http_scope(headers=[("X-API-Key", "good-key")], query=b"api_key=good-key"))
    call(middleware(), http_scope(headers=[("X-API-Key", "wrong-key")]))
    call(middleware(), http_scope())
    lines = [r.getMessage() for r in caplog.records if r.name == "hokusai_mtls.audit"]
    assert len(lines) == 4 and all("\n" not in line for line in lines)
    records = [json.loads(line) for line in lines]
    assert [(r["auth_path"], r["outcome"], r["status"]) for r in records] == [
        ("mtls", "success", 200),
        ("api_key", "success", 200),
        ("api_key", "invalid", 401),
        ("api_key", "missing", 401),
    ]
    assert records[0]["identity"] == "api" and records[0]["route"] == "/api/x\nforged"
    assert records[0]["internal"] is True and records[0]["client"] == "10.0.3.4"
    assert (
        records[1]["key"] == fingerprint("good-key")[:16]
        and records[2]["key"] == fingerprint("wrong-key")[:16]
    )
    assert "good-key" not in caplog.text and "wrong-key" not in caplog.text
    assert len({r["request_id"] for r in records}) == 4
    assert [r["key_kind"] for r in records] == [None, "other", "other", None]  # not our store's format


def test_the_audit_line_tells_a_key_of_our_format_from_any_other(middleware, caplog):
    """In migration mode, `key_kind` is how an operator sees who still uses the old service's keys."""
    caplog.set_level(logging.INFO, logger="hokusai_mtls.audit")
    ours = generate("staging")
    call(middleware(), http_scope(headers=[("X-API-Key", ours)]))
    call(middleware(), http_scope(headers=[("X-API-Key", ours[:-1] + ("A" if ours[-1] != "A" else "B"))]))
    kinds = [json.loads(r.getMessage())["key_kind"] for r in caplog.records if r.name == "hokusai_mtls.audit"]
    assert kinds == ["ours", "other"]  # a broken checksum is not ours
