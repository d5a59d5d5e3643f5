"""The proxy's response relay: a finished response is not mistaken for a client that left.

uvicorn answers `receive()` with `http.disconnect` as soon as the last body message is sent.
When the disconnect watcher ran before the relay cancelled it, a complete response used to be
logged as "client went away during the response" (seen with `make local`'s curl commands).
"""

from __future__ import annotations

import anyio
import httpx
import pytest

from runtime.services.mlflow_proxy import _ClientGone, _relay

pytestmark = pytest.mark.anyio


class UvicornLikeCycle:
    """receive() blocks until the response is complete (or the client leaves), then disconnects."""

    def __init__(self, *, leave_after_chunks: int | None = None) -> None:
        self.done = anyio.Event()
        self.sent: list[dict] = []
        self.leave_after_chunks = leave_after_chunks

    async def receive(self) -> dict:
        await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        bodies = [m for m in self.sent if m["type"] == "http.response.body"]
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.done.set()  # as uvicorn's send(): response_complete, message_event.set(), no await after
        elif self.leave_after_chunks is not None and len(bodies) >= self.leave_after_chunks:
            self.done.set()
            await anyio.sleep(0.01)


async def body(*parts: bytes):
    """An upstream body arriving in parts: the relay waits for each, so the watcher is waiting too."""
    for part in parts:
        await anyio.sleep(0.001)
        yield part


async def test_a_complete_response_is_not_a_client_that_went_away():
    cycle = UvicornLikeCycle()
    response = httpx.Response(200, content=body(b"the whole ", b"body"))
    assert await _relay(response, cycle.receive, cycle.send, b"req-1") is None
    assert b"".join(m.get("body", b"") for m in cycle.sent) == b"the whole body"


async def test_a_client_that_leaves_mid_response_is_still_noticed():
    cycle = UvicornLikeCycle(leave_after_chunks=1)

    async def chunks():
        for _ in range(100):
            yield b"x" * 1024
            await anyio.sleep(0.001)

    response = httpx.Response(200, content=chunks())
    assert isinstance(await _relay(response, cycle.receive, cycle.send, b"req-2"), _ClientGone)
    assert len([m for m in cycle.sent if m["type"] == "http.response.body"]) < 100
