"""docs/examples/ run against a real `hokusai-mtls serve-api` and do what they say.

The server is the API image's command (`Dockerfile.api`) on loopback with a SQLite key store, in
`development`: the one environment whose key API answers plain HTTP too (`runtime.services.key_api`),
so the examples send exactly what a client sends to the ALB, never a `X-Forwarded-Proto` of their
own (tests/integration/test_key_service.py plays the trusted proxy in staging instead). Its
certificates are a development set in moto's Secrets Manager, so it loads them as ECS would, and
127.0.0.0/8 is the trusted proxy range, as in that test.

Each example (python, Node's built-in fetch, bash + curl) runs as a subprocess with only
HOKUSAI_API_URL and HOKUSAI_API_KEY (a `keys:manage` key made through `runtime.keys.store`, one user
per example) and must exit 0. What it did is checked through the store, not through its output: the
key it created, then rotated with no grace (the old one inactive, the new one pointing at it) and
revoked, and the audit rows naming the calling key. Its output must hold no key.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_stack.environment import BIN, REPO, container_command, service_environment
from runtime import names
from runtime.certificates.certset import CertificateSet
from runtime.keys import key_format, migrate
from runtime.keys.hashing import KeyHasher
from runtime.keys.permissions import MANAGE_SCOPE
from runtime.keys.store import KeyStore
from runtime.secrets.secret_store import SecretStore
from tests.integration.conftest import SCOPES, wait_healthy
from tests.integration.test_metrics_at_shutdown import Server
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = names.check_environment("development")
SECRET = b"e" * 40
EXAMPLES = REPO / "docs" / "examples"
RATE_LIMIT = 1000
EXAMPLE_SECONDS = 60

RUNS = {
    "python": ([sys.executable, str(EXAMPLES / "python_client.py")], "python example"),
    "javascript": ([str(BIN / "node"), str(EXAMPLES / "javascript_client.mjs")], "javascript example"),
    "curl": (["bash", str(EXAMPLES / "curl.sh")], "curl example"),
}
"""Example -> (its command line, the name it gives the key it creates)."""


class ExampleApi:
    """One serve-api process in development on a SQLite store, and the store itself."""

    def __init__(self, aws: dict, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{root}/keys.db"
        engine = migrate.engine(url)
        migrate.upgrade(engine)
        self.store = KeyStore(engine, KeyHasher(SECRET), environment=ENV)
        self.port = free_port()
        env = service_environment(
            ENV,
            aws["endpoint"],
            **{
                names.ENV_CERT_DIR: str(root / "certs"),
                names.ENV_DEV_CA_DIR: str(root / "dev-ca"),  # not used: the set is in Secrets Manager
                names.ENV_INTERNAL_CIDRS: "127.0.0.0/8",
                names.ENV_TRUSTED_PROXY_CIDRS: "127.0.0.0/8",
                names.ENV_SERVICE_SCOPES: json.dumps(SCOPES),
                names.ENV_KEY_STORE_URL: url,
                names.ENV_KEY_HASH_SECRET: base64.b64encode(SECRET).decode(),
                "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{free_port()}",  # not called here
            },
        )
        self.server = Server(
            [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(self.port)], env, root
        )
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            self.health = wait_healthy(self.server.process, self.port, self.server.stderr)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> str:
        self.server.kill()
        self.store.engine.dispose()
        return self.server.stderr.read_text()


@pytest.fixture(scope="module")
def api(aws, tmp_path_factory) -> Iterator[ExampleApi]:
    certificates = CertificateSet.issue(ENV, server_sans=("localhost", "127.0.0.1"))
    SecretStore(ENV, client=aws["client"]).upload(certificates)  # beside the conftest's staging set
    server = ExampleApi(aws, tmp_path_factory.mktemp("examples"))
    yield server
    log = server.stop()
    assert "Traceback" not in log


@pytest.mark.parametrize("example", sorted(RUNS))
def test_each_example_creates_rotates_and_revokes_a_key(api, example, tmp_path):
    command, name = RUNS[example]
    user = f"{example}-user"
    manager = api.store.create(
        user, "examples", actor="test", scopes=[MANAGE_SCOPE], rate_limit_per_hour=RATE_LIMIT
    )
    environ = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "HOKUSAI_API_URL": api.url,
        "HOKUSAI_API_KEY": manager.key,
    }
    result = subprocess.run(
        command,
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_SECONDS,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert api.health["security_level"] == "MTLS"

    # the store, not the example's word: one key created under that name, rotated away, its successor revoked
    made = [record for record in api.store.list_keys(owner=user) if record.name == name]
    assert len(made) == 2, made
    first = next(record for record in made if record.rotated_from is None)
    second = next(record for record in made if record.rotated_from == first.id)
    assert not first.is_active and first.revoked_at is not None  # rotated with grace 0
    assert not second.is_active and second.revoked_at is not None  # revoked
    # inherited from the calling key where the example left them out; the expiry it asked for
    assert first.rate_limit_per_hour == second.rate_limit_per_hour == RATE_LIMIT
    assert first.scopes == second.scopes == ()
    assert first.expires_at is not None and second.expires_at is not None

    actor = f"api:{user} key:{manager.record.id}"
    trail = [(row.action, row.api_key_id) for row in api.store.audit_trail() if row.actor == actor]
    assert ("created", first.id) in trail
    assert ("rotated", first.id) in trail
    assert ("revoked", second.id) in trail
    assert ("listed", None) in trail

    # it showed the calling key's rate-limit headers, and never printed a key
    assert f"X-RateLimit-Limit: {RATE_LIMIT}" in result.stdout
    assert key_format.KEY_PATTERN.search(output) is None, output
    assert manager.key not in output
