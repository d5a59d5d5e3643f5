"""Our key service as the platform uses it: the REST API under serve-api, two API instances on one store,
usage recorded, and the auth service's validation call answered by us.

Each server is the API image's command (`Dockerfile.api`) in `staging`, on loopback, behind a
"proxy" the test plays: 127.0.0.0/8 is the trusted proxy range, so `X-Forwarded-Proto: https` is
what the ALB would write. The store is SQLite (a file both instances share) and, for the REST API
test, also a real PostgreSQL.

- A user with `keys:manage` manages their own keys and no one else's; nothing they make is wider than
  their key; an admin manages anyone's; the key appears in the creating answer and nowhere after (no
  later answer, no log line).
- The management API refuses plain HTTP (no `X-Forwarded-Proto: https` from the trusted proxy).
- A key revoked or rotated away through instance A is refused by instance B, which had it cached,
  within 1 s: `runtime.auth.key_changes` (the bound is the product's promise, so the test holds it);
  with a memory cache per instance and with one Redis cache they share, where an instance started
  after the revocation must not trust the entry Redis still holds.
- Usage: every request with a key is summarised by the usage endpoint; `last_used_at` moves.
- A third instance configured with `AUTH_SERVICE_URL` pointing at instance A (the external-service
  client, unchanged) lets A's keys in: our service is the platform's auth service.
- Migration mode (store and `AUTH_SERVICE_URL` both set): our keys are ours to judge, every other
  key is the old service's (its test double here: a remote service we do not own).
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local_stack.auth_service import ACTIVE_KEY, INACTIVE_KEY, key_record
from runtime import names
from runtime.keys import key_format, migrate
from runtime.keys.hashing import KeyHasher
from runtime.keys.permissions import ADMIN_SCOPE, MANAGE_SCOPE
from runtime.keys.store import KeyStore
from tests.integration.conftest import container_command, server_environment, wait_healthy
from tests.integration.test_metrics_at_shutdown import Server
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = b"s" * 40
ENV = "staging"
HTTPS = {"X-Forwarded-Proto": "https"}
KEYS = "/api/v1/auth/keys"


class Api:
    """One serve-api process and a client for it."""

    def __init__(self, aws, root: Path, store_url: str | None, **extra: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        settings = {
            names.ENV_CERT_DIR: str(root / "certs"),
            names.ENV_TRUSTED_PROXY_CIDRS: "127.0.0.0/8",
            "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{free_port()}",  # not called here
            **extra,
        }
        if store_url is not None:
            settings[names.ENV_KEY_STORE_URL] = store_url
            settings[names.ENV_KEY_HASH_SECRET] = base64.b64encode(SECRET).decode()
        env = server_environment(aws, **settings)
        self.server = Server(
            [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(self.port)], env, root
        )
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_healthy(self.server.process, self.port, self.server.stderr)
        except BaseException:
            self.server.kill()
            raise
        self.http = httpx.Client(base_url=self.base, timeout=30)

    def call(
        self, method: str, path: str, key: str | None, *, https: bool = True, **kwargs
    ) -> httpx.Response:
        headers = {**(HTTPS if https else {}), **({"Authorization": f"Bearer {key}"} if key else {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def status(self, key: str) -> int:
        """What a platform route says to this key: 404 (let in, no such route) or the refusal."""
        return self.call("GET", "/platform/x", key).status_code

    def stop(self) -> str:
        self.http.close()
        self.server.kill()
        return self.server.stderr.read_text()


@pytest.fixture
def sqlite_store(tmp_path) -> Iterator[tuple[KeyStore, str]]:
    url = f"sqlite:///{tmp_path}/keys.db"
    engine = migrate.engine(url)
    migrate.upgrade(engine)
    yield KeyStore(engine, KeyHasher(SECRET), environment=ENV), url
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path) -> Iterator[tuple[KeyStore, str]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/keys.db"
    else:
        url = request.getfixturevalue("postgres_server").create_database(f"keys_{uuid.uuid4().hex[:8]}")
    engine = migrate.engine(url)
    migrate.upgrade(engine)
    yield KeyStore(engine, KeyHasher(SECRET), environment=ENV), url
    engine.dispose()


def test_users_manage_their_own_keys_and_admins_anyones_over_https_only(aws, any_store, tmp_path):
    store, url = any_store
    admin = store.create("ops", "first admin", actor="test", scopes=[ADMIN_SCOPE]).key
    api = Api(aws, tmp_path / "api", url)
    shown: list[str] = [admin]
    answers: list[str] = []
    try:
        # an admin makes bob a key that may manage bob's keys and read MLflow, limited in rate and place
        made = api.call(
            "POST",
            KEYS,
            admin,
            json={
                "name": "bob's laptop",
                "user_id": "bob",
                "scopes": [MANAGE_SCOPE, "mlflow:read"],
                "rate_limit_per_hour": 100,
                "allowed_ips": ["127.0.0.0/8"],
                "expires_in_days": 30,
            },
        )
        assert made.status_code == 201, made.text
        assert made.headers["cache-control"] == "no-store"
        bob = made.json()
        shown.append(bob["key"])
        assert bob["user_id"] == "bob" and bob["key"].startswith("hk_test_")
        alice = api.call("POST", KEYS, admin, json={"name": "alice ci", "user_id": "alice"}).json()
        shown.append(alice["key"])

        # bob sees his keys only; another user's key is "not found", not "forbidden"
        listed = api.call("GET", KEYS, bob["key"])
        answers.append(listed.text)
        assert [k["id"] for k in listed.json()["keys"]] == [bob["id"]]
        assert api.call("GET", f"{KEYS}/{alice['id']}", bob["key"]).status_code == 404
        assert api.call("DELETE", f"{KEYS}/{alice['id']}", bob["key"]).status_code == 404
        assert api.call("GET", KEYS, bob["key"], params={"user_id": "alice"}).status_code == 403
        assert api.call("POST", KEYS, bob["key"], json={"name": "x", "user_id": "alice"}).status_code == 403

        # nothing bob makes is wider than his own key
        wider = [
            {"name": "admin", "scopes": [ADMIN_SCOPE]},
            {"name": "write", "scopes": ["mlflow:write"]},
            {"name": "faster", "rate_limit_per_hour": 1000},
            {"name": "anywhere", "allowed_ips": ["0.0.0.0/0"]},
            {"name": "longer", "expires_in_days": 365},
        ]
        for body in wider:
            refused = api.call("POST", KEYS, bob["key"], json=body)
            assert refused.status_code == 403, (body, refused.text)
        narrower = api.call("POST", KEYS, bob["key"], json={"name": "read only", "scopes": ["mlflow:read"]})
        assert narrower.status_code == 201, narrower.text
        child = narrower.json()
        shown.append(child["key"])
        assert child["user_id"] == "bob"
        assert (child["rate_limit_per_hour"], child["allowed_ips"]) == (100, ["127.0.0.0/8"])  # inherited
        assert child["expires_at"] <= bob["expires_at"]
        # a key without keys:manage manages nothing, not even itself
        assert api.call("GET", KEYS, child["key"]).status_code == 403

        # bad input names the field; unknown fields are refused
        bad = api.call("POST", KEYS, admin, json={"name": "", "user_id": "bob", "colour": "red"})
        assert bad.status_code == 422
        assert {e["field"] for e in bad.json()["detail"]} == {"name", "colour"}
        assert api.call("POST", KEYS, admin, content=b"{not json").status_code == 422
        forged_line = api.call("POST", KEYS, admin, json={"name": "ok\n2026 INFO forged", "user_id": "bob"})
        assert forged_line.status_code == 422 and forged_line.json()["detail"][0]["field"] == "name"
        assert api.call("POST", KEYS, admin, content=b"[" * 100_000).status_code == 413

        # rotate: a new key, the old one works for its grace; revoke: refused at once
        rotated = api.call("POST", f"{KEYS}/{child['id']}/rotate", bob["key"], json={"grace_hours": 1})
        assert rotated.status_code == 201, rotated.text
        shown.append(rotated.json()["key"])
        assert rotated.json()["rotated_from"] == child["id"]
        assert api.status(rotated.json()["key"]) == 404 and api.status(child["key"]) == 404
        revoked = api.call("DELETE", f"{KEYS}/{rotated.json()['id']}", bob["key"])
        assert revoked.status_code == 200 and revoked.json()["is_active"] is False
        answers.append(revoked.text)
        deadline = time.monotonic() + 5
        while api.status(rotated.json()["key"]) != 401 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.status(rotated.json()["key"]) == 401

        # plain HTTP (no X-Forwarded-Proto from the trusted proxy) is refused before anything else
        plain = api.call("GET", KEYS, admin, https=False)
        assert (plain.status_code, plain.json().get("code")) == (403, "https_required")

        # an admin sees everyone's; no answer after creation carries a key
        everyone = api.call("GET", KEYS, admin)
        answers.append(everyone.text)
        assert {k["user_id"] for k in everyone.json()["keys"]} == {"ops", "bob", "alice"}
        pages, offset = [], 0
        while offset is not None:  # pages of 2: every key once, newest first
            page = api.call("GET", KEYS, admin, params={"limit": 2, "offset": offset}).json()
            pages.extend(k["id"] for k in page["keys"])
            offset = page["next_offset"]
        assert pages == [k["id"] for k in everyone.json()["keys"]]
        assert api.call("GET", KEYS, admin, params={"limit": 5000}).status_code == 422
        answers.append(api.call("GET", f"{KEYS}/{bob['id']}", bob["key"]).text)
    finally:
        log = api.stop()
    for key in shown:
        assert key not in log
        assert not any(key in answer for answer in answers)
    actions = [row.action for row in store.audit_trail()]
    assert actions.count("created") == 4 and "rotated" in actions and "revoked" in actions
    assert any(row.actor.startswith("api:bob key:") for row in store.audit_trail())


@pytest.mark.parametrize("cache", ["memory", "redis"])
def test_a_key_revoked_or_rotated_away_on_one_instance_is_refused_by_another_within_a_second(
    aws, sqlite_store, tmp_path, request, cache
):
    store, url = sqlite_store
    shared = {names.ENV_REDIS_URL: request.getfixturevalue("redis_url")} if cache == "redis" else {}
    admin = store.create("ops", "admin", actor="test", scopes=[ADMIN_SCOPE]).key
    doomed = store.create("carol", "leaked", actor="test").key
    replaced = store.create("carol", "old", actor="test")
    unseen = store.create("carol", "cached, then revoked while no one asked", actor="test").key
    a = Api(aws, tmp_path / "a", url, **shared)
    b = Api(aws, tmp_path / "b", url, **shared, **{names.ENV_WORKERS: "2"})  # each worker follows on its own
    late = None
    try:
        assert a.status(unseen) == 404  # cached (in Redis: for every instance, 5 minutes)
        for _ in range(8):  # cached on both of B's workers (new connections spread over them) and on A
            for key in (doomed, replaced.key):
                fresh = httpx.get(f"{b.base}/platform/x", headers={**HTTPS, "X-API-Key": key}, timeout=30)
                assert fresh.status_code == 404
        doomed_id = store.lookup(doomed).id
        assert a.call("DELETE", f"{KEYS}/{doomed_id}", admin).status_code == 200
        revoked_at = time.monotonic()

        def every_worker_refuses() -> bool:  # new connections, so both of B's workers answer
            return all(
                httpx.get(
                    f"{b.base}/platform/x", headers={**HTTPS, "X-API-Key": doomed}, timeout=30
                ).status_code
                == 401
                for _ in range(8)
            )

        # Each worker follows the change feed on its own, so one may refuse a poll before the other:
        # the promise is that every one of them refuses within the second.
        while not every_worker_refuses():
            assert time.monotonic() - revoked_at < 1.0, (
                "a worker of instance B still lets the revoked key in after 1 s"
            )
            time.sleep(0.02)
        took = time.monotonic() - revoked_at

        rotated = a.call("POST", f"{KEYS}/{replaced.record.id}/rotate", admin, json={"grace_hours": 0})
        assert rotated.status_code == 201
        rotated_at = time.monotonic()
        while b.status(replaced.key) != 401:
            assert time.monotonic() - rotated_at < 1.0, (
                "instance B still lets the rotated-away key in after 1 s"
            )
            time.sleep(0.02)
        assert b.status(rotated.json()["key"]) == 404

        # an instance that starts after a revocation does not trust what the shared cache still says
        assert a.call("DELETE", f"{KEYS}/{store.lookup(unseen).id}", admin).status_code == 200
        late = Api(aws, tmp_path / "late", url, **shared)
        assert late.status(unseen) == 401
    finally:
        a.stop()
        b.stop()
        if late is not None:
            late.stop()
    print(f"refused on the other instance {took * 1000:.0f} ms after the revocation")


def test_usage_is_recorded_and_summarised_and_last_use_moves(aws, sqlite_store, tmp_path):
    store, url = sqlite_store
    user = store.create("dave", "ci", actor="test", scopes=[MANAGE_SCOPE]).key
    quiet = store.create("erin", "ci", actor="test").key
    api = Api(aws, tmp_path / "on", url)
    off = None
    try:
        for _ in range(7):
            assert api.status(user) == 404
        assert api.call("GET", "/health", None).status_code == 200  # no key: not usage
        key_id = store.lookup(user).id
        deadline = time.monotonic() + 10
        summary: dict = {}
        while time.monotonic() < deadline:
            summary = api.call("GET", f"{KEYS}/{key_id}/usage", user).json()
            if summary.get("requests", 0) >= 7:
                break
            time.sleep(0.2)
        assert summary["endpoints"][0] == {"endpoint": "GET /platform/x", "requests": 7}
        assert summary["statuses"]["404"] == 7
        assert summary["response_time_ms"]["p50"] >= 0
        assert store.get(key_id).last_used_at is not None
        health = api.call("GET", "/health", None).json()["api_keys"]
        assert health["revocations_followed"] is True
        assert health["usage"]["recorded"] >= 7 and health["usage"]["dropped"] == 0
        bad = api.call("GET", f"{KEYS}/{key_id}/usage", user, params={"period": "minute"})
        assert bad.status_code == 422 and "period" in bad.text

        # HOKUSAI_MTLS_KEY_USAGE=off: last use still kept, no rows
        off = Api(aws, tmp_path / "off", url, **{names.ENV_KEY_USAGE: "off"})
        assert off.status(quiet) == 404
        quiet_id = store.lookup(quiet).id
        deadline = time.monotonic() + 10
        while store.get(quiet_id).last_used_at is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.get(quiet_id).last_used_at is not None
        admin = store.create("ops", "admin", actor="test", scopes=[ADMIN_SCOPE]).key
        assert api.call("GET", f"{KEYS}/{quiet_id}/usage", admin).json()["requests"] == 0
    finally:
        api.stop()
        if off is not None:
            off.stop()


def test_our_service_answers_the_auth_services_validation_call(aws, sqlite_store, tmp_path):
    store, url = sqlite_store
    good = store.create("frank", "ci", actor="test", scopes=["mlflow:read"]).key
    staging = Api(aws, tmp_path / "staging", url)
    # The old client (AuthServiceClient) sends no X-Forwarded-Proto: deployed, it dials the service's
    # https URL through the ALB (the CDK refuses an http AUTH_SERVICE_URL outside development). Here it
    # dials the service directly, so that service runs in development, where plain HTTP is accepted.
    ours = Api(aws, tmp_path / "ours", url, **{names.ENV_ENVIRONMENT: "development"})
    client = None
    try:
        plain = staging.http.post("/api/v1/keys/validate", json={"api_key": good})
        assert (plain.status_code, plain.json()["code"]) == (400, "https_required")  # not 403: see key_api
        answer = staging.http.post("/api/v1/keys/validate", json={"api_key": good}, headers=HTTPS)
        assert answer.status_code == 200
        assert answer.json()["user_id"] == "frank" and answer.json()["scopes"] == ["mlflow:read"]
        unknown = staging.http.post("/api/v1/keys/validate", json={"api_key": "hk_test_nope"}, headers=HTTPS)
        assert unknown.status_code == 404
        assert (
            staging.http.post("/api/v1/keys/validate", json={"key": good}, headers=HTTPS).status_code == 422
        )

        # an API instance of the old kind (AUTH_SERVICE_URL, no store) lets our keys in through it
        client = Api(aws, tmp_path / "client", None, **{names.ENV_AUTH_SERVICE_URL: ours.base})
        assert client.status(good) == 404
        assert client.status("hk_test_" + "x" * 38) == 401
    finally:
        log = staging.stop() + ours.stop()
        if client is not None:
            log += client.stop()
    assert good not in log


def test_migration_mode_checks_our_keys_in_our_store_and_the_rest_with_the_old_service(
    aws, sqlite_store, auth_service, tmp_path
):
    store, url = sqlite_store
    ours = store.create("gina", "new", actor="test").key
    api = Api(aws, tmp_path / "both", url, **{names.ENV_AUTH_SERVICE_URL: auth_service.base_url})
    try:
        before = auth_service.calls
        assert api.status(ours) == 404  # ours: let in by our store
        assert api.status(key_format.generate(ENV)) == 401  # our format, not in our store: refused...
        assert auth_service.calls == before  # ...without asking the old service
        assert api.status(ACTIVE_KEY) == 404  # the old service's key: asked of it, let in
        assert auth_service.calls == before + 1
        assert api.status(INACTIVE_KEY) == 401

        # the old service's keys never manage ours, whatever scopes it gives them
        legacy = "legacy_admin_key_0123456789"
        auth_service.keys[legacy] = key_record("key-legacy", user_id="ops", scopes=[ADMIN_SCOPE])
        made = api.call(
            "POST", KEYS, legacy, json={"name": "x", "user_id": "victim", "scopes": [ADMIN_SCOPE]}
        )
        assert made.status_code == 403, made.text
        assert api.call("GET", KEYS, legacy).status_code == 403
        # and the validation call answers for our keys only: nothing is relayed to the old service
        calls = auth_service.calls
        relayed = api.http.post("/api/v1/keys/validate", json={"api_key": ACTIVE_KEY}, headers=HTTPS)
        assert relayed.status_code == 404 and auth_service.calls == calls
    finally:
        log = api.stop()
        auth_service.keys.pop("legacy_admin_key_0123456789", None)
    assert "migration mode" in log and ours not in log
