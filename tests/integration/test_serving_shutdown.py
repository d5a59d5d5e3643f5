"""What `Serving` does at shutdown with its background jobs, on a real listener on the loopback.

Every job's `at_exit` runs once, after the listener stopped accepting and the request in flight
was answered; a periodic job's last run follows the one still going; an action that fails or
hangs is logged on one line and the exit goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from runtime.serving.server import Background, Listener, Serving, periodic
from tests.support.servers import answer_lifespan, free_port

pytestmark = pytest.mark.integration


def slow_app(entered: threading.Event, events: list[str]):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        entered.set()
        await asyncio.sleep(0.5)  # still working when the stop comes
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        events.append("answered")

    return app


def serve(serving: Serving) -> threading.Thread:
    thread = threading.Thread(target=asyncio.run, args=(serving.run(),), daemon=True)
    thread.start()
    assert serving.started.wait(20), "the listener did not start"
    return thread


def stopped(serving: Serving, thread: threading.Thread) -> None:
    serving.stop()
    thread.join(30)
    assert not thread.is_alive(), "Serving.run() did not return after stop()"


def test_at_exit_runs_once_after_the_request_in_flight_is_answered():
    events: list[str] = []
    entered = threading.Event()
    port = free_port()
    serving = Serving(
        [Listener("plain", "127.0.0.1", port, slow_app(entered, events))],
        background=[
            periodic("flush", 3600, lambda: events.append("flush"), at_exit=True),
            Background("close", at_exit=lambda: events.append("close")),
        ],
    )
    thread = serve(serving)
    answers: list[httpx.Response] = []
    caller = threading.Thread(
        target=lambda: answers.append(httpx.get(f"http://127.0.0.1:{port}/", timeout=30))
    )
    caller.start()
    assert entered.wait(10)
    stopped(serving, thread)
    caller.join(30)
    assert [a.status_code for a in answers] == [200]  # drained, not cut off
    assert events[0] == "answered"
    assert sorted(events[1:]) == ["close", "flush"]  # each once, after the request


def test_the_last_run_follows_the_periodic_run_still_going():
    events: list[str] = []
    busy, release = threading.Event(), threading.Event()

    def flush() -> None:
        if not busy.is_set():  # the first, periodic run: caught mid-way by the stop
            busy.set()
            release.wait(10)
            events.append("periodic")
            return
        events.append("last")

    serving = Serving(
        [Listener("plain", "127.0.0.1", free_port(), slow_app(threading.Event(), []))],
        background=[periodic("flush", 0.05, flush, at_exit=True)],
    )
    thread = serve(serving)
    assert busy.wait(10)
    serving.stop()
    time.sleep(0.2)  # the exit waits for the run in progress ...
    assert events == []
    release.set()
    thread.join(30)
    assert not thread.is_alive()
    assert events == ["periodic", "last"]  # ... then makes its own


def test_a_failing_or_hung_exit_action_is_one_log_line_and_the_exit_goes_on(caplog):
    caplog.set_level("INFO", logger="hokusai_mtls")
    ran: list[str] = []
    hang = threading.Event()

    def broken() -> None:
        raise RuntimeError("stdout is gone")

    async def stuck() -> None:
        await asyncio.Event().wait()

    serving = Serving(
        [Listener("plain", "127.0.0.1", free_port(), slow_app(threading.Event(), []))],
        background=[
            Background("broken flush", at_exit=broken),
            Background("hung flush", at_exit=lambda: hang.wait(60)),
            Background("hung close", at_exit=stuck),
            Background("good close", at_exit=lambda: ran.append("good")),
        ],
        exit_timeout=0.3,
    )
    try:
        stopped(serving, serve(serving))
    finally:
        hang.set()  # lets the daemon thread left behind end
    assert ran == ["good"]  # the others' troubles did not keep it from running
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("at exit:")]
    assert sorted(messages) == [
        "at exit: broken flush failed: RuntimeError: stdout is gone",
        "at exit: hung close did not finish within 0.3 s; exiting without it",
        "at exit: hung flush did not finish within 0.3 s; exiting without it",
    ]
    assert not any(r.exc_info for r in caplog.records)  # no traceback in front of the exit
