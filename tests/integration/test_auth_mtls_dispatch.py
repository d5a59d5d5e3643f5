"""The hybrid dispatch over real sockets: mTLS listener, plain listener, the auth-service double.

The app behind the middleware answers with what it finds in `request.state`, so each test
sees which path a request took and what identity it was given. The auth service is a local
test double (we do not own the real one); it counts the calls it gets.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import threading
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from local_stack.auth_service import ACTIVE_KEY, LIMITED_KEY, FakeAuthService
from runtime import names
from runtime.auth.api_keys import ApiKeyValidator, AuthServiceClient
from runtime.auth.client_address import AddressPolicy
from runtime.auth.key_cache import MemoryKeyCache
from runtime.auth.middleware import STATE_KEYS, APIKeyAuthMiddleware
from runtime.auth.peer_identity import IdentityPolicy
from runtime.auth.rate_limit import MemoryRateLimiter
from runtime.certificates import pem
from runtime.certificates.files import publish_files
from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
from runtime.observability.metrics import Metrics
from runtime.serving.server import Listener, Serving
from tests.support.servers import free_port, running

pytestmark = pytest.mark.integration
HOST = "mlflow.hokusai-development.local"


async def whoami(request: Request) -> JSONResponse:
    state = {key: getattr(request.state, key, None) for key in STATE_KEYS if key != "service_identity"}
    return JSONResponse({**state, "request_id": request.headers.get("x-request-id")})


@pytest.fixture
def auth_service():
    service = FakeAuthService()
    with service.serving() as base_url:
        service.base_url = base_url
        yield service


@pytest.fixture
def stack(tmp_path, development_set, auth_service):
    """mTLS and plain listeners in front of one app; 127.0.0.0/8 counts as internal."""
    server = development_set.identities["server"]
    publish_files(
        tmp_path / "server",
        {
            "tls.crt": (server.certificate_pem(), 0o644),
            "tls.key": (server.private_key_pem(), 0o600),
            "ca.crt": (pem.bundle_pem(development_set.trust_bundle), 0o644),
        },
    )
    emf = io.StringIO()
    metrics = Metrics(environment="development", service=names.MLFLOW_SERVICE, stream=emf)
    tls = ReloadableServerContext(
        ServerFiles.from_directory(tmp_path / "server"), on_handshake=metrics.handshake_started
    )
    port, plain_port = free_port(), free_port()
    validator = ApiKeyValidator(AuthServiceClient(auth_service.base_url), MemoryKeyCache())
    app = APIKeyAuthMiddleware(
        Starlette(routes=[Route("/whoami", whoami, methods=["GET", "POST"])]),
        identities=IdentityPolicy("development"),
        addresses=AddressPolicy(internal=(__import__("ipaddress").ip_network("127.0.0.0/8"),)),
        validator=validator,
        limiter=MemoryRateLimiter(),
        metrics=metrics,
        count_plain=True,
    )
    serving = Serving(
        [
            Listener("mtls", "127.0.0.1", port, app, tls, metrics.handshake_completed),
            Listener("plain", "127.0.0.1", plain_port, app),
        ]
    )
    with running(serving):
        yield {
            "port": port,
            "plain": f"http://127.0.0.1:{plain_port}/whoami",
            "metrics": metrics,
            "emf": emf,
            "validator": validator,
        }


def mtls_client(tmp_path: Path, development_set, service: str | None = "api") -> httpx.Client:
    (tmp_path / "ca.crt").write_bytes(pem.bundle_pem(development_set.trust_bundle))
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    if service:
        (tmp_path / f"{service}.pem").write_bytes(development_set.identities[service].combined_pem())
        context.load_cert_chain(tmp_path / f"{service}.pem")
    return httpx.Client(verify=context, timeout=10)


def mtls_get(client: httpx.Client, port: int, **kw) -> httpx.Response:
    return client.get(f"https://127.0.0.1:{port}/whoami", extensions={"sni_hostname": HOST}, **kw)


def emf_metrics(stack) -> dict[str, object]:
    stack["metrics"].flush()
    values = {}
    for line in stack["emf"].getvalue().splitlines():
        document = json.loads(line)
        for metric in document["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            key = metric["Name"] + (
                f"[{document[names.DIM_AUTH_PATH]}]" if names.DIM_AUTH_PATH in document else ""
            )
            values[key] = document[metric["Name"]]
    return values


def test_internal_mtls_request_never_calls_the_auth_service(stack, auth_service, tmp_path, development_set):
    with mtls_client(tmp_path, development_set, "worker") as client:
        answers = [mtls_get(client, stack["port"]) for _ in range(20)]
    assert {a.status_code for a in answers} == {200}
    body = answers[0].json()
    assert body["auth_path"] == "mtls" and body["service_id"] == "worker"
    assert body["scopes"] == ["mlflow:read", "mlflow:write"] and body["rate_limit_per_hour"] is None
    assert auth_service.calls == 0
    metrics = emf_metrics(stack)
    assert metrics["AuthenticatedRequests[mtls]"] == 20
    assert (
        metrics["MtlsHandshakes"] == 1 and metrics["MtlsHandshakeFailures"] == 0
    )  # one keep-alive connection


def test_external_request_takes_the_api_key_path_and_is_cached(stack, auth_service):
    headers = {"Authorization": f"Bearer {ACTIVE_KEY}", "X-Request-ID": "trace-1"}
    first = httpx.get(stack["plain"], headers=headers)
    second = httpx.get(stack["plain"], headers={"X-API-Key": ACTIVE_KEY})
    assert first.status_code == second.status_code == 200
    assert first.json()["auth_path"] == "api_key" and first.json()["api_key_id"] == "key-active"
    assert first.headers["x-request-id"] == "trace-1" and auth_service.request_ids == ["trace-1"]
    assert first.headers["x-ratelimit-limit"] == "1000"
    assert auth_service.calls == 1


def test_internal_caller_without_certificate_falls_back_and_is_counted(stack, auth_service):
    assert httpx.get(stack["plain"]).status_code == 401
    assert httpx.get(stack["plain"], params={"api_key": ACTIVE_KEY}).json()["auth_path"] == "api_key"
    metrics = emf_metrics(stack)
    assert metrics["InternalApiKeyRequests"] == 2
    assert metrics["PlainPortRequests"] == 2


def test_auth_service_down_fails_closed_for_keys_and_not_for_certificates(
    stack, auth_service, tmp_path, development_set
):
    auth_service.down = True
    refused = httpx.get(stack["plain"], headers={"X-API-Key": ACTIVE_KEY})
    assert refused.status_code == 503
    assert "authentication service unavailable" in refused.json()["detail"]
    with mtls_client(tmp_path, development_set) as client:
        assert mtls_get(client, stack["port"]).status_code == 200


def test_rate_limit_answers_429_with_retry_after(stack):
    answers = [httpx.get(stack["plain"], headers={"X-API-Key": LIMITED_KEY}) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert answers[4].headers["x-ratelimit-remaining"] == "0"
    assert int(answers[5].headers["retry-after"]) > 0


@pytest.mark.parametrize(
    "forged",
    [
        {"X-Forwarded-For": "10.1.2.3"},
        {
            "X-Amzn-Mtls-Clientcert": "-----BEGIN CERTIFICATE-----...",
            "X-Amzn-Mtls-Clientcert-Subject": "CN=api",
        },
        {
            "x-forwarded-client-cert": "By=spiffe://hokusai/development/mlflow;URI=spiffe://hokusai/development/api"
        },
        {"peer_cert_verified": "true", "X-Peer-Cert-Verified": "1", "X-Service-ID": "api"},
    ],
    ids=["xff", "amzn-mtls", "xfcc", "state-lookalike"],
)
def test_forged_headers_never_authenticate(stack, auth_service, forged):
    answer = httpx.get(stack["plain"], headers=forged)
    assert answer.status_code == 401
    assert auth_service.calls == 0


def test_an_unknown_service_certificate_gets_403(stack, tmp_path, development_set):
    intruder = development_set.ca.issue_client("development", "intruder")
    (tmp_path / "ca.crt").write_bytes(pem.bundle_pem(development_set.trust_bundle))
    (tmp_path / "intruder.pem").write_bytes(intruder.combined_pem())
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    context.load_cert_chain(tmp_path / "intruder.pem")
    with httpx.Client(verify=context) as client:
        assert mtls_get(client, stack["port"]).status_code == 403


@pytest.mark.slow
def test_load_50_clients_200_requests_each_without_an_error(stack, auth_service, tmp_path, development_set):
    """50 concurrent mTLS clients x 200 keep-alive requests: every one answered, none lost."""
    (tmp_path / "ca.crt").write_bytes(pem.bundle_pem(development_set.trust_bundle))
    (tmp_path / "api.pem").write_bytes(development_set.identities["api"].combined_pem())
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    context.load_cert_chain(tmp_path / "api.pem")
    url = f"https://127.0.0.1:{stack['port']}/whoami"

    async def one_client(index: int) -> list[int]:
        async with httpx.AsyncClient(verify=context, timeout=30) as client:
            statuses = []
            for request in range(200):
                answer = await client.get(
                    url, extensions={"sni_hostname": HOST}, headers={"X-Request-ID": f"c{index}-r{request}"}
                )
                statuses.append(
                    answer.status_code if answer.headers["x-request-id"] == f"c{index}-r{request}" else 0
                )
            return statuses

    async def load() -> list[int]:
        results = await asyncio.gather(*(one_client(i) for i in range(50)))
        return [status for statuses in results for status in statuses]

    statuses: list[int] = []
    thread = threading.Thread(target=lambda: statuses.extend(asyncio.run(load())))
    thread.start()
    thread.join(300)
    assert len(statuses) == 50 * 200
    assert set(statuses) == {200}
    assert auth_service.calls == 0
    assert emf_metrics(stack)["AuthenticatedRequests[mtls]"] == 10_000
