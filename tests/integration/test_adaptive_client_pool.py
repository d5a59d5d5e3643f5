"""The async adaptive client's pool (`runtime.clients.adaptive_client.ReusingPool`) against a real server.

Connections are counted where they arrive: the server records the peer address of every request.
Plain HTTP on loopback (security level INSECURE) keeps these about pooling; the mTLS path through
the same pool is tested in test_mlflow_proxy.py.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from runtime import names
from runtime.clients.adaptive_client import (
    DEFAULT_LIMITS,
    KEEPALIVE_EXPIRY,
    ReusingTransport,
    create_adaptive_client,
    create_adaptive_sync_client,
    pool_limits,
)
from runtime.serving.connection_limits import MLFLOW_LIMITS
from runtime.serving.server import Listener, Serving
from tests.support.servers import answer_lifespan, free_port, running

pytestmark = pytest.mark.integration

INSECURE = {names.ENV_SECURITY_LEVEL: "INSECURE"}


class Recorder:
    """Answers every request; `/hold` waits until `release` is set; `/close` ends its connection."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.release = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        self.peers.append(tuple(scope["client"]))
        if scope["path"] == "/hold":
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        headers = [(b"content-length", b"2")]
        if scope["path"] == "/close":
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def server():
    import threading

    app = Recorder()
    app.release = threading.Event()
    port = free_port()
    with running(Serving([Listener("plain", "127.0.0.1", port, app)])):
        app.url = f"http://127.0.0.1:{port}"
        yield app
    app.release.set()


def run(coroutine):
    return asyncio.run(coroutine)


def test_every_pooled_connection_is_kept_alive_and_expires_before_mlflow_closes_it():
    for limits in (DEFAULT_LIMITS, pool_limits(4096)):
        assert limits.max_keepalive_connections == limits.max_connections
        assert limits.keepalive_expiry == KEEPALIVE_EXPIRY < MLFLOW_LIMITS.keepalive_timeout
    for bad in (0, -1, True, 2.5, None):
        with pytest.raises(ValueError, match="max_connections must be a whole number"):
            pool_limits(bad)


def test_max_connections_sizes_the_pool_and_cannot_be_combined_with_limits():
    client = create_adaptive_client(environ=INSECURE, max_connections=7)
    assert isinstance(client._transport, ReusingTransport)
    assert client._transport.pool._max_connections == 7
    assert client._transport.pool._max_keepalive == 7
    run(client.aclose())
    with pytest.raises(ValueError, match="max_connections or limits"):
        create_adaptive_client(environ=INSECURE, max_connections=7, limits=DEFAULT_LIMITS)
    with create_adaptive_sync_client(environ=INSECURE, max_connections=3) as sync:
        assert sync._transport._pool._max_keepalive_connections == 3


def test_sequential_requests_share_one_connection(server):
    async def go():
        async with create_adaptive_client(environ=INSECURE, base_url=server.url) as client:
            for _ in range(20):
                assert (await client.get("/x")).status_code == 200

    run(go())
    assert len(server.peers) == 20 and len(set(server.peers)) == 1


def test_a_full_pool_makes_a_request_wait_at_most_the_pool_timeout(server):
    timeout = httpx.Timeout(10.0, pool=0.3)

    async def go():
        async with create_adaptive_client(
            environ=INSECURE, base_url=server.url, max_connections=1, timeout=timeout
        ) as client:
            held = asyncio.create_task(client.get("/hold"))
            while not server.peers:
                await asyncio.sleep(0.01)
            with pytest.raises(httpx.PoolTimeout):  # raised only when the pool timeout ran out
                await client.get("/x")
            waiting = asyncio.create_task(client.get("/x", timeout=httpx.Timeout(10.0)))
            await asyncio.sleep(0.1)
            assert not waiting.done()  # still waiting for the one connection
            server.release.set()
            assert (await held).status_code == 200
            assert (await waiting).status_code == 200  # got it when the first response closed

    run(go())
    assert len(set(server.peers)) == 1


def test_idle_connections_expire_and_surplus_ones_are_closed(server):
    async def go():
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=2, keepalive_expiry=0.2)
        async with create_adaptive_client(environ=INSECURE, base_url=server.url, limits=limits) as client:
            pool = client._transport.pool
            server.release.set()
            await asyncio.gather(*(client.get("/hold") for _ in range(5)))
            assert (pool.open_connections, pool.idle_connections) == (2, 2)  # 3 closed: only 2 kept idle
            await asyncio.sleep(0.4)
            assert (await client.get("/x")).status_code == 200
            assert (pool.open_connections, pool.idle_connections) == (1, 1)  # the expired two were closed

    run(go())
    first_five, last = set(server.peers[:5]), server.peers[5]
    assert last not in first_five


def test_a_connection_the_server_closed_is_not_reused(server):
    async def go():
        async with create_adaptive_client(environ=INSECURE, base_url=server.url) as client:
            assert (await client.get("/close")).status_code == 200
            await asyncio.sleep(0.1)
            assert (await client.get("/x")).status_code == 200
            assert client._transport.pool.open_connections == 1

    run(go())
    assert len(set(server.peers)) == 2


def test_a_cancelled_request_gives_its_slot_back(server):
    async def go():
        async with create_adaptive_client(environ=INSECURE, base_url=server.url, max_connections=1) as client:
            held = asyncio.create_task(client.get("/hold"))
            while not server.peers:
                await asyncio.sleep(0.01)
            held.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held
            assert client._transport.pool.open_connections == 0
            server.release.set()
            assert (await client.get("/x", timeout=httpx.Timeout(5.0))).status_code == 200

    run(go())


def test_a_refused_connection_frees_its_slot():
    async def go():
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        async with create_adaptive_client(environ=INSECURE, base_url=url, max_connections=1) as client:
            for _ in range(3):
                with pytest.raises(httpx.ConnectError):
                    await client.get("/x")
            assert client._transport.pool.open_connections == 0

    run(go())
