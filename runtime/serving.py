"""Run one ASGI app on several uvicorn listeners in one process: mTLS, plain, health.

uvicorn serves one socket configuration per `Server`; we need several for the same app
(the service port, a loopback-only health port), so each listener gets a `Server` and they
share the event loop. Signals are handled once here for all of them (uvicorn's per-server
handlers would overwrite each other), and the app's lifespan runs once, on the first listener.

The permissive migration serves TLS and plain HTTP on the SAME port (`Listener.plain_too`),
so old clients keep dialing `http://mlflow...:5000` while new ones switch to `https://` on
the same address: we accept the connection ourselves, peek at its first byte (a TLS
handshake starts with 0x16, HTTP with a method name), and hand it to the TLS or the plain
uvicorn protocol (the way Istio's permissive mode tells them apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

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
    plain_too: bool = False
    """With `tls`: plain HTTP on the same port as well, told apart by the first byte."""


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
        self.servers: list[_ListenerServer] = []
        self._plan: list[tuple[_ListenerServer, list | None]] = []  # (server, sockets for serve())
        self._sniffing: list[tuple[Listener, _ListenerServer, _ListenerServer]] = []
        for index, listener in enumerate(self.listeners):
            lifespan = "auto" if index == 0 else "off"
            server = _ListenerServer(_config(listener, lifespan=lifespan))
            if listener.plain_too and listener.tls is not None:
                twin = _ListenerServer(_config(replace(listener, tls=None), lifespan="off"))
                self._plan += [(server, []), (twin, [])]  # no sockets: the sniffing acceptor feeds them
                self._sniffing.append((listener, server, twin))
                self.servers += [server, twin]
            else:
                self._plan.append((server, None))
                self.servers.append(server)
        self.started = threading.Event()

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self.stop)
        serving = [asyncio.create_task(server.serve(sockets=sockets)) for server, sockets in self._plan]
        jobs = [asyncio.create_task(job(), name="background") for job in self.background]
        try:
            while not all(server.started for server in self.servers):
                if any(task.done() for task in serving):
                    break  # a listener failed to start; uvicorn logged why
                await asyncio.sleep(0.01)
            else:
                jobs += [asyncio.create_task(_sniff(*entry)) for entry in self._sniffing]
                await asyncio.sleep(0)  # let the sniffing acceptors bind before we say we started
                for listener in self.listeners:
                    kind = "mTLS, client certificate required" if listener.tls else "plain HTTP"
                    if listener.plain_too:
                        kind += ", and plain HTTP on the same port (permissive)"
                    log.info("listening: %s on %s:%d (%s)", listener.name, listener.host, listener.port, kind)
                self.started.set()
            await asyncio.gather(*serving)
        finally:
            self.stop()
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)


SNIFF_TIMEOUT_SECONDS = 10
"""A connection that sends nothing for this long (a TCP health probe) is closed."""
TLS_HANDSHAKE_RECORD = 0x16


def _protocol_factory(server: _ListenerServer) -> Callable[[], asyncio.Protocol]:
    config = server.config
    return lambda: config.http_protocol_class(
        config=config, server_state=server.server_state, app_state=server.lifespan.state
    )


async def _first_byte(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> bytes:
    """Wait until `connection` is readable and peek at its first byte without consuming it."""
    readable = loop.create_future()
    loop.add_reader(connection.fileno(), lambda: readable.done() or readable.set_result(None))
    try:
        await asyncio.wait_for(readable, SNIFF_TIMEOUT_SECONDS)
    finally:
        loop.remove_reader(connection.fileno())
    return connection.recv(1, socket.MSG_PEEK)


async def _route(connection: socket.socket, tls_listener: Listener, tls_server, plain_server) -> None:
    loop = asyncio.get_running_loop()
    try:
        first = await _first_byte(loop, connection)
        if not first:
            connection.close()
            return
        if first[0] == TLS_HANDSHAKE_RECORD:
            await loop.connect_accepted_socket(
                _protocol_factory(tls_server), sock=connection, ssl=tls_listener.tls.front
            )
        else:
            await loop.connect_accepted_socket(_protocol_factory(plain_server), sock=connection)
    except (OSError, TimeoutError, ssl.SSLError):  # silent client, refused handshake, reset
        connection.close()


async def _sniff(listener: Listener, tls_server: _ListenerServer, plain_server: _ListenerServer) -> None:
    """Accept on `listener`'s port and route each connection by its first byte."""
    loop = asyncio.get_running_loop()
    sock = socket.create_server((listener.host, listener.port), backlog=2048)
    sock.setblocking(False)
    routing: set[asyncio.Task] = set()
    try:
        while True:
            connection, _ = await loop.sock_accept(sock)
            # asyncio sets TCP_NODELAY only on sockets it accepts itself; without it every
            # keep-alive response waits for the client's delayed ACK (~40 ms).
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(_route(connection, listener, tls_server, plain_server))
            routing.add(task)
            task.add_done_callback(routing.discard)
    finally:
        sock.close()


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
