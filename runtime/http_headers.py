"""What the middleware and the MLflow proxy do alike: X-Request-ID, credentials in logs, JSON errors.

`X-Request-ID`: keep the caller's (if it looks like an ID) or make one, and pass it on, so a
request keeps one ID from the ALB to MLflow and back into every log line on the way.
Credentials never reach a log line: `masked_headers` replaces them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

REQUEST_ID = b"x-request-id"
_SANE = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


def new_request_id() -> bytes:
    """32 random hex digits, like `uuid4().hex` but a quarter of its cost: no UUID object."""
    return os.urandom(16).hex().encode()


def request_id_of(scope: dict) -> bytes:
    """The caller's ID when it is a short, plain token; a new random one otherwise."""
    for name, value in scope.get("headers", []):
        if name.lower() == REQUEST_ID and _SANE.fullmatch(value):
            return value
    return new_request_id()


def with_request_id(scope: dict) -> tuple[dict, bytes]:
    """A copy of `scope` whose headers carry exactly one sane X-Request-ID, and that ID.

    One pass over the headers: this runs on every request the middleware sees.
    """
    request_id = None
    headers = []
    for header in scope.get("headers", ()):
        if header[0].lower() != REQUEST_ID:
            headers.append(header)
        elif request_id is None and _SANE.fullmatch(header[1]):
            request_id = header[1]
    if request_id is None:
        request_id = new_request_id()
    headers.append((REQUEST_ID, request_id))
    return {**scope, "headers": headers}, request_id


MASKED = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"x-api-key", b"mlflow-tracking-token"}
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
