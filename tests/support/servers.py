"""Run a `runtime.serving.Serving` in a background thread for a test, and stop it after."""

from __future__ import annotations

import asyncio
import socket
import threading
from contextlib import contextmanager

from runtime.serving import Serving


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
