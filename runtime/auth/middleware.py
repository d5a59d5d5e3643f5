"""`APIKeyAuthMiddleware`: verified internal mTLS callers skip the auth service; everyone else
keeps the API-key path unchanged. Pure ASGI, so it wraps Starlette, FastAPI or MLflow's app.

Dispatch (the seed's order, made safe):
1. non-HTTP scopes pass through; a CORS preflight (OPTIONS with `Origin` and
   `Access-Control-Request-Method`) is answered here from the configured origins
   (Starlette's CORSMiddleware) and never reaches the app; only the excluded paths, matched
   EXACTLY (`/health`, not `/healthz`), skip authentication. Every other request, OPTIONS
   included, is authenticated: nothing unauthenticated is forwarded.
2. a client certificate verified by OUR TLS layer (`scope["extensions"]["tls"]`), or forwarded
   by the configured proxy kind from a trusted proxy address (`runtime.auth.proxy_certificate`),
   whose SPIFFE identity is configured -> the mTLS path: scopes from configuration, checked
   per route (`required_scope`), no auth-service call, no rate limit; a verified certificate
   of an unknown identity -> 403;
3. everything else -> the API-key path: key from `Authorization: Bearer`, `X-API-Key` or
   `api_key`, validated through the auth service (cached), rate-limited; auth service down
   -> 503 (fail closed). An internal caller on this path is counted: it should have used
   its certificate. The key is removed from the request before the app sees it.
Identity never comes from a header, an IP or `request.state`: results are written into
`scope["state"]` (Starlette's `request.state`) only after they are verified, and any values
already there under our names are dropped first; forwarding headers never reach the app.
Every decision is one audit line (`runtime.observability.audit`); refusals on MLflow's routes use MLflow's
error shape, so MLflow's client reports `PERMISSION_DENIED`, not `INTERNAL_ERROR`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

from starlette.middleware.cors import CORSMiddleware

from runtime import names
from runtime.auth.api_keys import (
    ApiKeyValidator,
    AuthServiceUnavailable,
    UsageSink,
    extract_api_key,
    fingerprint,
    without_api_key,
)
from runtime.auth.client_address import AddressPolicy
from runtime.auth.key_info import ApiKeyInfo, address_allowed
from runtime.auth.mlflow_routes import mlflow_scope
from runtime.auth.peer_identity import IdentityPolicy, ServiceIdentity, peer_certificate_pem
from runtime.auth.proxy_certificate import check_proxy_kind, forwarded_certificate, is_forwarding_header
from runtime.auth.rate_limit import RateDecision
from runtime.auth.route_policy import RoutePolicy
from runtime.certificates.published_trust import PublishedTrust, StaticTrust
from runtime.certificates.revocation import NOTHING_REVOKED
from runtime.keys import key_format
from runtime.observability import audit
from runtime.observability.metrics import Metrics
from runtime.serving.http_headers import (
    REQUEST_ID,
    is_sane_request_id,
    new_request_id,
    send_json,
    send_mlflow_error,
)

log = logging.getLogger("hokusai_mtls.auth")
WOULD_DENY_LOG_SECONDS = 60.0
WOULD_DENY_LOG_ENTRIES = 1000


__all__ = ["STATE_KEYS", "APIKeyAuthMiddleware", "mlflow_scope", "options_from_environ"]

STATE_KEYS = (
    "user_id",
    "api_key_id",
    "service_id",
    "scopes",
    "rate_limit_per_hour",
    "auth_path",
    "service_identity",
)
"""What we put into `request.state`; the seed's five attributes plus the path and the identity."""

CORS_ALLOWED_HEADERS = ("authorization", "x-api-key", "content-type", "x-request-id")
CORS_ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _never(_scope) -> bool:
    return False


def options_from_environ(environ: Mapping[str, str]) -> dict:
    """The edge settings both servers read: which proxy forwards certificates, which origins
    may send CORS preflights (keyword arguments for `APIKeyAuthMiddleware`)."""
    origins = [o.strip() for o in environ.get(names.ENV_CORS_ALLOWED_ORIGINS, "").split(",") if o.strip()]
    if "*" in origins:
        raise ValueError(f"{names.ENV_CORS_ALLOWED_ORIGINS}: list the origins; '*' is not allowed")
    return {
        "proxy_kind": environ.get(names.ENV_PROXY_KIND) or names.PROXY_KIND_NONE,
        "cors_allowed_origins": origins,
    }


class APIKeyAuthMiddleware:
    def __init__(
        self,
        app,
        *,
        identities: IdentityPolicy,
        addresses: AddressPolicy,
        validator: ApiKeyValidator | None,
        limiter,
        usage: UsageSink | None = None,
        route_policy: RoutePolicy | None = None,
        metrics: Metrics,
        enable_mtls: bool = True,
        count_plain: bool = False,
        excluded_paths: Iterable[str] = ("/health",),
        required_scope: Callable[[dict], str | None] | None = None,
        proxy_kind: str = names.PROXY_KIND_NONE,
        proxy_trust: PublishedTrust | StaticTrust | None = None,
        cors_allowed_origins: Sequence[str] = (),
        mlflow_errors: Callable[[dict], bool] = _never,
    ) -> None:
        """`validator` None: no API-key path at all (every caller must present a certificate).
        `count_plain`: count requests that arrive without TLS (the permissive mode's old clients).
        `required_scope(scope)`: the scope an mTLS caller needs for this request (e.g. `mlflow_scope`);
        None: routes decide. The API-key path is left as it was: a valid key is what it checks.
        `proxy_kind` + `proxy_trust`: accept the client certificate that this kind of proxy
        (`names.PROXY_KINDS`) forwards from a trusted proxy address, when it verifies against the
        trust's current bundle and is not revoked (`PublishedTrust`: the loader's latest files);
        `none`: never. `cors_allowed_origins`: origins whose preflights are answered.
        `mlflow_errors(scope)`: answer this request's refusals in MLflow's error shape.
        `usage`: told of every request made with a key the backend knows (allowed, or refused for its
        address or rate limit): endpoint, status, time to the end of the response.
        `route_policy`: which identities may call which methods and paths (`runtime.auth.route_policy`),
        for callers with a certificate; in its audit mode a request it would refuse is counted, logged
        (once a minute per identity, method and path) and let through."""
        self.app = app
        self.identities = identities
        self.addresses = addresses
        self.validator = validator
        self.limiter = limiter
        self.usage = usage
        self.route_policy = route_policy
        self._would_deny_logged: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self.metrics = metrics
        self.enable_mtls = enable_mtls
        self.count_plain = count_plain
        self.excluded_paths = frozenset(excluded_paths)
        self.required_scope = required_scope
        self.proxy_kind = check_proxy_kind(proxy_kind, addresses.trusted_proxies)
        self.proxy_trust = proxy_trust
        if self.proxy_kind != names.PROXY_KIND_NONE and (proxy_trust is None or not proxy_trust.current()[0]):
            raise ValueError(
                f"{names.ENV_PROXY_KIND}={self.proxy_kind} needs a trust bundle to verify forwarded certificates"
                " against (the loader's ca.crt; none at security level INSECURE)"
            )
        self.mlflow_errors = mlflow_errors
        self._cors_everywhere = bool(cors_allowed_origins)
        self._preflight = CORSMiddleware(
            self._authenticated,
            allow_origins=tuple(cors_allowed_origins),
            allow_methods=CORS_ALLOWED_METHODS,
            allow_headers=CORS_ALLOWED_HEADERS,
            allow_credentials=False,
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            # With no origin allowed, only a preflight needs CORS's answer (a refusal); with some,
            # every response to them needs its Access-Control-Allow-Origin.
            if self._cors_everywhere or scope.get("method") == "OPTIONS":
                await self._preflight(scope, receive, send)  # answers a preflight; the rest comes back
            else:
                await self._authenticated(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._authenticated(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _authenticated(self, scope, receive, send) -> None:
        scope, request_id, forwarding = _own_copy(scope)  # our own copy of the scope from here on
        if scope["path"] in self.excluded_paths:
            await self.app(scope, receive, self._sending_headers(send, [(REQUEST_ID, request_id)]))
            return
        await self.dispatch(scope, receive, send, request_id.decode("latin-1"), forwarding)

    # --- the seed's methods ----------------------------------------------------------------
    def _client_address(self, scope) -> str | None:
        forwarded = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
        peer = (scope.get("client") or (None, None))[0]
        return self.addresses.client_address(peer, forwarded)

    def _is_internal_request(self, scope) -> bool:
        """The caller's address is inside our CIDRs (X-Forwarded-For only via trusted proxies).

        For metrics and logs only: being internal never authenticates.
        """
        return self.addresses.is_internal(self._client_address(scope))

    def _verify_mtls_certificate(
        self, scope, forwarding: Sequence[tuple[bytes, bytes]] = ()
    ) -> tuple[bool, ServiceIdentity | None]:
        """(a verified certificate is present, the configured identity it names or None).

        The certificate comes from our TLS layer, or (with a proxy kind) from the header that
        kind of proxy writes (among the `forwarding` headers the request carried), sent by a
        trusted proxy address, verified again against the bundle.
        """
        if not self.enable_mtls:
            return False, None
        certificate_pem = peer_certificate_pem(scope)
        if certificate_pem is not None:  # the common case: one cached lookup per request
            return True, self.identities.identify_pem(certificate_pem)
        certificate = None
        if self.proxy_kind != names.PROXY_KIND_NONE:
            peer = (scope.get("client") or (None, None))[0]
            if self.addresses.peer_is_trusted_proxy(peer):
                bundle, revocations = (
                    self.proxy_trust.current() if self.proxy_trust else ((), NOTHING_REVOKED)
                )
                certificate = forwarded_certificate(forwarding, self.proxy_kind, bundle, revocations)
        if certificate is None:
            return False, None
        return True, self.identities.identify(certificate)

    async def dispatch(
        self, scope, receive, send, request_id: str, forwarding: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """`scope` is the middleware's own copy (`_authenticated` made it, taking the `forwarding`
        headers out of it): its state is replaced here."""
        planted = scope.get("state")
        state = {k: v for k, v in planted.items() if k not in STATE_KEYS} if planted else {}
        scope["state"] = state
        if self.count_plain and scope.get("scheme") in ("http", "ws"):
            self.metrics.plain_port_request()
        decision = _Decision(self, scope, request_id)

        has_certificate, identity = self._verify_mtls_certificate(scope, forwarding)
        if has_certificate:
            decision.auth_path = names.AUTH_PATH_MTLS
            if identity is None:
                await decision.refuse(
                    send, 403, "forbidden", "the client certificate names no service allowed here"
                )
                return
            decision.identity = identity.service
            if self.route_policy is not None and not self._route_allowed(scope, identity.service):
                await decision.refuse(
                    send,
                    403,
                    "policy_denied",
                    f"the route policy does not let {identity.service} call this route",
                )
                return
            needed = self.required_scope(scope) if self.required_scope else None
            if needed is not None and needed not in identity.scopes:
                await decision.refuse(
                    send, 403, "forbidden", f"the service {identity.service} lacks the {needed} scope"
                )
                return
            state.update(
                user_id=f"service:{identity.service}",
                api_key_id=None,
                service_id=identity.service,
                scopes=list(identity.scopes),
                rate_limit_per_hour=None,
                auth_path=names.AUTH_PATH_MTLS,
                service_identity=identity,
            )
            # Counted when authenticated, before the app answers: a scrape right after the response
            # (a test, a benchmark) sees it; the latency follows when the app is done.
            self.metrics.auth(names.AUTH_PATH_MTLS, "success")
            started = time.perf_counter()
            try:
                await self.app(scope, receive, decision.sending(send, []))
            finally:
                if scope["type"] == "http":  # a WebSocket session is long-lived: its length is no latency
                    self.metrics.internal_latency(time.perf_counter() - started)
                decision.allowed()
            return

        if decision.internal:
            self.metrics.internal_api_key_request()
        await self._api_key_path(scope, receive, send, decision, state)

    async def _api_key_path(self, scope, receive, send, decision: _Decision, state: dict) -> None:
        decision.auth_path = names.AUTH_PATH_API_KEY
        key = extract_api_key(scope)
        if self.validator is None or not key:
            await decision.refuse(
                send, 401, "missing", "API key required", [(b"www-authenticate", b"Bearer")]
            )
            return
        decision.key_fingerprint = fingerprint(key)
        decision.key_kind = "ours" if key_format.is_ours(key) else "other"  # who still uses old keys
        try:
            validation = await self.validator.validate(key, request_id=decision.request_id)
        except AuthServiceUnavailable as exc:
            log.error("request %s: %s", decision.request_id, exc)
            await decision.refuse(
                send, 503, "unavailable", "authentication service unavailable; try again shortly"
            )
            return
        if validation.info is None or validation.outcome != "ok":
            await decision.refuse(
                send,
                401,
                validation.outcome,
                f"API key {validation.outcome}",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        info = validation.info
        if not address_allowed(
            info, self._client_address(scope)
        ):  # a forged X-Forwarded-For counts for nothing
            await decision.refuse(send, 403, "address_not_allowed", "API key not allowed from this address")
            decision.used(self.usage, info)
            return
        rate: RateDecision = await self.limiter.hit(info.api_key_id, info.rate_limit_per_hour)
        if not rate.allowed:
            await decision.refuse(send, 429, "rate_limited", "rate limit exceeded", rate.headers())
            decision.used(self.usage, info)
            return
        scope = without_api_key(scope)
        scope["state"] = state
        state.update(
            user_id=info.user_id,
            api_key_id=info.api_key_id,
            service_id=info.service_id,
            scopes=list(info.scopes),
            rate_limit_per_hour=info.rate_limit_per_hour,
            auth_path=names.AUTH_PATH_API_KEY,
        )
        self.metrics.auth(names.AUTH_PATH_API_KEY, "success")
        try:
            await self.app(scope, receive, decision.sending(send, rate.headers()))
        finally:
            decision.allowed()
            decision.used(self.usage, info)

    def _route_allowed(self, scope, service: str) -> bool:
        """The route policy's verdict for this caller; in audit mode always True, a refusal counted."""
        assert self.route_policy is not None  # noqa: S101 - only called with a policy
        method = scope.get("method", "GET")  # a WebSocket opens with a GET
        path = scope.get("path", "")
        if self.route_policy.allows(service, method, path):
            return True
        self.metrics.route_policy(denied=not self.route_policy.audit)
        if not self.route_policy.audit:
            return False
        key = (service, method, path[:200])
        now = time.monotonic()
        if now - self._would_deny_logged.get(key, -WOULD_DENY_LOG_SECONDS) >= WOULD_DENY_LOG_SECONDS:
            self._would_deny_logged[key] = now
            self._would_deny_logged.move_to_end(key)
            while len(self._would_deny_logged) > WOULD_DENY_LOG_ENTRIES:
                self._would_deny_logged.popitem(last=False)
            log.warning(
                "route policy (audit mode) would deny %s: %s %s",
                service,
                method,
                json.dumps(path[:200]),  # JSON-escaped: a client's newline cannot forge a log line
            )
        return True

    # --- plumbing ------------------------------------------------------------------------------
    @staticmethod
    def _sending_headers(send, extra: list[tuple[bytes, bytes]]):
        """`send` that adds `extra` headers to the response start, unless the app set them.

        Only the start message is copied; the body messages pass as they are.
        """
        if not extra:
            return send

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = _with_headers(message, extra)
            await send(message)

        return send_with_headers


def _own_copy(scope: dict) -> tuple[dict, bytes, list[tuple[bytes, bytes]]]:
    """(a copy of `scope` for the app, its request id, the forwarding headers taken out of it).

    One pass over the headers, on every request: exactly one sane X-Request-ID (the caller's or
    a new one), and no client-certificate forwarding header left for the app to misread.
    """
    request_id = None
    headers = []
    forwarding = []
    for header in scope.get("headers", ()):
        name = header[0].lower()
        if name == REQUEST_ID:
            if request_id is None and is_sane_request_id(header[1]):
                request_id = header[1]
        elif is_forwarding_header(name):
            forwarding.append(header)
        else:
            headers.append(header)
    if request_id is None:
        request_id = new_request_id()
    headers.append((REQUEST_ID, request_id))
    return {**scope, "headers": headers}, request_id, forwarding


def _with_headers(message: dict, extra: list[tuple[bytes, bytes]]) -> dict:
    headers = message.get("headers", ())
    present = {k.lower() for k, _ in headers}
    added = [h for h in extra if h[0].lower() not in present]
    return {**message, "headers": [*headers, *added]} if added else message


class _Decision:
    """One request's authentication decision: what the audit line and the metrics say of it."""

    def __init__(self, middleware: APIKeyAuthMiddleware, scope: dict, request_id: str) -> None:
        self.middleware = middleware
        self.scope = scope
        self.request_id = request_id
        self.auth_path = names.AUTH_PATH_API_KEY
        self.identity: str | None = None
        self.key_fingerprint: str | None = None
        self.key_kind: str | None = None
        self.status: int | None = None
        self.started = time.perf_counter()

    @functools.cached_property
    def client(self) -> str | None:
        return self.middleware._client_address(self.scope)

    @functools.cached_property
    def internal(self) -> bool:
        return self.middleware.addresses.is_internal(self.client)

    def sending(self, send, extra: list[tuple[bytes, bytes]]):
        """`send` that adds our headers (request id, rate limit) and remembers the app's status."""
        extra = [(REQUEST_ID, self.request_id.encode("latin-1")), *extra]

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                self.status = message.get("status")
                message = _with_headers(message, extra)
            elif message["type"] == "websocket.accept":
                self.status = 101  # the upgrade's answer
            elif message["type"] == "websocket.close" and self.status is None:
                self.status = 403  # closed before accepting: the server answers 403 (ASGI spec)
            await send(message)

        return send_and_record

    def allowed(self) -> None:
        self._audit("success", self.status)

    def used(self, usage: UsageSink | None, info: ApiKeyInfo) -> None:
        """Tell `usage` of this request with a known key: an app that failed before answering is a 500."""
        if usage is not None:
            endpoint = f"{self.scope.get('method', 'WEBSOCKET')} {self.scope.get('path', '')}"
            usage.record(info.api_key_id, endpoint, self.status or 500, time.perf_counter() - self.started)

    async def refuse(
        self, send, status: int, outcome: str, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        self.status = status
        self.middleware.metrics.auth(self.auth_path, outcome)
        self._audit(outcome, status)
        scope = self.scope
        if scope["type"] == "websocket":  # closed before it is accepted (code 1008, policy)
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
            return
        headers = [(REQUEST_ID, self.request_id.encode("latin-1")), *headers]
        if self.middleware.mlflow_errors(scope):
            await send_mlflow_error(send, status, None, detail, headers)
        else:
            await send_json(send, status, {"detail": detail}, headers)

    def _audit(self, outcome: str, status: int | None) -> None:
        if not audit.enabled(outcome == "success"):
            return
        audit.decision(
            request_id=self.request_id,
            auth_path=self.auth_path,
            outcome=outcome,
            status=status,
            method=self.scope.get("method", "WEBSOCKET"),
            route=self.scope.get("path", ""),
            client=self.client,
            internal=self.internal,
            identity=self.identity,
            key_fingerprint=self.key_fingerprint,
            key_kind=self.key_kind,
        )
