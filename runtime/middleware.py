"""`APIKeyAuthMiddleware`: verified internal mTLS callers skip the auth service; everyone else
keeps the API-key path unchanged. Pure ASGI, so it wraps Starlette, FastAPI or MLflow's app.

Dispatch (the seed's order, made safe):
1. non-HTTP scopes, CORS preflight (OPTIONS) and excluded paths pass through;
2. a client certificate verified by OUR TLS layer (`scope["extensions"]["tls"]`) whose
   identity is configured -> the mTLS path: scopes from configuration, no auth-service call,
   no rate limit; a verified certificate of an unknown identity -> 403;
3. everything else -> the API-key path: key from `Authorization: Bearer`, `X-API-Key` or
   `api_key`, validated through the auth service (cached), rate-limited; auth service down
   -> 503 (fail closed). An internal caller on this path is counted: it should have used
   its certificate.
Identity never comes from a header, an IP or `request.state`: results are written into
`scope["state"]` (Starlette's `request.state`) only after they are verified, and any values
already there under our names are dropped first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

from cryptography import x509

from runtime import names
from runtime.api_keys import ApiKeyValidator, AuthServiceUnavailable, extract_api_key, fingerprint
from runtime.client_address import AddressPolicy
from runtime.http_headers import REQUEST_ID, send_json, with_request_id
from runtime.metrics import Metrics
from runtime.peer_identity import IdentityPolicy, ServiceIdentity, peer_certificate_pem
from runtime.proxy_certificate import forwarded_certificate
from runtime.rate_limit import RateDecision

log = logging.getLogger("hokusai_mtls.auth")

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


READ_METHODS = frozenset({"GET", "HEAD"})


def mlflow_scope(scope) -> str:
    """The scope an MLflow request needs: `mlflow:read` to read, `mlflow:write` for anything else."""
    return "mlflow:read" if scope.get("method") in READ_METHODS else "mlflow:write"


class APIKeyAuthMiddleware:
    def __init__(
        self,
        app,
        *,
        identities: IdentityPolicy,
        addresses: AddressPolicy,
        validator: ApiKeyValidator | None,
        limiter,
        metrics: Metrics,
        enable_mtls: bool = True,
        count_plain: bool = False,
        excluded_paths: Iterable[str] = ("/health",),
        required_scope: Callable[[dict], str | None] | None = None,
        proxy_trust_bundle: Sequence[x509.Certificate] = (),
    ) -> None:
        """`validator` None: no API-key path at all (every caller must present a certificate).
        `count_plain`: count requests that arrive without TLS (the permissive mode's old clients).
        `required_scope(scope)`: the scope an mTLS caller needs for this request (e.g. `mlflow_scope`);
        None: routes decide. The API-key path is left as it was: a valid key is what it checks.
        `proxy_trust_bundle`: accept client certificates forwarded by trusted proxies
        (X-Amzn-Mtls-Clientcert, X-Forwarded-Client-Cert) that verify against it; empty: never."""
        self.app = app
        self.identities = identities
        self.addresses = addresses
        self.validator = validator
        self.limiter = limiter
        self.metrics = metrics
        self.enable_mtls = enable_mtls
        self.count_plain = count_plain
        self.excluded_paths = tuple(excluded_paths)
        self.required_scope = required_scope
        self.proxy_trust_bundle = tuple(proxy_trust_bundle)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        scope, request_id = with_request_id(scope)  # our own copy of the scope from here on
        send = self._sending_headers(send, [(REQUEST_ID, request_id)])
        if scope.get("method") == "OPTIONS" or scope["path"].startswith(self.excluded_paths):
            await self.app(scope, receive, send)
            return
        await self.dispatch(scope, receive, send, request_id.decode("latin-1"))

    # --- the seed's methods ----------------------------------------------------------------
    def _is_internal_request(self, scope) -> bool:
        """The caller's address is inside our CIDRs (X-Forwarded-For only via trusted proxies).

        For metrics and logs only: being internal never authenticates.
        """
        forwarded = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
        peer = (scope.get("client") or (None, None))[0]
        return self.addresses.is_internal(self.addresses.client_address(peer, forwarded))

    def _verify_mtls_certificate(self, scope) -> tuple[bool, ServiceIdentity | None]:
        """(a verified certificate is present, the configured identity it names or None).

        The certificate comes from our TLS layer, or (with `proxy_trust_bundle`) from the
        forwarding headers of a trusted proxy, verified again against that bundle.
        """
        if not self.enable_mtls:
            return False, None
        certificate_pem = peer_certificate_pem(scope)
        if certificate_pem is not None:  # the common case: one cached lookup per request
            return True, self.identities.identify_pem(certificate_pem)
        certificate = None
        if self.proxy_trust_bundle:
            peer = (scope.get("client") or (None, None))[0]
            if self.addresses.peer_is_trusted_proxy(peer):
                certificate = forwarded_certificate(scope, self.proxy_trust_bundle)
        if certificate is None:
            return False, None
        return True, self.identities.identify(certificate)

    async def dispatch(self, scope, receive, send, request_id: str) -> None:
        """`scope` is the middleware's own copy (`__call__` made it): its state is replaced here."""
        planted = scope.get("state")
        state = {k: v for k, v in planted.items() if k not in STATE_KEYS} if planted else {}
        scope["state"] = state
        if self.count_plain and scope.get("scheme") in ("http", "ws"):
            self.metrics.plain_port_request()

        has_certificate, identity = self._verify_mtls_certificate(scope)
        if has_certificate:
            if identity is None:
                self.metrics.auth(names.AUTH_PATH_MTLS, "forbidden")
                log.warning(
                    "request %s: verified certificate of an unconfigured identity refused", request_id
                )
                await _respond(scope, send, 403, "the client certificate names no service allowed here")
                return
            if not await self._has_scope(scope, send, identity.scopes, names.AUTH_PATH_MTLS):
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
                await self.app(scope, receive, send)
            finally:
                self.metrics.internal_latency(time.perf_counter() - started)
            return

        if self._is_internal_request(scope):
            self.metrics.internal_api_key_request()
            log.warning(
                "request %s: internal caller without a client certificate, on the API-key path", request_id
            )
        await self._api_key_path(scope, receive, send, request_id, state)

    async def _api_key_path(self, scope, receive, send, request_id: str, state: dict) -> None:
        key = extract_api_key(scope)
        if self.validator is None or not key:
            self.metrics.auth(names.AUTH_PATH_API_KEY, "missing")
            await _respond(scope, send, 401, "API key required", [(b"www-authenticate", b"Bearer")])
            return
        try:
            validation = await self.validator.validate(key, request_id=request_id)
        except AuthServiceUnavailable as exc:
            self.metrics.auth(names.AUTH_PATH_API_KEY, "unavailable")
            log.error("request %s: %s", request_id, exc)
            await _respond(scope, send, 503, "authentication service unavailable; try again shortly")
            return
        if validation.info is None or validation.outcome != "ok":
            self.metrics.auth(names.AUTH_PATH_API_KEY, validation.outcome)
            log.info(
                "request %s: API key %s refused (%s)", request_id, fingerprint(key)[:12], validation.outcome
            )
            await _respond(
                scope, send, 401, f"API key {validation.outcome}", [(b"www-authenticate", b"Bearer")]
            )
            return
        info = validation.info
        decision: RateDecision = await self.limiter.hit(info.api_key_id, info.rate_limit_per_hour)
        if not decision.allowed:
            self.metrics.auth(names.AUTH_PATH_API_KEY, "rate_limited")
            await _respond(scope, send, 429, "rate limit exceeded", decision.headers())
            return
        state.update(
            user_id=info.user_id,
            api_key_id=info.api_key_id,
            service_id=info.service_id,
            scopes=list(info.scopes),
            rate_limit_per_hour=info.rate_limit_per_hour,
            auth_path=names.AUTH_PATH_API_KEY,
        )
        self.metrics.auth(names.AUTH_PATH_API_KEY, "success")
        await self.app(scope, receive, self._sending_headers(send, decision.headers()))

    async def _has_scope(self, scope, send, granted: Iterable[str], auth_path: str) -> bool:
        needed = self.required_scope(scope) if self.required_scope else None
        if needed is None or needed in granted:
            return True
        self.metrics.auth(auth_path, "forbidden")
        await _respond(scope, send, 403, f"this caller lacks the {needed} scope")
        return False

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
                headers = message.get("headers", ())
                present = {k.lower() for k, _ in headers}
                added = [h for h in extra if h[0].lower() not in present]
                message = {**message, "headers": [*headers, *added]}
            await send(message)

        return send_with_headers


async def _respond(scope, send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A JSON error; a WebSocket is closed before it is accepted instead (code 1008, policy)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        return
    await send_json(send, status, {"detail": detail}, headers)
