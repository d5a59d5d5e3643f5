"""One bounded Redis pool per process, shared by the key cache and the rate limiter, closed at exit.

The API service as `serve-api` builds it (`runtime.services.api_service.ApiService`, certificates from
moto's Secrets Manager), serving on the loopback in this process, in front of a real
redis-server (tests/conftest.py) or a Redis that accepts and never answers; 50 clients at once
on the API-key path. Redis itself says how many connections the service opened and holds.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis

from local_stack.auth_service import ACTIVE_KEY
from runtime import names
from runtime.services.api_service import ApiService
from tests.integration.conftest import server_environment
from tests.support.servers import free_port, running

pytestmark = pytest.mark.integration

CLIENTS = 50
ROUNDS = 4
BOUND = 8
"""HOKUSAI_MTLS_REDIS_MAX_CONNECTIONS here: far fewer than the clients."""


def api_service(aws, auth_service, tmp_path, monkeypatch, redis_url: str) -> ApiService:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", aws["endpoint"])  # boto3 reads it from here
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(tmp_path / "certs"),
            names.ENV_AUTH_SERVICE_URL: auth_service.base_url,
            names.ENV_REDIS_URL: redis_url,
            names.ENV_REDIS_MAX_CONNECTIONS: str(BOUND),
            "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{free_port()}",  # not called here
        },
    )
    return ApiService(env)


@contextmanager
def serving(service: ApiService) -> Iterator[str]:
    port = free_port()
    with running(service.serving("127.0.0.1", port)):
        yield f"http://127.0.0.1:{port}"


def burst(base: str) -> list[httpx.Response]:
    """CLIENTS clients, each on its own connection, ROUNDS authenticated requests each, all at once."""

    async def client(start: asyncio.Event) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            await start.wait()
            return [await http.get("/platform/x", headers={"X-API-Key": ACTIVE_KEY}) for _ in range(ROUNDS)]

    async def main() -> list[httpx.Response]:
        start = asyncio.Event()
        clients = [asyncio.create_task(client(start)) for _ in range(CLIENTS)]
        await asyncio.sleep(0.1)
        start.set()
        return [response for answers in await asyncio.gather(*clients) for response in answers]

    return asyncio.run(main())


class RedisView:
    """What redis-server sees of everyone but this observer."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.me = self.client.client_id()
        self.received_before = self.received()

    def received(self) -> int:
        return int(self.client.info("stats")["total_connections_received"])

    def opened(self) -> int:
        """Connections accepted since this view was made (this observer's one came before)."""
        return self.received() - self.received_before

    def held(self) -> list[dict]:
        return [c for c in self.client.client_list() if int(c["id"]) != self.me]


def test_fifty_clients_share_one_bounded_pool_closed_at_shutdown(
    aws, auth_service, redis_url, tmp_path, monkeypatch
):
    view = RedisView(redis_url)
    service = api_service(aws, auth_service, tmp_path, monkeypatch, redis_url)
    with serving(service) as base:
        answers = burst(base)
        held = view.held()
        opened = view.opened()
    assert len(answers) == CLIENTS * ROUNDS
    # authenticated (the app has no such route) and rate-limited by Redis, not let through unlimited
    assert {a.status_code for a in answers} == {404}
    assert {a.headers.get("x-ratelimit-limit") for a in answers} == {"1000"}
    assert sorted(int(a.headers["x-ratelimit-remaining"]) for a in answers) == list(
        range(1000 - CLIENTS * ROUNDS, 1000)
    )
    # the cache and the limiter together: at most the bound, opened once and kept
    assert 0 < len(held) <= BOUND, [c.get("name") for c in held]
    assert opened <= BOUND
    assert view.held() == []  # closed when the service stopped, not when the process exits
    view.client.close()


@contextmanager
def black_hole() -> Iterator[dict]:
    """A "Redis" that accepts connections and never answers (a hung or overloaded server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    state = {"url": f"redis://127.0.0.1:{listener.getsockname()[1]}/0", "accepted": []}
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                state["accepted"].append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        done.set()
        thread.join(5)
        for connection in state["accepted"]:
            connection.close()
        listener.close()


def test_a_redis_that_never_answers_holds_at_most_the_bound_and_requests_go_through(
    aws, auth_service, tmp_path, monkeypatch
):
    with black_hole() as hole:
        service = api_service(aws, auth_service, tmp_path, monkeypatch, hole["url"])
        with serving(service) as base:
            answers = burst(base)
        dialled = len(hole["accepted"])
    # every request answered: cache misses went to the auth service, the rate limit failed open
    assert len(answers) == CLIENTS * ROUNDS
    assert {a.status_code for a in answers} == {404}
    assert all("x-ratelimit-limit" not in a.headers for a in answers)
    # each of the pool's connections timed out, was dropped and dialled once more for the one retry;
    # everyone else waited for the pool, gave up, and the breaker then skipped Redis for the burst
    assert 0 < dialled <= 2 * BOUND
