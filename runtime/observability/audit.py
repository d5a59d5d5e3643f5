"""One structured line per authentication decision (seed 004: "log all authentication attempts,
track authorization decisions").

Each line is a JSON object on the `hokusai_mtls.audit` logger, refusals at WARNING and requests
let through at INFO (so setting that logger to WARNING keeps the refusals and saves the ~20 us a
line costs on every request), and CloudWatch Logs Insights can filter on its fields: `request_id`, `auth_path` (`mtls`, `api_key`), `identity`
(the service a certificate named) or `key` (the first 16 hex digits of the key's SHA-256
fingerprint: enough to find the key, useless to use it) and `key_kind` (`ours`: our store's format;
`other`: the old auth service's, in migration mode), `method`, `route` (the path, never the
query string, which may hold a credential), `client` (the address as `client_address` decided
it), `internal`, `outcome` and `status` (what the caller got, from us or from the app).

Never a credential: the only thing derived from a key is its fingerprint prefix, and every
value a client sent is JSON-escaped (no forged line breaks) and cut to a bounded length.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("hokusai_mtls.audit")

MAX_ROUTE_CHARS = 256
KEY_FINGERPRINT_CHARS = 16


def enabled(allowed: bool) -> bool:
    """Whether a decision line would be written (callers skip building one when not)."""
    return log.isEnabledFor(logging.INFO if allowed else logging.WARNING)


def decision(
    *,
    request_id: str,
    auth_path: str,
    outcome: str,
    status: int | None,
    method: str,
    route: str,
    client: str | None,
    internal: bool,
    identity: str | None = None,
    key_fingerprint: str | None = None,
    key_kind: str | None = None,
) -> None:
    """Write the line (skipped cheaply when the audit logger is off for it). `key_kind`: `ours` for a
    key in our store's format, `other` for any other key (the old auth service's, in migration mode)."""
    allowed = outcome == "success"
    if not enabled(allowed):
        return
    record = {
        "event": "auth",
        "request_id": request_id,
        "auth_path": auth_path,
        "identity": identity,
        "key": key_fingerprint[:KEY_FINGERPRINT_CHARS] if key_fingerprint else None,
        "key_kind": key_kind,
        "method": method[:16],
        "route": route[:MAX_ROUTE_CHARS],
        "client": client,
        "internal": internal,
        "outcome": outcome,
        "status": status,
    }
    log.log(logging.INFO if allowed else logging.WARNING, json.dumps(record, separators=(",", ":")))
