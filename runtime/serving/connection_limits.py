"""How long a connection may take, and how many a listener holds: the settings and their checks.

Every listener `runtime.serving` runs (strict mTLS, permissive, plain, the API port, the health
port) applies the same five settings, read from the environment by `serve-mlflow` and `serve-api`:

| variable | default | bounds |
|---|---|---|
| `HOKUSAI_MTLS_HEADER_TIMEOUT_SECONDS` | 10 | from the connection (after its TLS handshake), or from the first byte of the next request on a kept-alive one, until the end of the request's headers; total, trickled bytes do not extend it (nginx's `client_header_timeout`). Partial headers get `408`, then the connection closes |
| `HOKUSAI_MTLS_BODY_IDLE_TIMEOUT_SECONDS` | 30 | while a request body is read, the longest time without a byte (the app's `receive()` then sees `http.disconnect`); also while a response is written, the longest time the client reads nothing. Time the app itself takes is never counted |
| `HOKUSAI_MTLS_KEEPALIVE_TIMEOUT_SECONDS` | 5 (MLflow), 65 (API) | an idle kept-alive connection after a response (uvicorn's `timeout_keep_alive`) |
| `HOKUSAI_MTLS_HANDSHAKE_TIMEOUT_SECONDS` | 10 | a TLS handshake, from the accepted connection (asyncio's default is 60 s) |
| `HOKUSAI_MTLS_MAX_CONNECTIONS` | 4096 | connections one listener holds, pending handshakes included; more are closed at once (a rate-limited WARNING counts them) |

The API's keep-alive default is longer than the ALB's idle timeout (60 s by default). AWS's ALB
documentation ("Edit attributes for your Application Load Balancer", Connection idle timeout,
https://docs.aws.amazon.com/elasticloadbalancing/latest/application/edit-load-balancer-attributes.html#connection-idle-timeout)
recommends configuring "the idle timeout of your application to be larger than the idle timeout
configured for the load balancer": otherwise the target may close a connection while the ALB sends
it a request, and the ALB answers the client 502 Bad Gateway. (The Classic Load Balancer guide says
the same of the keep-alive time: "greater than the idle timeout setting on your load balancer".)
Raise it with the ALB's idle timeout if that is changed.
MLflow is dialled directly (Cloud Map), by clients whose pools drop idle connections sooner
(`runtime.adaptive_client`: 4 s), so its default stays uvicorn's 5 s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from runtime import names

MAX_SECONDS = 24 * 3600.0
"""No timeout is longer than a day: a bigger value is a typo (milliseconds?), not a setting."""
MAX_CONNECTIONS_LIMIT = 1_000_000


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_idle_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    handshake_timeout: float = 10.0
    max_connections: int = 4096

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            variable = _VARIABLES[item.name]
            if item.name == "max_connections":
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int)
                    or not 1 <= value <= MAX_CONNECTIONS_LIMIT
                ):
                    raise ValueError(
                        f"{variable}={value!r}: expected a whole number from 1 to {MAX_CONNECTIONS_LIMIT}"
                    )
            elif (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 < value <= MAX_SECONDS
            ):
                raise ValueError(
                    f"{variable}={value!r}: expected seconds, more than 0 and at most {MAX_SECONDS:.0f}"
                )

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] = os.environ, *, defaults: ConnectionLimits | None = None
    ) -> ConnectionLimits:
        """The limits the environment sets over `defaults`; ValueError naming the variable if one is bad."""
        base = defaults or cls()
        # Keyword arguments are evaluated in order: the first bad variable (in field order) is named.
        return replace(
            base,
            header_timeout=_seconds(environ, "header_timeout", base.header_timeout),
            body_idle_timeout=_seconds(environ, "body_idle_timeout", base.body_idle_timeout),
            keepalive_timeout=_seconds(environ, "keepalive_timeout", base.keepalive_timeout),
            handshake_timeout=_seconds(environ, "handshake_timeout", base.handshake_timeout),
            max_connections=_whole(environ, "max_connections", base.max_connections),
        )

    def describe(self, *, tls: bool = True) -> str:
        """For the start-up log line."""
        handshake = f"TLS handshake {self.handshake_timeout:g} s, " if tls else ""
        return (
            f"headers {self.header_timeout:g} s, body idle {self.body_idle_timeout:g} s, "
            f"keep-alive {self.keepalive_timeout:g} s, {handshake}at most {self.max_connections} connections"
        )


_VARIABLES = {
    "header_timeout": names.ENV_HEADER_TIMEOUT_SECONDS,
    "body_idle_timeout": names.ENV_BODY_IDLE_TIMEOUT_SECONDS,
    "keepalive_timeout": names.ENV_KEEPALIVE_TIMEOUT_SECONDS,
    "handshake_timeout": names.ENV_HANDSHAKE_TIMEOUT_SECONDS,
    "max_connections": names.ENV_MAX_CONNECTIONS,
}


def _raw(environ: Mapping[str, str], field: str) -> str | None:
    """The variable for `field`, stripped; None if unset or blank (the default applies)."""
    raw = environ.get(_VARIABLES[field])
    if raw is None or not raw.strip():
        return None
    return raw.strip()


def _seconds(environ: Mapping[str, str], field: str, default: float) -> float:
    raw = _raw(environ, field)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{_VARIABLES[field]}={raw!r}: expected a number of seconds") from None


def _whole(environ: Mapping[str, str], field: str, default: int) -> int:
    raw = _raw(environ, field)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{_VARIABLES[field]}={raw!r}: expected a whole number") from None


MLFLOW_LIMITS = ConnectionLimits()
"""serve-mlflow's defaults (its mTLS, permissive or plain port, and the health port)."""
API_LIMITS = ConnectionLimits(keepalive_timeout=65.0)
"""serve-api's defaults: keep-alive longer than the ALB's 60 s idle timeout (see the module docstring)."""


def mlflow_limits(environ: Mapping[str, str] = os.environ) -> ConnectionLimits:
    return ConnectionLimits.from_environ(environ, defaults=MLFLOW_LIMITS)


def api_limits(environ: Mapping[str, str] = os.environ) -> ConnectionLimits:
    return ConnectionLimits.from_environ(environ, defaults=API_LIMITS)
