"""The API-key path's backend on our store: the auth service's answers, its failures as 503s, its settings."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from runtime import names
from runtime.auth.api_keys import AuthServiceClient
from runtime.auth.key_backend import MigratingBackend, backend_from_environ
from runtime.auth.key_info import ApiKeyInfo, address_allowed
from runtime.auth.key_store_backend import KeyStoreBackend
from runtime.errors import AuthServiceUnavailable, KeyStoreError
from runtime.keys import migrate
from runtime.keys.hashing import KeyHasher
from runtime.keys.opening import hash_secret
from runtime.keys.store import KeyStore

SECRET = b"b" * 32


@pytest.fixture
def keys(tmp_path) -> KeyStore:
    engine = migrate.engine(f"sqlite:///{tmp_path}/keys.db")
    migrate.upgrade(engine)
    return KeyStore(engine, KeyHasher(SECRET), environment="staging")


def test_a_known_key_reads_as_the_auth_service_would_answer(keys):
    created = keys.create(
        "alice", "ci", actor="t", scopes=["mlflow:read"], rate_limit_per_hour=9, allowed_ips=["10.0.0.1"]
    )
    info = asyncio.run(KeyStoreBackend(keys).validate(created.key, request_id="r"))
    assert info == ApiKeyInfo(
        str(created.record.id), "alice", None, ("mlflow:read",), 9, None, True, ("10.0.0.1/32",)
    )
    assert ApiKeyInfo.from_json(info.to_json()) == info  # as the cache keeps it
    assert asyncio.run(KeyStoreBackend(keys).validate("hk_test_nope", request_id="r")) is None


def test_a_store_that_fails_or_hangs_is_unavailable_not_a_traceback(keys, monkeypatch):
    created = keys.create("alice", "ci", actor="t")
    backend = KeyStoreBackend(keys, timeout=0.2)
    monkeypatch.setattr(keys, "lookup", lambda key: time.sleep(2))
    started = time.monotonic()
    with pytest.raises(AuthServiceUnavailable, match="no answer within 0.2 s"):
        asyncio.run(backend.validate(created.key, request_id="r"))
    assert time.monotonic() - started < 1.5
    monkeypatch.undo()
    with keys.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE api_keys")
    with pytest.raises(AuthServiceUnavailable, match="key store: OperationalError") as failed:
        asyncio.run(KeyStoreBackend(keys).validate(created.key, request_id="r"))
    assert created.key not in str(failed.value)


def test_the_store_alone_or_with_the_auth_service_in_migration_mode_and_it_needs_its_secret(keys, tmp_path):
    url = str(keys.engine.url)
    secret = base64.b64encode(SECRET).decode()
    alone = backend_from_environ({names.ENV_KEY_STORE_URL: url, names.ENV_KEY_HASH_SECRET: secret})
    assert isinstance(alone, KeyStoreBackend)
    both = backend_from_environ(
        {
            names.ENV_KEY_STORE_URL: url,
            names.ENV_KEY_HASH_SECRET: secret,
            names.ENV_AUTH_SERVICE_URL: "http://127.0.0.1:1",
        }
    )
    assert isinstance(both, MigratingBackend)
    assert isinstance(both.ours, KeyStoreBackend) and isinstance(both.external, AuthServiceClient)
    assert both.changes is both.ours.changes and both.store is both.ours.store
    assert isinstance(
        backend_from_environ({names.ENV_AUTH_SERVICE_URL: "http://127.0.0.1:1"}), AuthServiceClient
    )
    assert backend_from_environ({}) is None
    with pytest.raises(KeyStoreError, match=names.ENV_KEY_HASH_SECRET):
        backend_from_environ({names.ENV_KEY_STORE_URL: url})
    with pytest.raises(KeyStoreError, match="auth migrate"):
        backend_from_environ(
            {names.ENV_KEY_STORE_URL: f"sqlite:///{tmp_path}/empty.db", names.ENV_KEY_HASH_SECRET: secret}
        )


def test_the_hash_secret_is_base64_or_text_and_long_enough():
    assert hash_secret(base64.b64encode(b"x" * 32).decode()) == b"x" * 32
    assert hash_secret("y" * 40) == b"y" * 40
    with pytest.raises(ValueError, match="at least 32 bytes"):
        hash_secret("short")


@pytest.mark.parametrize(
    ("allowed", "client", "let_in"),
    [
        (None, "203.0.113.9", True),
        (("10.0.0.0/8",), "10.2.3.4", True),
        (("10.0.0.0/8",), "11.2.3.4", False),
        (("10.0.0.0/8",), None, False),
        (("10.0.0.0/8",), "not-an-address", False),
        (("2001:db8::/32",), "2001:db8::1", True),
        ((), "10.2.3.4", False),
    ],
)
def test_an_allowlist_lets_in_only_its_networks(allowed, client, let_in):
    info = ApiKeyInfo("k", "u", None, (), None, None, True, allowed)
    assert address_allowed(info, client) is let_in


def test_without_a_store_neither_sqlalchemy_nor_alembic_is_imported():
    """The worker image and an API without a store have no database libraries: serve-api must start."""
    import subprocess
    import sys

    code = (
        "import sys, runtime.services.api_service, runtime.auth.key_backend as k; "
        "k.backend_from_environ({}); "
        "print(sorted(m for m in ('sqlalchemy', 'alembic') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stderr
