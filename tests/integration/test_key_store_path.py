"""serve-api with our own key store (HOKUSAI_MTLS_KEY_STORE_URL) instead of an auth service.

The image's command on loopback with a SQLite store the test migrated and filled through
`runtime.keys.store`: a key it created is let in without any auth service, an invented or revoked
key is refused, an expired one too, and a key bound to an address is refused from elsewhere, a
forged `X-Forwarded-For` included; behind a trusted proxy the address it forwards counts. serve-api
brings a new store to this version's tables itself, and stops with a clear error on one it cannot read.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator

import httpx
import pytest

from runtime import names
from runtime.keys import key_format, migrate
from runtime.keys.hashing import KeyHasher
from runtime.keys.store import KeyStore
from tests.integration.conftest import container_command, server_environment, wait_healthy
from tests.integration.test_metrics_at_shutdown import Server
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = b"h" * 40
ENV = "staging"


def start(aws, tmp_path, store_url: str, **extra: str) -> tuple[Server, str]:
    port = free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(tmp_path / "certs"),
            names.ENV_KEY_STORE_URL: store_url,
            names.ENV_KEY_HASH_SECRET: base64.b64encode(SECRET).decode(),
            "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{free_port()}",  # not called here
            **extra,
        },
    )
    server = Server(
        [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(port)], env, tmp_path
    )
    try:
        wait_healthy(server.process, port, server.stderr)
    except BaseException:
        server.kill()
        raise
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture
def store(tmp_path) -> Iterator[tuple[KeyStore, str]]:
    url = f"sqlite:///{tmp_path}/keys.db"
    engine = migrate.engine(url)
    migrate.upgrade(engine)
    yield KeyStore(engine, KeyHasher(SECRET), environment=ENV), url
    engine.dispose()


def status(base: str, key: str, **headers: str) -> int:
    return httpx.get(f"{base}/platform/x", headers={"X-API-Key": key, **headers}, timeout=30).status_code


def test_keys_from_our_store_are_let_in_and_refused_as_the_store_says(aws, store, tmp_path):
    keys, url = store
    good = keys.create("alice", "ci", actor="test")
    revoked = keys.create("alice", "old", actor="test")
    keys.revoke(revoked.record.id, actor="test")
    expired = keys.create(
        "alice", "gone", actor="test", expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    )
    server, base = start(aws, tmp_path, url)
    try:
        assert status(base, good.key) == 404  # authenticated; the platform app has no such route
        assert status(base, key_format.generate(ENV)) == 401  # well-formed, not ours
        assert status(base, "hk_test_" + "x" * 38) == 401  # checksum wrong: refused before any query
        assert status(base, revoked.key) == 401
        assert status(base, expired.key) == 401
        assert server.terminate() == 0
    finally:
        server.kill()
    log = server.stderr.read_text()
    assert "validated against our key store" in log
    for key in (good.key, revoked.key, expired.key):
        assert key not in log


def test_an_address_bound_key_is_refused_from_elsewhere_whatever_x_forwarded_for_says(aws, store, tmp_path):
    keys, url = store
    bound = keys.create("alice", "office", actor="test", allowed_ips=["10.9.9.0/24"])
    server, base = start(aws, tmp_path, url)
    try:
        assert status(base, bound.key) == 403  # from 127.0.0.1
        assert status(base, bound.key, **{"X-Forwarded-For": "10.9.9.9"}) == 403  # no trusted proxy: forged
    finally:
        server.kill()


def test_behind_a_trusted_proxy_the_forwarded_address_decides(aws, store, tmp_path):
    keys, url = store
    bound = keys.create("alice", "office", actor="test", allowed_ips=["10.9.9.0/24"])
    server, base = start(aws, tmp_path, url, **{names.ENV_TRUSTED_PROXY_CIDRS: "127.0.0.0/8"})
    try:
        assert status(base, bound.key, **{"X-Forwarded-For": "10.9.9.9"}) == 404  # let in: the proxy says so
        assert status(base, bound.key, **{"X-Forwarded-For": "10.9.8.1"}) == 403
        # the client's own first entry is not believed: the right-most untrusted hop is the client
        assert status(base, bound.key, **{"X-Forwarded-For": "10.9.9.9, 192.0.2.7"}) == 403
    finally:
        server.kill()


def test_serve_api_migrates_a_new_store_itself_and_stops_clearly_on_one_it_cannot_read(aws, tmp_path):
    empty = f"sqlite:///{tmp_path}/empty.db"
    server, _ = start(aws, tmp_path, empty)
    try:
        assert server.terminate() == 0
    finally:
        server.kill()
    engine = migrate.engine(empty)
    assert migrate.current(engine) == migrate.head()
    engine.dispose()

    (tmp_path / "not-a-database").write_bytes(b"this is not SQLite" * 100)
    port = free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(tmp_path / "certs"),
            names.ENV_KEY_STORE_URL: f"sqlite:///{tmp_path}/not-a-database",
            names.ENV_KEY_HASH_SECRET: base64.b64encode(SECRET).decode(),
            "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{free_port()}",
        },
    )
    broken = Server(
        [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(port)], env, tmp_path
    )
    try:
        assert broken.process.wait(timeout=60) == 1
    finally:
        broken.kill()
    log = broken.stderr.read_text()
    assert "error [key-store]: the key store cannot be migrated" in log
    assert "Traceback" not in log
