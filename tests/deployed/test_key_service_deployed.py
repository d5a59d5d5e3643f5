"""Our key service as deployed: the API on its key store (PostgreSQL `api_keys` on `db`), in migration
mode beside the auth double, behind the ALB stand-in, attacked from the `attacker` host.

Every call is exact bytes from the attacker's namespace (`tests.support.hostile.raw_exchange`): to
the ALB over HTTPS, as an ordinary internet client does, or straight to the API task's plain port,
which nothing stops a host inside the VPC from dialing in this harness (no security group here, as
`test_attacks.to_api` says; `test_the_attacker_reaches_the_api_port_itself` checks it, so a refusal
below is the API's, never a closed port). The attacker is not a trusted proxy (.50 is outside
`trustedProxyCidrs` .16/28), so whatever it writes in `X-Forwarded-Proto` or `X-Forwarded-For` counts
for nothing; through the ALB, the ALB appends the real peer and sets the scheme itself.

- an admin (`deployed.admin_key`) makes a user's key through the ALB; the user lists it and reaches
  MLflow with it, validated by our store (the double is not asked);
- key management sent straight to the API's port with forged forwarding headers: 403 https_required;
- allowlists follow the real address: through the ALB (XFF forged or not) and straight to the port;
- a revoked key is refused by MLflow-through-the-API within 1 s;
- POST /api/v1/keys/validate through the ALB answers for our key and 404 for an unknown one;
- no key made here (nor the hashing secret) is in any service's log.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from runtime import names
from runtime.keys import key_format
from runtime.keys.permissions import MANAGE_SCOPE
from tests.support.deployed import ALB_NAME, ENV
from tests.support.hostile import Answer, raw_exchange

pytestmark = [pytest.mark.deployed, pytest.mark.slow]

KEYS = "/api/v1/auth/keys"
VALIDATE = "/api/v1/keys/validate"
SEARCH = "/mlflow/api/2.0/mlflow/experiments/search?max_results=5"
REVOCATION_BOUND = 1.0
"""The product's promise (runtime.auth.key_changes): a revoked key is refused everywhere within 1 s."""

_made: list[str] = []
"""Every key this module was shown: `test_no_key_made_here_is_in_any_service_log` looks for them all."""


# --- talking to the deployment -------------------------------------------------------------------
def http(
    method: str,
    target: str,
    *headers: str,
    key: str | None = None,
    body: dict | None = None,
    request_id: str | None = None,
) -> bytes:
    """One HTTP/1.1 request, byte for byte (the key as a Bearer token, the body as JSON)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {ALB_NAME}", *headers]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if request_id is not None:
        lines.append(f"X-Request-ID: {request_id}")
    data = json.dumps(body).encode() if body is not None else b""
    if body is not None or method in ("POST", "PUT", "DELETE"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + data


def via_alb(deployed, request: bytes, *, role: str = "attacker") -> Answer:
    """Through the ALB stand-in (HTTPS on 443, its own CA), as an internet client."""
    return _decoded(
        raw_exchange(
            deployed[role],
            deployed.address("alb"),
            443,
            request,
            tls_ca=deployed.alb.certificate.ca_file,
            server_name=ALB_NAME,
        )
    )


def direct(deployed, request: bytes, *, role: str = "attacker") -> Answer:
    """Straight to the API task's plain port, bypassing the ALB."""
    return _decoded(raw_exchange(deployed[role], deployed.address("api"), names.API_PORT, request))


def _decoded(answer: Answer) -> Answer:
    """The body without chunked framing (MLflow's answers come through the proxy in chunks)."""
    if b"transfer-encoding: chunked" not in answer.head.lower():
        return answer
    body, rest = b"", answer.body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    return Answer(answer.status, answer.head, body)


def document(answer: Answer) -> dict:
    try:
        return json.loads(answer.body)
    except ValueError:
        raise AssertionError(f"{answer.status}: not JSON: {answer.body[:300]!r}") from None


def header(answer: Answer, name: str) -> str | None:
    for line in answer.head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name.lower().encode():
            return value.strip().decode("latin-1")
    return None


def create_key(deployed, caller: str, **body) -> dict:
    """POST /api/v1/auth/keys through the ALB with `caller`'s key: the new key's document (201)."""
    answer = via_alb(deployed, http("POST", KEYS, key=caller, body=body))
    assert answer.status == 201, (answer.status, answer.body[:400])
    made = document(answer)
    _made.append(made["key"])
    return made


def user_id() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def audit_outcome(deployed, request_id: str, seconds: float = 10) -> dict:
    """The API's audit line of one request (written after its response)."""
    deadline = time.monotonic() + seconds
    while True:
        for line in deployed.api_log.read_text(errors="replace").splitlines():
            start = line.find('{"event":"auth"')
            if start >= 0 and f'"request_id":"{request_id}"' in line:
                return json.loads(line[start:])
        assert time.monotonic() < deadline, f"no audit line for {request_id} in {deployed.api_log.name}"
        time.sleep(0.1)


def service_logs(deployed) -> dict[str, str]:
    """What CloudWatch would hold: every service's output, and PostgreSQL's own log."""
    logs = {name: deployed.log(name).read_text(errors="replace") for name in deployed.processes}
    logs["postgresql"] = deployed.postgres.log.read_text(errors="replace")
    return logs


def assert_in_no_log(deployed, keys: list[str]) -> None:
    time.sleep(0.3)  # the last requests' lines are written after their responses
    for name, text in service_logs(deployed).items():
        for key in keys:
            secret_part = key[len(key_format.TEST_PREFIX) :]
            assert key not in text and secret_part not in text, f"{name}'s log holds a key ({key[:12]}...)"


# --- the tests -----------------------------------------------------------------------------------
def test_an_admin_makes_a_user_key_through_the_alb_and_the_user_reaches_mlflow_with_it(deployed):
    user = user_id()
    made = create_key(
        deployed,
        deployed.admin_key,
        name="laptop",
        user_id=user,
        scopes=[MANAGE_SCOPE, "mlflow:read"],
        expires_in_days=1,
    )
    assert made["user_id"] == user and made["key"].startswith(key_format.prefix_for(ENV))
    assert key_format.is_ours(made["key"]) and made["is_active"] is True
    assert deployed.store.lookup(made["key"]).id == uuid.UUID(made["id"])  # in OUR store

    listed = via_alb(deployed, http("GET", KEYS, key=made["key"]))
    assert listed.status == 200, listed.body[:300]
    assert header(listed, "cache-control") == "no-store"
    assert [k["id"] for k in document(listed)["keys"]] == [made["id"]]
    assert made["key"] not in listed.text  # shown once, at creation

    asked = deployed.auth_service.calls
    request_id = f"our-key-{time.time_ns()}"
    search = via_alb(deployed, http("GET", SEARCH, key=made["key"], request_id=request_id))
    assert search.status == 200, search.body[:300]
    assert "Default" in [e["name"] for e in document(search)["experiments"]]
    assert deployed.auth_service.calls == asked, "our key was asked of the old auth service"
    audit = audit_outcome(deployed, request_id)
    assert (audit["auth_path"], audit["outcome"], audit["status"]) == ("api_key", "success", 200)

    # the double's key still goes to the double (migration mode), through the same ALB and API
    old = via_alb(deployed, http("GET", SEARCH, key=deployed.active_key))
    assert old.status == 200, old.body[:300]
    assert_in_no_log(deployed, [made["key"], deployed.admin_key])


def test_the_attacker_reaches_the_api_port_itself(deployed):
    """No security group in this harness: the attacker's host dials the API task's port directly, so the
    refusals below are the API's own."""
    answer = direct(deployed, http("GET", "/health"))
    assert answer.status == 200, answer.head


FORGED_HTTPS = [
    ("X-Forwarded-Proto: https",),
    ("X-Forwarded-Proto: https", "X-Forwarded-For: {alb}", "X-Forwarded-Port: 443"),
    ("X-Forwarded-Proto: http, https", "X-Forwarded-For: 203.0.113.9, {alb}"),
    ("X-Forwarded-Proto: https", "Forwarded: for={alb};proto=https", "X-Forwarded-Ssl: on"),
]


@pytest.mark.parametrize("forged", FORGED_HTTPS, ids=["proto", "proto-for-alb", "proto-list", "rfc7239"])
def test_key_management_straight_to_the_api_port_is_refused_whatever_it_claims(deployed, forged):
    headers = [h.format(alb=deployed.address("alb")) for h in forged]
    user = user_id()
    body = {"name": "minted behind the ALB's back", "user_id": user, "scopes": [MANAGE_SCOPE]}
    for request in (
        http("POST", KEYS, *headers, key=deployed.admin_key, body=body),
        http("GET", KEYS, *headers, key=deployed.admin_key),
        http("GET", f"{KEYS}?user_id={deployed.address('attacker')}", *headers, key=deployed.admin_key),
    ):
        answer = direct(deployed, request)
        assert answer.status == 403, (answer.status, answer.body[:300])
        assert document(answer).get("code") == "https_required", answer.body[:300]
        assert b"hk_test_" not in answer.body
    assert deployed.store.list_keys(owner=user) == []  # nothing was made
    # the validation call, likewise: 400 https_required (not 403, see runtime.services.key_api)
    refused = direct(deployed, http("POST", VALIDATE, *headers, body={"api_key": deployed.admin_key}))
    assert (refused.status, document(refused).get("code")) == (400, "https_required")
    # the same admin call through the ALB is served: the refusal is about the route, not the key
    assert via_alb(deployed, http("GET", f"{KEYS}?user_id={user}", key=deployed.admin_key)).status == 200
    assert_in_no_log(deployed, [deployed.admin_key])


def test_an_allowlist_follows_the_real_address_through_the_alb_and_straight_to_the_port(deployed):
    attacker, elsewhere, alb = (deployed.address(r) for r in ("attacker", "worker", "alb"))
    user = user_id()
    here = create_key(deployed, deployed.admin_key, name="here", user_id=user, allowed_ips=[attacker])
    there = create_key(deployed, deployed.admin_key, name="there", user_id=user, allowed_ips=[elsewhere])
    assert here["allowed_ips"] == [f"{attacker}/32"] and there["allowed_ips"] == [f"{elsewhere}/32"]
    forgeries = [
        (),
        (f"X-Forwarded-For: {elsewhere}",),
        (f"X-Forwarded-For: {elsewhere}, {alb}",),  # as if the ALB had already seen `elsewhere`
        (f"X-Forwarded-For: {elsewhere}", f"X-Forwarded-For: {alb}"),
        (f"X-Real-IP: {elsewhere}", f"Forwarded: for={elsewhere}"),
    ]
    for route, send in (("alb", via_alb), ("direct", direct)):
        for forged in forgeries:
            label = f"{route} {forged}"
            # allowed from the attacker's own address: served, whatever the attacker adds
            allowed = send(deployed, http("GET", SEARCH, *forged, key=here["key"]))
            assert allowed.status == 200, (label, allowed.status, allowed.body[:300])
            # bound to another host: refused, however the attacker claims to be that host
            request_id = f"elsewhere-{route}-{time.time_ns()}"
            refused = send(deployed, http("GET", SEARCH, *forged, key=there["key"], request_id=request_id))
            assert refused.status == 403, (label, refused.status, refused.body[:300])
            audit = audit_outcome(deployed, request_id)
            assert (audit["outcome"], audit["status"]) == ("address_not_allowed", 403), (label, audit)
    assert_in_no_log(deployed, [here["key"], there["key"]])


def test_a_key_revoked_through_the_alb_is_refused_by_mlflow_through_the_api_within_a_second(deployed):
    user = user_id()
    manager = create_key(deployed, deployed.admin_key, name="manager", user_id=user, scopes=[MANAGE_SCOPE])
    doomed = create_key(deployed, manager["key"], name="ci runner")  # the user makes it, as themselves
    assert doomed["user_id"] == user
    for _ in range(3):  # answered, and cached by the API
        assert via_alb(deployed, http("GET", SEARCH, key=doomed["key"])).status == 200

    revoked = via_alb(deployed, http("DELETE", f"{KEYS}/{doomed['id']}", key=manager["key"]))
    revoked_at = time.monotonic()
    assert revoked.status == 200, revoked.body[:300]
    assert document(revoked)["is_active"] is False and document(revoked)["revoked_at"]
    statuses = []
    while True:
        answer = via_alb(deployed, http("GET", SEARCH, key=doomed["key"]))
        took = time.monotonic() - revoked_at
        statuses.append(answer.status)
        if answer.status == 401:
            break
        assert answer.status == 200, (answer.status, answer.body[:300])
        assert took < REVOCATION_BOUND, f"still served {took:.2f} s after its revocation: {statuses}"
        time.sleep(0.02)
    assert took < REVOCATION_BOUND, f"refused only {took:.2f} s after its revocation"
    print(f"revoked key refused {took * 1000:.0f} ms after the revocation ({len(statuses)} tries)")
    assert via_alb(deployed, http("GET", SEARCH, key=manager["key"])).status == 200  # only that key
    listed = document(via_alb(deployed, http("GET", KEYS, key=manager["key"])))["keys"]
    assert {k["id"]: k["is_active"] for k in listed} == {manager["id"]: True, doomed["id"]: False}
    assert_in_no_log(deployed, [manager["key"], doomed["key"]])


def test_the_validation_call_through_the_alb_answers_for_our_key_and_404_for_an_unknown_one(deployed):
    user = user_id()
    made = create_key(deployed, deployed.admin_key, name="validated", user_id=user, scopes=["mlflow:read"])
    asked = deployed.auth_service.calls
    known = via_alb(deployed, http("POST", VALIDATE, body={"api_key": made["key"]}))
    assert known.status == 200, known.body[:300]
    answer = document(known)
    assert (answer["user_id"], answer["key_id"], answer["scopes"]) == (user, made["id"], ["mlflow:read"])
    assert answer["is_active"] is True and made["key"] not in known.text

    unknown = key_format.generate(ENV)  # well-formed, checksum and all, in no store
    _made.append(unknown)
    missing = via_alb(deployed, http("POST", VALIDATE, body={"api_key": unknown}))
    assert missing.status == 404, missing.body[:300]
    assert deployed.auth_service.calls == asked, "a key in our format was asked of the old auth service"
    malformed = via_alb(deployed, http("POST", VALIDATE, body={"key": made["key"]}))
    assert malformed.status == 422
    assert_in_no_log(deployed, [made["key"], unknown])


def test_no_key_made_here_is_in_any_service_log(deployed):
    """Last in this module: every key it was shown, the admin's and the hashing secret, in no log."""
    assert_in_no_log(deployed, [*_made, deployed.admin_key])
    for name, text in service_logs(deployed).items():
        assert deployed.key_hash_secret not in text, f"{name}'s log holds the key-hashing secret"
