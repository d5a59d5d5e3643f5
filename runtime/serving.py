"""Run one ASGI app on several uvicorn listeners in one process: mTLS, plain, health.

uvicorn serves one socket configuration per `Server`; we need up to three for the same
app (the mTLS port, the permissive mode's plain port, and a loopback-only health port),
so each listener gets a `Server` and they share the event loop. Signals are handled once
here for all of them (uvicorn's per-server handlers would overwrite each other), and the
app's lifespan runs once, on the first listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import uvicorn

from runtime.asgi_tls import TLSExtensionH11Protocol
from runtime.tls_context import ReloadableServerContext

log = logging.getLogger("hokusai_mtls")


@dataclass(frozen=True)
class Listener:
    name: str
    host: str
    port: int
    app: Callable
    tls: ReloadableServerContext | None = None
    """None: plain HTTP. Otherwise TLS that requires a client certificate."""
    on_tls_connection: Callable[[], None] | None = None
    """Called for every completed TLS handshake (metrics)."""


class _ListenerServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # `serve` handles SIGINT/SIGTERM once for every listener


def _config(listener: Listener, *, lifespan: str) -> uvicorn.Config:
    options = {}
    if listener.tls is not None:
        tls = listener.tls
        protocol = TLSExtensionH11Protocol
        if listener.on_tls_connection is not None:
            protocol = protocol.with_hook(listener.on_tls_connection)
        options = {"http": protocol, "ssl_context_factory": lambda _config, _default: tls.front}
    return uvicorn.Config(
        listener.app,
        host=listener.host,
        port=listener.port,
        lifespan=lifespan,
        interface="asgi3",  # our apps are ASGI 3; auto-detection misreads bound methods as ASGI 2
        access_log=False,
        log_config=None,
        proxy_headers=False,  # never trust X-Forwarded-* here: identity comes from the TLS layer
        server_header=False,
        timeout_graceful_shutdown=10,
        **({"http": "h11"} | options),
    )


class Serving:
    """Several listeners for one app, started and stopped together.

    `run()` serves until SIGINT/SIGTERM or `stop()`; `started` (a threading.Event, so tests
    and other threads can wait on it) is set once every listener accepts connections.
    """

    def __init__(
        self, listeners: Sequence[Listener], *, background: Sequence[Callable[[], Awaitable[None]]] = ()
    ) -> None:
        self.listeners = list(listeners)
        self.background = list(background)
        self.servers = [
            _ListenerServer(_config(listener, lifespan="auto" if index == 0 else "off"))
            for index, listener in enumerate(self.listeners)
        ]
        self.started = threading.Event()

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self.stop)
        serving = [
            asyncio.create_task(server.serve(), name=f"listener-{listener.name}")
            for server, listener in zip(self.servers, self.listeners, strict=True)
        ]
        jobs = [asyncio.create_task(job(), name="background") for job in self.background]
        try:
            while not all(server.started for server in self.servers):
                if any(task.done() for task in serving):
                    break  # a listener failed to start; uvicorn logged why
                await asyncio.sleep(0.01)
            else:
                for listener in self.listeners:
                    kind = "mTLS, client certificate required" if listener.tls else "plain HTTP"
                    log.info("listening: %s on %s:%d (%s)", listener.name, listener.host, listener.port, kind)
                self.started.set()
            await asyncio.gather(*serving)
        finally:
            self.stop()
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)


async def every(seconds: float, action: Callable[[], object]) -> None:
    """Run the blocking `action` in a thread every `seconds`; log and go on when it fails."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(action)
        except Exception:  # a failed refresh must never take the server down
            log.exception(
                "periodic %s failed; will retry in %ss", getattr(action, "__name__", "task"), seconds
            )
