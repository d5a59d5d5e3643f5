"""`configure_internal_mtls()`: the API service's in-process loader (the seed's name and place).

It does what `hokusai-mtls load-certs` does and then points this process's MLflow client
at the files through the only two variables MLflow reads (docs/DESIGN.md: there is no
`MLFLOW_TRACKING_CLIENT_KEY_PATH`; the key travels inside the client-cert PEM).
Call it before the MLflow client makes its first request; the client keeps a pooled
session per process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from runtime import names
from runtime.secrets.loader import (
    LoaderSettings,
    LoadResult,
    load_certificates,
    refresh_delay,
    refresh_or_keep,
)

if TYPE_CHECKING:
    from runtime.secrets.secret_store import SecretStore

log = logging.getLogger("hokusai_mtls")
_lock = threading.Lock()
_result: LoadResult | None = None


def configure_internal_mtls(
    *,
    role: str | None = None,
    environ: MutableMapping[str, str] = os.environ,
    store: SecretStore | None = None,
    reload: bool = False,
    refresh: bool = False,
) -> LoadResult:
    """Load this service's client identity and set MLflow's TLS variables in `environ`.

    Safe to call twice: later calls return the first result without fetching again
    (pass `reload=True` to fetch again). The role defaults to HOKUSAI_MTLS_ROLE, else `api`.
    Raises `LoadError` in staging/production when the certificates are unusable.
    `refresh=True` (a running service, implies `reload`): anything short of a new verified set
    raises `RefreshError` in every environment, and the files and variables stay as they are.
    """
    global _result
    with _lock:
        if _result is not None and not (reload or refresh):
            return _result
        settings = LoaderSettings.from_environ(
            environ, role=role or environ.get(names.ENV_ROLE) or names.API.role
        )
        result = load_certificates(settings, store=store, refresh=refresh)
        apply_exports(result, environ)
        _result = result
        return result


def apply_exports(result: LoadResult, environ: MutableMapping[str, str]) -> None:
    for name, value in result.exports().items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


def reset_for_tests() -> None:
    """Forget the cached result (tests configure several times in one process)."""
    global _result
    with _lock:
        _result = None


def start_certificate_refresh(
    interval_seconds: float = 300, *, role: str | None = None, environ: MutableMapping[str, str] = os.environ
) -> threading.Thread:
    """Re-run `configure_internal_mtls(refresh=True)` every `interval_seconds` in a daemon thread.

    For long-running clients (workers): the loader rewrites the files atomically at the same
    paths, and MLflow's client reads them for every new connection, so a rotated certificate
    is used without a restart. A failed refresh is logged and the previous files stay.
    """

    def refresh_forever() -> None:
        while True:
            time.sleep(refresh_delay(interval_seconds))  # jittered, as the servers' refresh
            refresh_or_keep(lambda: configure_internal_mtls(role=role, environ=environ, refresh=True))

    thread = threading.Thread(target=refresh_forever, name="hokusai-mtls-refresh", daemon=True)
    thread.start()
    return thread
