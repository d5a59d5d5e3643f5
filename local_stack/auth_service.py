"""A TEST DOUBLE of the external auth service: a fake for a remote service we do not own.

It implements the contract `runtime.auth.api_keys` documents (POST /api/v1/keys/validate) over a
dict of keys, and lets a test count calls, slow it down, take it down or script a raw answer: for
tests and benchmarks of the external service (`AUTH_SERVICE_URL`), down or slow included. `make
local` does not run it (it checks keys against our key store). Only Starlette and uvicorn are
needed, so it can also run on its own:

    python -m local_stack.auth_service --port 8081     # serves EXAMPLE_KEYS until Ctrl-C

>>> service = FakeAuthService()
>>> with service.serving() as base_url:
...     ...  # AuthServiceClient(base_url)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

VALIDATE_PATH = "/api/v1/keys/validate"

ACTIVE_KEY = "hk_test_active_0123456789abcdef"
EXPIRED_KEY = "hk_test_expired_0123456789abcdef"
INACTIVE_KEY = "hk_test_inactive_0123456789abcdef"
LIMITED_KEY = "hk_test_limited_0123456789abcdef"
SERVICE_KEY = "hk_test_service_0123456789abcdef"
UNKNOWN_KEY = "hk_test_unknown_0123456789abcdef"


def key_record(key_id: str, **overrides: Any) -> dict[str, Any]:
    """An answer body in the service's shape (its field names: `key_id`, ...)."""
    return {
        "key_id": key_id,
        "user_id": "user-1",
        "service_id": None,
        "scopes": ["read", "write"],
        "rate_limit_per_hour": 1000,
        "expires_at": None,
        "is_active": True,
    } | overrides


EXAMPLE_KEYS: dict[str, dict[str, Any]] = {
    ACTIVE_KEY: key_record("key-active", expires_at="2999-01-01T00:00:00Z"),
    EXPIRED_KEY: key_record("key-expired", expires_at="2020-01-01T00:00:00Z"),
    INACTIVE_KEY: key_record("key-inactive", is_active=False),
    LIMITED_KEY: key_record("key-limited", rate_limit_per_hour=5),
    SERVICE_KEY: key_record(
        "key-service", user_id="svc-pipeline", service_id="data-pipeline", scopes=["mlflow:write"]
    ),
}


class FakeAuthService:
    """The fake's state is plain attributes a test may change while it serves.

    `keys`: key -> answer body.  `calls`, `request_ids`: what it was asked.
    `delay`: seconds to wait before answering.  `down`: answer 503.
    `raw_answer`: (status, body bytes) sent instead of the contract's answer.
    """

    def __init__(self, keys: dict[str, dict[str, Any]] | None = None) -> None:
        self.keys = copy.deepcopy(EXAMPLE_KEYS if keys is None else keys)
        self.calls = 0
        self.request_ids: list[str | None] = []
        self.delay = 0.0
        self.down = False
        self.raw_answer: tuple[int, bytes] | None = None
        self.app = Starlette(routes=[Route(VALIDATE_PATH, self._validate, methods=["POST"])])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    async def _validate(self, request: Request) -> Response:
        self.calls += 1
        self.request_ids.append(request.headers.get("x-request-id"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            return JSONResponse({"detail": "service unavailable"}, status_code=503)
        if self.raw_answer is not None:
            status, body = self.raw_answer
            return Response(body, status_code=status, media_type="application/json")
        try:
            api_key = (await request.json())["api_key"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"detail": "body must be {'api_key': str}"}, status_code=400)
        record = self.keys.get(api_key) if isinstance(api_key, str) else None
        if record is None:
            return JSONResponse({"detail": "unknown API key"}, status_code=401)
        return JSONResponse(record)

    # --- serving --------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in a background thread; returns the base URL (port 0: a free one)."""
        # IPPROTO_TCP named: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets of a
        # listener created as TCP; with protocol 0 every answer waited ~40 ms for a delayed ACK.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        # log_config=None: uvicorn would otherwise re-configure logging for the whole (test) process.
        config = uvicorn.Config(self.app, log_config=None, lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [listener]}, daemon=True)
        self._thread.start()
        for _ in range(200):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.025)
        if not self._server.started:
            self.stop()
            raise RuntimeError("the fake auth service did not start")
        bound_host, bound_port = listener.getsockname()[:2]
        return f"http://{bound_host}:{bound_port}"

    def stop(self) -> None:
        """Stop serving: from now on connections are refused."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    @contextmanager
    def serving(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        base_url = self.start(host, port)
        try:
            yield base_url
        finally:
            self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    options = parser.parse_args()
    print(f"fake auth service on http://{options.host}:{options.port}{VALIDATE_PATH}")
    for key, record in EXAMPLE_KEYS.items():
        print(f"  {key}  {record['key_id']}")
    uvicorn.run(FakeAuthService().app, host=options.host, port=options.port, log_level="info")


if __name__ == "__main__":
    main()
