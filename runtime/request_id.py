"""`X-Request-ID`: keep the caller's (if it looks like an ID) or make one, and pass it on.

Shared by the authentication middleware and the MLflow proxy, so a request keeps one ID
from the ALB to MLflow and back into every log line on the way.
"""

from __future__ import annotations

import re
import uuid

REQUEST_ID = b"x-request-id"
_SANE = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id_of(scope: dict) -> bytes:
    """The caller's ID when it is a short, plain token; a new random one otherwise."""
    for name, value in scope.get("headers", []):
        if name.lower() == REQUEST_ID and _SANE.fullmatch(value):
            return value
    return uuid.uuid4().hex.encode()


def with_request_id(scope: dict) -> tuple[dict, bytes]:
    """`scope` whose headers carry exactly one sane X-Request-ID, and that ID."""
    request_id = request_id_of(scope)
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != REQUEST_ID]
    return {**scope, "headers": [*headers, (REQUEST_ID, request_id)]}, request_id
