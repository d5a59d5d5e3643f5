"""The key store over HTTP (seed 002 §6), under the API service, behind the middleware:

    POST   /api/v1/auth/keys                      create a key (the key is in this answer only)
    GET    /api/v1/auth/keys[?user_id=U]          list keys (an admin: anyone's, or U's)
    GET    /api/v1/auth/keys/{key_id}             one key
    DELETE /api/v1/auth/keys/{key_id}             revoke it now
    POST   /api/v1/auth/keys/{key_id}/rotate      a new key like it; the old one works `grace_hours` more
    GET    /api/v1/auth/keys/{key_id}/usage[?since=&until=&period=hour|day]   its usage summary

and, outside the middleware, the validation call the external auth service answered until now
(`runtime.auth.api_keys`' contract), so this service can be the platform's auth service:

    POST   /api/v1/keys/validate   {"api_key": "..."} -> 200 the key's fields, 404 unknown

Who may do what is `runtime.keys.permissions` (a user their own keys with `keys:manage`, an admin
anyone's with `keys:admin`; what a non-admin makes is never wider than the key it called with). A key
the caller may not see is answered 404, as one that does not exist. Bodies are JSON, at most
`MAX_BODY_BYTES`, validated by Pydantic models that refuse unknown fields; errors are
`{"detail": ...}` naming the field. Answers carry `Cache-Control: no-store`.

HTTPS only, outside development: the request reached us over TLS, or came from a trusted proxy
(`HOKUSAI_MTLS_TRUSTED_PROXY_CIDRS`, the ALB) whose `X-Forwarded-Proto` says https; a plain request
gets 403 `https_required`. The header from anyone else is ignored.

The validation call answers only about the key it is given, which proves its holder has it; our keys
cannot be guessed (190 random bits, `runtime.keys.key_format`) and a malformed one costs no query. It
goes through the same validator as the API-key path (cache, one store query per key at a time, the
revocation poller), so a flood of one key costs one query per five minutes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import uuid
from collections.abc import Callable
from typing import Annotated, Any

import anyio
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.auth.api_keys import VALIDATE_PATH, ApiKeyValidator
from runtime.auth.client_address import AddressPolicy
from runtime.errors import AuthServiceUnavailable, KeyNotFoundError
from runtime.keys import key_format, usage_summary
from runtime.keys.opening import first_line
from runtime.keys.permissions import MAX_ACTIVE_KEYS_PER_USER, Caller, NotAllowed
from runtime.keys.store import KeyRecord, KeyStore

log = logging.getLogger("hokusai_mtls")

KEYS_PATH = "/api/v1/auth/keys"
MAX_BODY_BYTES = 16 * 1024
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_STORE_THREADS = 4
MAX_ROTATION_GRACE_HOURS = 30 * 24
NO_STORE = {"cache-control": "no-store"}

Scope = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9:._-]{1,64}$")]
Text = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255, strip_whitespace=True, pattern=r"^[^\x00-\x1f\x7f]+$"),
]
"""A name or a user id: printable, so it cannot forge a line in a log or a terminal."""


# --- the models --------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateKeyRequest(_Strict):
    name: Text
    user_id: Text | None = None
    """Whose key: only an admin names another user; default the caller."""
    scopes: list[Scope] = Field(default_factory=list, max_length=32)
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)
    rate_limit_per_hour: int | None = Field(default=None, ge=0, le=1_000_000_000)
    allowed_ips: list[str] | None = Field(default=None, max_length=64)

    @field_validator("allowed_ips")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        try:
            return [str(ipaddress.ip_network(entry.strip(), strict=False)) for entry in value]
        except ValueError as exc:
            raise ValueError(f"expected IP addresses or CIDRs ({exc})") from None


class RotateKeyRequest(_Strict):
    grace_hours: float = Field(default=24.0, ge=0, le=MAX_ROTATION_GRACE_HOURS)


class ValidateRequest(_Strict):
    api_key: str = Field(max_length=256)


class KeyResponse(BaseModel):
    id: uuid.UUID
    key_prefix: str
    user_id: str
    name: str
    scopes: list[str]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    is_active: bool
    rate_limit_per_hour: int | None
    allowed_ips: list[str] | None
    rotated_from: uuid.UUID | None

    @classmethod
    def of(cls, record: KeyRecord) -> KeyResponse:
        return cls(
            **{**record.__dict__, "scopes": list(record.scopes)},
        )


class CreatedKeyResponse(KeyResponse):
    key: str
    """The key itself: in this answer only; the store keeps its keyed hash."""


class KeyList(BaseModel):
    keys: list[KeyResponse]
    next_offset: int | None
    """Where the next page starts (`?offset=`), None on the last one."""


# --- the HTTP side ---------------------------------------------------------------------------------
class HttpError(Exception):
    def __init__(self, status: int, detail: Any, code: str | None = None) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.code = code


def _answer(status: int, document: Any) -> JSONResponse:
    return JSONResponse(document, status_code=status, headers=NO_STORE)


def _model(status: int, model: BaseModel) -> Response:
    return Response(
        model.model_dump_json(), status_code=status, media_type="application/json", headers=NO_STORE
    )


async def _body(request: Request, model: type[_Strict], *, optional: bool = False) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HttpError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    if optional and not body.strip():
        return model()
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise HttpError(
            422,
            [
                {"field": ".".join(str(part) for part in error["loc"]) or "body", "message": error["msg"]}
                for error in exc.errors(include_url=False, include_input=False)
            ],
        ) from None


def _key_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["key_id"])
    except ValueError:
        raise HttpError(404, "no such API key") from None


def _count(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12) or not low <= int(raw) <= high:
        raise HttpError(422, [{"field": name, "message": f"expected a whole number from {low} to {high}"}])
    return int(raw)


def _time(request: Request, name: str, default: dt.datetime) -> dt.datetime:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = dt.datetime.fromisoformat(raw)
        value = (value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise HttpError(422, [{"field": name, "message": "expected an ISO 8601 time"}]) from None
    if not EARLIEST <= value <= LATEST:  # and no date arithmetic near year 1 or 9999 overflows
        raise HttpError(
            422, [{"field": name, "message": f"expected a time from {EARLIEST.year} to {LATEST.year}"}]
        )
    return value


class KeyApi:
    """The routes, on one store, with the service's address policy (for the HTTPS check)."""

    def __init__(
        self,
        store: KeyStore,
        validator: ApiKeyValidator,
        *,
        addresses: AddressPolicy,
        require_https: bool,
    ) -> None:
        self.store = store
        self.validator = validator
        self.addresses = addresses
        self.require_https = require_https
        self._threads = anyio.CapacityLimiter(MAX_STORE_THREADS)

    def routes(self) -> list[Route]:
        """The management routes (behind the middleware) by their full paths."""
        one = KEYS_PATH + "/{key_id}"
        return [
            Route(KEYS_PATH, self._guarded(self.create), methods=["POST"]),
            Route(KEYS_PATH, self._guarded(self.list_keys), methods=["GET"]),
            Route(one, self._guarded(self.get), methods=["GET"]),
            Route(one, self._guarded(self.revoke), methods=["DELETE"]),
            Route(one + "/rotate", self._guarded(self.rotate), methods=["POST"]),
            Route(one + "/usage", self._guarded(self.usage), methods=["GET"]),
        ]

    # --- plumbing ----------------------------------------------------------------------------------
    def _guarded(self, handler: Callable) -> Callable:
        async def endpoint(request: Request) -> Response:
            try:
                self._check_https(request)
                return await handler(request, await self._caller(request))
            except HttpError as exc:
                document = {"detail": exc.detail, **({"code": exc.code} if exc.code else {})}
                return _answer(exc.status, document)
            except NotAllowed as exc:
                return _answer(403, {"detail": str(exc)})
            except KeyNotFoundError:
                return _answer(404, {"detail": "no such API key"})
            except ValueError as exc:  # the store's own checks (e.g. rotating a revoked key)
                return _answer(422, {"detail": str(exc)})
            except sa.exc.SQLAlchemyError as exc:
                log.error("API keys: the key store failed: %s", first_line(exc))
                return _answer(503, {"detail": "the key store is unavailable; try again shortly"})

        return endpoint

    def _check_https(self, request: Request) -> None:
        if not self.require_https or request.scope.get("scheme") == "https":
            return
        peer = (request.scope.get("client") or (None, None))[0]
        if self.addresses.peer_is_trusted_proxy(peer):
            forwarded = [
                v.decode("latin-1") for k, v in request.scope["headers"] if k == b"x-forwarded-proto"
            ]
            if forwarded and forwarded[-1].split(",")[-1].strip().lower() == "https":
                return
        raise HttpError(403, "API keys are managed over HTTPS only", code="https_required")

    async def _caller(self, request: Request) -> Caller:
        """Who calls, from the middleware's verdict. A caller with a key must hold one of THIS store
        (in migration mode the old service's keys are let into the API, never into key management,
        whatever scopes that service gives them), and brings its key's limits (`permissions`)."""
        state = request.scope.get("state") or {}
        user_id = state.get("user_id")
        if not user_id:  # the middleware always sets it; never reached without authentication
            raise HttpError(401, "authentication required")
        caller = Caller(
            user_id=user_id, scopes=tuple(state.get("scopes") or ()), key_id=state.get("api_key_id")
        )
        if caller.key_id is None:  # a service's certificate: no key, no limits
            return caller
        try:
            own = await self._store(self.store.get, uuid.UUID(caller.key_id))
        except (KeyNotFoundError, ValueError):
            own = None
        if own is None or own.user_id != caller.user_id:
            raise NotAllowed("only a key of this key store manages keys")
        return Caller(
            user_id=caller.user_id,
            scopes=caller.scopes,
            key_id=caller.key_id,
            expires_at=own.expires_at,
            rate_limit_per_hour=own.rate_limit_per_hour,
            allowed_ips=own.allowed_ips,
        )

    async def _store(self, function: Callable, *args, **kwargs):
        return await anyio.to_thread.run_sync(lambda: function(*args, **kwargs), limiter=self._threads)

    # --- the routes --------------------------------------------------------------------------------
    async def create(self, request: Request, caller: Caller) -> Response:
        caller.require_manage()
        body = await _body(request, CreateKeyRequest)
        owner = caller.owner_filter(body.user_id) or caller.user_id
        expires_at = (
            dt.datetime.now(dt.UTC) + dt.timedelta(days=body.expires_in_days)
            if body.expires_in_days
            else None
        )
        expires_at, rate, networks = caller.bounded(
            scopes=body.scopes,
            expires_at=expires_at,
            rate_limit_per_hour=body.rate_limit_per_hour,
            allowed_ips=body.allowed_ips,
        )
        if (
            not caller.is_admin
            and await self._store(self.store.active_key_count, owner) >= MAX_ACTIVE_KEYS_PER_USER
        ):
            raise NotAllowed(f"a user holds at most {MAX_ACTIVE_KEYS_PER_USER} active keys: revoke one first")
        created = await self._store(
            self.store.create,
            owner,
            body.name,
            actor=caller.actor,
            scopes=body.scopes,
            expires_at=expires_at,
            rate_limit_per_hour=rate,
            allowed_ips=networks,
        )
        return _model(201, CreatedKeyResponse(key=created.key, **KeyResponse.of(created.record).model_dump()))

    async def list_keys(self, request: Request, caller: Caller) -> Response:
        caller.require_manage()
        owner = caller.owner_filter(request.query_params.get("user_id"))
        limit = _count(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        offset = _count(request, "offset", 0, 0, 10**9)
        records = await self._store(
            self.store.list_keys, owner=owner, actor=caller.actor, limit=limit + 1, offset=offset
        )
        page = [KeyResponse.of(record) for record in records[:limit]]
        return _model(200, KeyList(keys=page, next_offset=offset + limit if len(records) > limit else None))

    async def get(self, request: Request, caller: Caller) -> Response:
        caller.require_manage()
        record = await self._store(self.store.get, _key_id(request), owner=caller.owner_filter(None))
        return _model(200, KeyResponse.of(record))

    async def revoke(self, request: Request, caller: Caller) -> Response:
        caller.require_manage()
        record = await self._store(
            self.store.revoke, _key_id(request), actor=caller.actor, owner=caller.owner_filter(None)
        )
        return _model(200, KeyResponse.of(record))

    async def rotate(self, request: Request, caller: Caller) -> Response:
        caller.require_manage()
        key_id = _key_id(request)
        body = await _body(request, RotateKeyRequest, optional=True)
        owner = caller.owner_filter(None)
        old = await self._store(self.store.get, key_id, owner=owner)
        caller.check_covers(
            scopes=old.scopes,
            expires_at=old.expires_at,
            rate_limit_per_hour=old.rate_limit_per_hour,
            allowed_ips=old.allowed_ips,
        )
        created = await self._store(
            self.store.rotate,
            key_id,
            actor=caller.actor,
            owner=owner,
            grace=dt.timedelta(hours=body.grace_hours),
        )
        return _model(201, CreatedKeyResponse(key=created.key, **KeyResponse.of(created.record).model_dump()))

    async def usage(self, request: Request, caller: Caller) -> Response:
        caller.require_manage()
        record = await self._store(self.store.get, _key_id(request), owner=caller.owner_filter(None))
        now = dt.datetime.now(dt.UTC)
        until = _time(request, "until", now)
        since = _time(request, "since", until - dt.timedelta(days=1))
        period = request.query_params.get("period", "hour")
        try:
            usage_summary.check_window(since, until, period)
        except ValueError as exc:
            raise HttpError(422, str(exc)) from None
        summary = await self._store(
            usage_summary.summarize, self.store.engine, record.id, since=since, until=until, period=period
        )
        return _answer(200, summary)

    # --- the auth service's call -------------------------------------------------------------------
    async def validate(self, request: Request) -> Response:
        """`POST /api/v1/keys/validate` as `runtime.auth.api_keys` documents it. Plain HTTP outside
        development is refused with 400 (not 403, which the auth-service client reads as "unknown key":
        a caller configured with http:// fails closed and says why, instead of refusing every key)."""
        try:
            self._check_https(request)
            body = await _body(request, ValidateRequest)
        except HttpError as exc:
            status = 400 if exc.code == "https_required" else exc.status
            return _answer(status, {"detail": exc.detail, **({"code": exc.code} if exc.code else {})})
        if not key_format.is_ours(body.api_key):  # no query; in migration mode, not the old service either
            return _answer(404, {"detail": "unknown API key"})
        request_id = request.headers.get("x-request-id", "")[:128] or "validate"
        try:
            validation = await self.validator.validate(body.api_key, request_id=request_id)
        except AuthServiceUnavailable:
            return _answer(503, {"detail": "the key store is unavailable; try again shortly"})
        info = validation.info
        if info is None:
            return _answer(404, {"detail": "unknown API key"})
        return _answer(200, info.fields(id_field="key_id"))  # the contract's names

    def validation_route(self) -> Route:
        return Route(VALIDATE_PATH, self.validate, methods=["POST"])
