"""Manage API keys through the key service's REST API with httpx: list, create, read the rate-limit
headers, ask the validation call, rotate, revoke, and watch the revoked key be refused.

    HOKUSAI_API_URL=https://api.example.com HOKUSAI_API_KEY=hk_live_... python docs/examples/python_client.py

- HOKUSAI_API_URL: the API service's base URL. In staging and production that is the ALB's
  `https://` address: the key API (`/api/v1/auth/keys`) refuses plain HTTP there with 403
  `https_required`, and believes `X-Forwarded-Proto: https` only from the trusted proxy (the ALB),
  never from a client. This example never sends that header. Locally (`make local`) and in
  `tests/integration/test_key_examples.py` the API runs with ENVIRONMENT=development, the one
  environment whose key API also answers plain HTTP, so `http://127.0.0.1:PORT` works there and
  what the example sends is exactly what a client sends to the ALB.
- HOKUSAI_API_KEY: a key with the `keys:manage` scope (your own keys) or `keys:admin` (anyone's).
  It is sent as `Authorization: Bearer`, the preferred way (docs/AUTHENTICATION.md).

The key it creates is a throwaway (`python example`, one day), rotated with no grace and then
revoked: it leaves two inactive keys behind. A new key appears in exactly one answer; the example
prints only its display prefix, as every log line should (docs/API_KEY_SECURITY.md).
Exit 0 when every step did what it says, 1 (with the status, the answer and its X-Request-ID) when not.
"""

# ruff: noqa: T201 - an example prints what it does

from __future__ import annotations

import datetime as dt
import os
import sys
import time

import httpx

KEYS = "/api/v1/auth/keys"
VALIDATE = "/api/v1/keys/validate"
NAME = "python example"
RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class Refused(Exception):
    """The service answered something other than what the step expects."""


def checked(response: httpx.Response, expected: int) -> dict:
    """The answer's JSON, or `Refused` naming the status, the detail and the request id."""
    if response.status_code != expected:
        hint = ""
        if response.status_code == 429:
            hint = f" (retry after {response.headers.get('Retry-After')} s)"
        raise Refused(
            f"{response.request.method} {response.request.url.path}: HTTP {response.status_code}{hint}: "
            f"{response.text[:300]} (X-Request-ID {response.headers.get('X-Request-ID')})"
        )
    return response.json()


def show_rate_limit(response: httpx.Response) -> None:
    limit, remaining, reset = (response.headers.get(name) for name in RATE_LIMIT_HEADERS)
    if limit is None:
        print("   no rate-limit headers: the calling key has no rate limit")
        return
    resets = dt.datetime.fromtimestamp(int(reset), dt.UTC).isoformat(timespec="seconds")
    print(f"   X-RateLimit-Limit: {limit} (requests per hour for the calling key)")
    print(f"   X-RateLimit-Remaining: {remaining}")
    print(f"   X-RateLimit-Reset: {reset} ({resets}: when the oldest counted request leaves the hour)")


def validate(base_url: str, key: str) -> dict:
    """What the validation call (the one other services make) says about `key`; no caller key needed."""
    answer = httpx.post(f"{base_url}{VALIDATE}", json={"api_key": key}, timeout=10)
    if answer.status_code == 404:
        return {"is_active": False, "unknown": True}
    return checked(answer, 200)


def wait_refused(base_url: str, key: str, seconds: float = 5) -> float:
    """Seconds until the validation call says `key` is no longer active (cached answers go stale within
    about a second on every instance); `Refused` after `seconds`."""
    started = time.monotonic()
    while validate(base_url, key)["is_active"]:
        if time.monotonic() - started > seconds:
            raise Refused(f"the key is still active after {seconds:g} s")
        time.sleep(0.1)
    return time.monotonic() - started


def run(base_url: str, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10) as api:
        listed = api.get(KEYS, params={"limit": 20})
        page = checked(listed, 200)
        more = f"; more from ?offset={page['next_offset']}" if page["next_offset"] is not None else ""
        print(f"1. GET {KEYS}?limit=20: {len(page['keys'])} key(s) visible to the calling key{more}")
        for key in page["keys"]:
            state = "active" if key["is_active"] else "inactive"
            print(f"   {key['id']}  {key['key_prefix']}...  {key['user_id']}  {key['name']!r}  {state}")
        show_rate_limit(listed)

        created = checked(api.post(KEYS, json={"name": NAME, "expires_in_days": 1}), 201)
        print(
            f"2. POST {KEYS}: created {created['id']} ({created['key_prefix']}...) for {created['user_id']}, "
            f"scopes {created['scopes']}, rate limit {created['rate_limit_per_hour']}, "
            f"expires {created['expires_at']}"
        )
        print("   the key itself is in this answer only: store it in a secret manager now")

        known = validate(base_url, created["key"])
        print(f"3. POST {VALIDATE}: the new key is known, is_active={known['is_active']}")

        rotated = checked(api.post(f"{KEYS}/{created['id']}/rotate", json={"grace_hours": 0}), 201)
        print(
            f"4. POST {KEYS}/{created['id']}/rotate (grace_hours 0): new key {rotated['id']} "
            f"({rotated['key_prefix']}...), same scopes, limits and expiry; the old key stops working now "
            "(the default grace, 24 hours, leaves time to deploy the new key)"
        )
        print(f"   old key refused after {wait_refused(base_url, created['key']):.1f} s")
        print(f"   new key known, is_active={validate(base_url, rotated['key'])['is_active']}")

        revoked = checked(api.delete(f"{KEYS}/{rotated['id']}"), 200)
        print(
            f"5. DELETE {KEYS}/{rotated['id']}: is_active={revoked['is_active']}, revoked_at {revoked['revoked_at']}"
        )
        print(
            f"   revoked key refused after {wait_refused(base_url, rotated['key']):.1f} s (every instance: about 1 s)"
        )


def main() -> int:
    try:
        base_url = os.environ["HOKUSAI_API_URL"].rstrip("/")
        api_key = os.environ["HOKUSAI_API_KEY"]
    except KeyError as missing:
        print(f"set {missing.args[0]} (see the top of {__file__})", file=sys.stderr)
        return 2
    try:
        run(base_url, api_key)
    except (Refused, httpx.HTTPError) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
