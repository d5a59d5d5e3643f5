"""Who the API-key path asks about a key: our key store, the external auth service, or no one.

Kept apart from `runtime.auth.key_store_backend` so a process without a store (a worker image, the
API without `HOKUSAI_MTLS_KEY_STORE_URL`) never imports SQLAlchemy or Alembic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from runtime import names
from runtime.auth.api_keys import AuthServiceClient, KeyBackend


def backend_from_environ(environ: Mapping[str, str] = os.environ) -> KeyBackend | None:
    """Our key store if `HOKUSAI_MTLS_KEY_STORE_URL` is set, else the auth service of `AUTH_SERVICE_URL`,
    else None (no API-key path). The store must have been migrated (`hokusai-mtls auth migrate`):
    `KeyStoreError` otherwise, or when its secret is missing (`runtime.keys.opening`)."""
    url = environ.get(names.ENV_KEY_STORE_URL, "").strip()
    if not url:
        auth_url = environ.get(names.ENV_AUTH_SERVICE_URL)
        return AuthServiceClient(auth_url) if auth_url else None
    try:
        from runtime.auth.key_store_backend import store_backend
    except ImportError as exc:  # an image built without the `keys` extra
        raise ValueError(
            f"{names.ENV_KEY_STORE_URL} is set but this installation has no key store support "
            f"(pip install 'hokusai-mtls[keys]'): {exc}"
        ) from None
    return store_backend(environ)
