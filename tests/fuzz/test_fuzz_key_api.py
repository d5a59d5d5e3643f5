"""The key API under hostile input: any body, query or path gets an answer with a status that names
what is wrong (4xx) or the work done, never a 500 and never a traceback; nothing it refuses is written.

The routes run in-process over a real SQLite store (`runtime.keys`), behind a stand-in for the
middleware that says an admin called over HTTPS (the middleware itself is fuzzed with the rest of the
request path elsewhere); the validation call runs through the real validator.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.testclient import TestClient

from runtime import names
from runtime.auth.api_keys import ApiKeyValidator
from runtime.auth.client_address import AddressPolicy
from runtime.auth.key_cache import MemoryKeyCache
from runtime.auth.key_store_backend import KeyStoreBackend
from runtime.keys import migrate
from runtime.keys.hashing import KeyHasher
from runtime.keys.permissions import ADMIN_SCOPE
from runtime.keys.store import KeyStore
from runtime.services.key_api import KEYS_PATH, KeyApi

ANSWERS = {200, 201, 403, 404, 405, 413, 422}


def as_admin(app):
    async def called_by_admin(scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "scheme": "https", "state": {"user_id": "ops", "scopes": [ADMIN_SCOPE]}}
        await app(scope, receive, send)

    return called_by_admin


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[tuple[TestClient, KeyStore]]:
    path = tmp_path_factory.mktemp("keys") / "keys.db"
    engine = migrate.engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    store = KeyStore(engine, KeyHasher(b"f" * 32), environment="staging")
    backend = KeyStoreBackend(store)
    api = KeyApi(
        store,
        ApiKeyValidator(backend, MemoryKeyCache()),
        addresses=AddressPolicy.from_environ({names.ENV_INTERNAL_CIDRS: "10.0.0.0/8"}),
        require_https=True,
    )
    app = Starlette(routes=[api.validation_route(), *api.routes()])
    with TestClient(as_admin(app), raise_server_exceptions=True) as test_client:
        yield test_client, store
    engine.dispose()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["", "10.0.0.0/8", "::/0", "keys:admin", "2026-01-01T00:00:00Z", "\n", "\u202e"]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "name",
        "user_id",
        "scopes",
        "expires_in_days",
        "rate_limit_per_hour",
        "allowed_ips",
        "grace_hours",
        "api_key",
    ]
)
bodies = (
    st.dictionaries(field_names | st.text(max_size=10), json_values, max_size=7).map(
        lambda d: json.dumps(d).encode()
    )
    | st.binary(max_size=200)
    | st.just(b"[" * 5000)
)
query_values = st.text(alphabet=string.printable + "²٣\u202e\x00", max_size=30) | st.sampled_from(
    [
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "99999999999999999999",
        "-1",
        "1e3",
        "hour",
        "²",
        "٣",
    ]
)
key_ids = st.uuids().map(str) | st.text(
    alphabet=string.ascii_letters + string.digits + "-%.", min_size=1, max_size=40
)


def check(response) -> None:
    assert response.status_code in ANSWERS, (response.status_code, response.text[:300])
    response.json()  # always a JSON document


@given(body=bodies)
def test_create_refuses_or_makes_a_key_whatever_the_body(client, body):
    test_client, store = client
    before = len(store.list_keys())
    response = test_client.post(KEYS_PATH, content=body)
    check(response)
    made = len(store.list_keys()) - before
    assert made == (1 if response.status_code == 201 else 0)


@given(
    params=st.dictionaries(
        st.sampled_from(["limit", "offset", "user_id"]) | st.text(max_size=8), query_values
    )
)
def test_listing_answers_any_query(client, params):
    check(client[0].get(KEYS_PATH, params=params))


@given(key_id=key_ids, body=bodies, method=st.sampled_from(["GET", "DELETE", "POST"]))
def test_one_keys_routes_answer_any_id_and_body(client, key_id, body, method):
    test_client, _ = client
    path = f"{KEYS_PATH}/{key_id}" + ("/rotate" if method == "POST" else "")
    check(test_client.request(method, path, content=body if method == "POST" else None))


@given(params=st.dictionaries(st.sampled_from(["since", "until", "period"]), query_values))
def test_the_usage_summary_answers_any_window(client, params):
    test_client, store = client
    key = store.list_keys(limit=1) or [store.create("fuzz", "usage", actor="fuzz").record]
    check(test_client.get(f"{KEYS_PATH}/{key[0].id}/usage", params=params))


@given(body=bodies)
def test_the_validation_call_answers_any_body(client, body):
    response = client[0].post("/api/v1/keys/validate", content=body)
    check(response)
    assert response.status_code != 200  # no key in the store was given
