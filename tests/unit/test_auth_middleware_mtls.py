"""The middleware's decisions, one at a time (the seed's tests/unit/test_auth_middleware_mtls.py).

Requests are plain ASGI scopes, as uvicorn builds them; the TLS extension is what
`runtime.asgi_tls` would put there for a verified client. The API-key validator here is a
counting stub: these tests are about the dispatch; tests/integration uses the real HTTP double.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
from urllib.parse import quote

import pytest

from runtime import names, pem
from runtime.api_keys import ApiKeyInfo, AuthServiceUnavailable, Validation
from runtime.client_address import AddressPolicy, parse_networks
from runtime.http_headers import masked_headers
from runtime.metrics import Metrics
from runtime.middleware import APIKeyAuthMiddleware, mlflow_scope
from runtime.peer_identity import IdentityPolicy
from runtime.rate_limit import MemoryRateLimiter
from tests.support.certs import new_ca

INTERNAL = parse_networks("10.0.0.0/8", "test")
PROXIES = parse_networks("10.0.100.0/24", "test")


class CountingValidator:
    """Stands in for ApiKeyValidator: one good key, counts calls, can be 'down'."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    async def validate(self, api_key, *, request_id):
        self.calls += 1
        if self.down:
            raise AuthServiceUnavailable("http://auth.test", "down (test)")
        if api_key != "good-key":
            return Validation(None, "invalid", False)
        info = ApiKeyInfo("key-1", "user-1", None, ("mlflow:read",), 100, None, True)
        return Validation(info, "ok", False)


def tls_extension(certificate) -> dict:
    return {
        "tls": {"client_cert_chain": [pem.certificate_pem(certificate).decode()], "client_cert_name": "x"}
    }


def http_scope(*, peer="203.0.113.9", headers=(), extensions=None, method="GET", path="/api/x", query=b""):
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "client": (peer, 50000),
        "server": ("10.0.1.5", 5000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "extensions": extensions or {},
        "state": {},
    }


async def echo_state(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": repr(scope["state"]).encode()})


def call(middleware, scope) -> tuple[int, dict, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


@pytest.fixture
def ca():
    return new_ca()


@pytest.fixture
def validator():
    return CountingValidator()


@pytest.fixture
def middleware(validator):
    def build(**options):
        return APIKeyAuthMiddleware(
            options.pop("app", echo_state),
            identities=IdentityPolicy("development"),
            addresses=AddressPolicy(INTERNAL, PROXIES),
            validator=validator,
            limiter=MemoryRateLimiter(),
            metrics=Metrics(environment="development", service="mlflow", stream=io.StringIO()),
            **options,
        )

    return build


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


def test_options_and_excluded_paths_pass_through(middleware, validator):
    assert call(middleware(), http_scope(method="OPTIONS"))[0] == 200
    assert call(middleware(), http_scope(path="/health"))[0] == 200
    assert validator.calls == 0


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


# --- certificates forwarded by a trusted proxy ----------------------------------------------------
def forwarded(certificate) -> str:
    return quote(pem.certificate_pem(certificate).decode(), safe="")


@pytest.mark.parametrize("header", ["alb", "xfcc"])
def test_a_trusted_proxys_forwarded_certificate_is_verified_then_used(middleware, validator, ca, header):
    api = ca.issue_client("development", "api")
    value = forwarded(api.certificate)
    headers = (
        [("X-Amzn-Mtls-Clientcert", value)]
        if header == "alb"
        else [
            (
                "X-Forwarded-Client-Cert",
                f'By=spiffe://x;Cert="{forwarded(new_ca().certificate)}",Hash=1;Cert="{value}"',
            )
        ]
    )
    status, _, body = call(
        middleware(proxy_trust_bundle=[ca.certificate]), http_scope(peer="10.0.100.7", headers=headers)
    )
    assert status == 200 and "'auth_path': 'mtls'" in body.decode() and validator.calls == 0


@pytest.mark.parametrize(
    ("peer", "issuer", "configured"),
    [
        ("203.0.113.9", "ours", True),  # a client wrote the header itself
        ("10.0.100.7", "foreign", True),  # our proxy, but a certificate we do not trust
        ("10.0.100.7", "ours", False),  # our proxy, but forwarding is not switched on
    ],
)
def test_forwarded_certificates_need_our_proxy_our_ca_and_the_switch(
    middleware, ca, peer, issuer, configured
):
    signer = ca if issuer == "ours" else new_ca()
    headers = [("X-Amzn-Mtls-Clientcert", forwarded(signer.issue_client("development", "api").certificate))]
    options = {"proxy_trust_bundle": [ca.certificate]} if configured else {}
    assert call(middleware(**options), http_scope(peer=peer, headers=headers))[0] == 401


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
