"""Run a `runtime.serving.server.Serving` in a background thread for a test, and stop it after."""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import contextmanager

from local_stack.ports import free_port  # noqa: F401  (re-exported for the tests)
from runtime.serving.asgi_tls import TLS_EXTENSION
from runtime.serving.server import Serving


@contextmanager
def running(serving: Serving, timeout: float = 20):
    thread = threading.Thread(target=asyncio.run, args=(serving.run(),), daemon=True)
    thread.start()
    if not serving.started.wait(timeout):
        serving.stop()
        raise RuntimeError("the listeners did not start")
    try:
        yield serving
    finally:
        serving.stop()
        thread.join(timeout)


async def answer_lifespan(receive, send) -> None:
    """What a test app does with uvicorn's lifespan scope: complete startup and shutdown, nothing else."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def echo_tls(scope, receive, send):
    """A test app that answers with what it sees of TLS: the ASGI TLS extension, or null."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    body = json.dumps({"tls": (scope.get("extensions") or {}).get(TLS_EXTENSION)}).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})
