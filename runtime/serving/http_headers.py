"""What the middleware and the MLflow proxy do alike: X-Request-ID, credentials in logs, JSON errors.

`X-Request-ID`: keep the caller's (if it looks like an ID) or make one, and pass it on, so a
request keeps one ID from the ALB to MLflow and back into every log line on the way.
Credentials never reach a log line: `masked_headers` replaces them (and `runtime.observability.log_redaction`
catches what a message carries anyway).

Errors on MLflow's routes are in MLflow's own shape, `{"error_code": ..., "message": ...}`
(`send_mlflow_error`): MLflow's client (`mlflow.utils.rest_utils.verify_rest_response`) turns
any JSON object into a `RestException` with `error_code` read from the body, and a body
without one becomes `INTERNAL_ERROR`, reported as "HTTP 500" whatever the status was.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

REQUEST_ID = b"x-request-id"
_SANE = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


def is_sane_request_id(value: bytes) -> bool:
    """A caller's X-Request-ID we keep: a short plain token (it goes into every log line)."""
    return _SANE.fullmatch(value) is not None


def new_request_id() -> bytes:
    """32 random hex digits, like `uuid4().hex` but a quarter of its cost: no UUID object."""
    return os.urandom(16).hex().encode()


def request_id_of(scope: dict) -> bytes:
    """The caller's ID when it is a short, plain token; a new random one otherwise."""
    for name, value in scope.get("headers", []):
        if name.lower() == REQUEST_ID and _SANE.fullmatch(value):
            return value
    return new_request_id()


MASKED = frozenset(
    {
        b"authorization",
        b"proxy-authorization",
        b"cookie",
        b"x-api-key",
        b"mlflow-tracking-token",
        b"x-amz-security-token",
        b"x-auth-token",
    }
)


def masked_headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Headers for a log line: credentials replaced by `***`."""
    return {
        name.decode("latin-1"): "***" if name.lower() in MASKED else value.decode("latin-1")
        for name, value in headers
    }


async def send_json(send, status: int, body: dict, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A complete JSON response (our errors: 401/403/429/503 from the middleware, 502-504 from the proxy)."""
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# --- MLflow's error shape ---------------------------------------------------------------------
MLFLOW_ERROR_CODES: dict[int, str] = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "ENDPOINT_NOT_FOUND",
    429: "REQUEST_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    501: "NOT_IMPLEMENTED",
    502: "TEMPORARILY_UNAVAILABLE",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
"""Status -> `mlflow.protos.databricks_pb2.ErrorCode` name (MLflow 3.17). Each name is one MLflow's
`ERROR_CODE_TO_HTTP_STATUS` maps back to the same status, except 502: MLflow has no code for a
bad gateway, and TEMPORARILY_UNAVAILABLE (503) says best what the client can do: try again."""


def mlflow_error_code(status: int) -> str:
    """MLflow's `ErrorCode` name for an HTTP status (INTERNAL_ERROR / BAD_REQUEST when unmapped)."""
    return MLFLOW_ERROR_CODES.get(status) or ("INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")


def mlflow_error(status: int, message: str, error_code: str | None = None, **extra) -> dict:
    """An error body MLflow's client parses: `error_code` and `message` first, then our `extra` fields."""
    return {"error_code": error_code or mlflow_error_code(status), "message": message, **extra}


async def send_mlflow_error(
    send,
    status: int,
    error_code: str | None,
    message: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    **extra,
) -> None:
    """A complete JSON error in MLflow's shape; `error_code=None` takes `mlflow_error_code(status)`.

    >>> await send_mlflow_error(send, 401, None, "API key required", [(REQUEST_ID, rid)])
    ... # {"error_code": "UNAUTHENTICATED", "message": "API key required"}
    """
    await send_json(send, status, mlflow_error(status, message, error_code, **extra), headers)
