"""`hokusai-mtls auth ...` end to end, as an operator runs it: migrate, the first admin key, list,
rotate, revoke, usage; a key printed once and never again; clear errors with their codes, never a traceback."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from runtime import names
from runtime.keys import key_format, migrate
from runtime.keys.hashing import KeyHasher
from runtime.keys.schema import ApiKeyUsage
from runtime.keys.store import KeyStore
from tests.integration.conftest import container_command

pytestmark = pytest.mark.integration

SECRET = b"c" * 32
CLI = container_command("Dockerfile.api")[:1]  # the image's hokusai-mtls


def run(
    tmp_path: Path, *args: str, secret: bool = True, store: str = "keys.db", hash_secret: bytes = SECRET
) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        names.ENV_ENVIRONMENT: "staging",
        names.ENV_KEY_STORE_URL: store if "://" in store else f"sqlite:///{tmp_path}/{store}",
        **({names.ENV_KEY_HASH_SECRET: base64.b64encode(hash_secret).decode()} if secret else {}),
    }
    return subprocess.run(
        [*CLI, "auth", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def ok(result: subprocess.CompletedProcess) -> dict | list:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def test_an_operator_manages_keys_and_each_key_is_shown_once(tmp_path):
    assert ok(run(tmp_path, "migrate", "--json")) == {"from": None, "to": migrate.head()}
    admin = ok(run(tmp_path, "create-key", "--user", "ops", "--name", "first admin", "--admin", "--json"))
    assert admin["key"].startswith("hk_test_") and "keys:admin" in admin["scopes"]
    ci = ok(
        run(
            tmp_path,
            "create-key",
            "--user",
            "alice",
            "--name",
            "ci",
            "--scope",
            "mlflow:read",
            "--allow-ip",
            "10.0.0.0/8",
            "--rate-limit",
            "100",
            "--expires-days",
            "30",
            "--json",
        )
    )
    listed = run(tmp_path, "list-keys", "--json")
    assert {k["id"] for k in ok(listed)} == {admin["id"], ci["id"]}
    assert admin["key"] not in listed.stdout and ci["key"] not in listed.stdout
    rotated = ok(run(tmp_path, "rotate-key", ci["id"], "--grace-hours", "1", "--json"))
    assert rotated["rotated_from"] == ci["id"] and rotated["key"] != ci["key"]
    revoked = ok(run(tmp_path, "revoke-key", rotated["id"], "--json"))
    assert revoked["is_active"] is False
    text = run(tmp_path, "list-keys", "--user", "alice")
    assert text.returncode == 0 and "revoked" in text.stdout and rotated["key"] not in text.stdout

    engine = migrate.engine(f"sqlite:///{tmp_path}/keys.db")
    store = KeyStore(engine, KeyHasher(SECRET), environment="staging")
    assert store.lookup(admin["key"]).user_id == "ops"  # what the CLI printed is the key the store knows
    assert store.lookup(ci["key"]).usable(store.lookup(ci["key"]).created_at)  # within its 1 h grace
    actors = {row.actor for row in store.audit_trail()}
    assert len(actors) == 1 and actors.pop().startswith("cli:")
    engine.dispose()


def test_the_key_is_printed_alone_on_its_first_line_for_scripts(tmp_path):
    run(tmp_path, "migrate")
    result = run(tmp_path, "create-key", "--user", "alice", "--name", "ci")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert key_format.parse(first).key == first
    assert "shown this once" in result.stdout


def test_usage_summarises_what_the_store_recorded_for_the_key(tmp_path):
    ok(run(tmp_path, "migrate", "--json"))
    made = ok(run(tmp_path, "create-key", "--user", "alice", "--name", "ci", "--json"))
    engine = migrate.engine(f"sqlite:///{tmp_path}/keys.db")
    now = dt.datetime.now(dt.UTC)
    rows = [  # 4 requests: 3 GETs (10, 20, 30 ms, one a 404) and a POST of 40 ms, in the last hour
        ("GET /runs", 200, 10),
        ("GET /runs", 200, 20),
        ("GET /runs", 404, 30),
        ("POST /runs", 201, 40),
    ]
    with engine.begin() as connection:
        connection.execute(
            sa.insert(ApiKeyUsage.__table__),
            [
                {
                    "id": uuid.uuid4(),
                    "api_key_id": uuid.UUID(made["id"]),
                    "endpoint": endpoint,
                    "timestamp": now - dt.timedelta(minutes=10),
                    "response_time_ms": ms,
                    "status_code": status,
                }
                for endpoint, status, ms in rows
            ],
        )
    engine.dispose()
    summary = ok(run(tmp_path, "usage", made["id"], "--days", "1", "--json"))
    assert summary["requests"] == 4
    assert summary["endpoints"] == [
        {"endpoint": "GET /runs", "requests": 3},
        {"endpoint": "POST /runs", "requests": 1},
    ]
    assert summary["statuses"] == {"200": 2, "201": 1, "404": 1}
    assert summary["response_time_ms"] == {"p50": 20, "p95": 40, "p99": 40, "max": 40}
    text = run(tmp_path, "usage", made["id"])
    assert text.returncode == 0 and "4 requests" in text.stdout and "p50 20" in text.stdout


@pytest.mark.parametrize(
    ("args", "secret", "store", "code", "words"),
    [
        (
            ("create-key", "--user", "a", "--name", "n"),
            False,
            "keys.db",
            "key-store",
            names.ENV_KEY_HASH_SECRET,
        ),
        (("list-keys",), True, "never-migrated.db", "key-store", "auth migrate"),
        (("revoke-key", str(uuid.uuid4())), True, "keys.db", "key-not-found", "no API key"),
        (("revoke-key", "not-a-uuid"), True, "keys.db", "invalid-value", "expected a UUID"),
        (("usage", str(uuid.uuid4())), True, "keys.db", "key-not-found", "no API key"),
        (("create-key", "--user", "a", "--name", "x\nINFO forged"), True, "keys.db", "invalid-value", "name"),
        (
            ("create-key", "--user", "a", "--name", "n", "--scope", "a b"),
            True,
            "keys.db",
            "invalid-value",
            "scopes",
        ),
        (("usage", str(uuid.uuid4()), "--days", "0"), True, "keys.db", "invalid-value", "--days"),
        (
            ("create-key", "--user", "a", "--name", "n", "--allow-ip", "10.0.0.0/33"),
            True,
            "keys.db",
            "invalid-value",
            "allowed_ips",
        ),
        (
            ("create-key", "--user", "a", "--name", "n", "--expires-days", "0"),
            True,
            "keys.db",
            "invalid-value",
            "--expires-days",
        ),
    ],
)
def test_errors_name_what_is_wrong_with_their_code(tmp_path, args, secret, store, code, words):
    run(tmp_path, "migrate")
    result = run(tmp_path, *args, secret=secret, store=store)
    assert result.returncode == 1
    assert f"error [{code}]" in result.stderr and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def failed(result: subprocess.CompletedProcess, code: str, *words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert f"error [{code}]" in result.stderr and all(w in result.stderr for w in words), result.stderr
    assert "Traceback" not in result.stderr


def test_another_hashing_secret_than_the_stores_is_refused_before_it_can_make_useless_keys(tmp_path):
    run(tmp_path, "migrate")
    ok(
        run(tmp_path, "create-key", "--user", "alice", "--name", "ci", "--json")
    )  # the store now knows its secret
    wrong = run(tmp_path, "create-key", "--user", "bob", "--name", "ci", hash_secret=b"w" * 32)
    failed(wrong, "key-store", names.ENV_KEY_HASH_SECRET, "is not the secret")
    assert [k["user_id"] for k in ok(run(tmp_path, "list-keys", "--json"))] == ["alice"]


def test_a_store_a_newer_version_migrated_is_named_as_such(tmp_path):
    run(tmp_path, "migrate")
    engine = migrate.engine(f"sqlite:///{tmp_path}/keys.db")
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = '0099'"))  # noqa: S608
    engine.dispose()
    for args in (("migrate",), ("list-keys",)):
        failed(run(tmp_path, *args), "key-store", "revision 0099", "newer hokusai-mtls")


def test_an_unsupported_database_is_named_and_the_url_is_not_printed(tmp_path):
    result = run(tmp_path, "list-keys", store="mysql://root:hunter2@db/keys")
    failed(result, "key-store", "'mysql' is not a supported database")
    assert "hunter2" not in result.stderr
