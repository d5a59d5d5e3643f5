"""Run one ASGI app on several uvicorn listeners in one process: mTLS, plain, health.

uvicorn serves one socket configuration per `Server`; we need several for the same app
(the service port, a loopback-only health port), so each listener gets a `Server` and they
share the event loop. Signals are handled once here for all of them (uvicorn's per-server
handlers would overwrite each other), and the app's lifespan runs once, on the first listener.

Every listener is fed by our own accept loop (`runtime.serving.acceptor`): uvicorn runs with
`sockets=[]` and serves the connections we hand it. That gives each listener a bound on the
connections it holds (pending TLS handshakes included), a TLS handshake timeout (asyncio's default
is 60 s), and, with the protocol of `runtime.serving.bounded_h11`, header, body-idle and keep-alive
timeouts: the settings of `runtime.serving.connection_limits`, from the environment unless given.

The permissive migration serves TLS and plain HTTP on the SAME port (`Listener.plain_too`),
so old clients keep dialing `http://mlflow...:5000` while new ones switch to `https://` on
the same address: the acceptor peeks at each connection's first byte (a TLS handshake starts
with 0x16, HTTP with a method name) and hands it to the TLS or the plain uvicorn protocol.

At start the soft RLIMIT_NOFILE is raised to the hard limit (as nginx's `worker_rlimit_nofile`
does), so a few thousand connections fit where the soft limit is 1024, and the start-up log says
how many fit.

Background jobs (`Background`, `periodic`) run beside the listeners: a periodic refresh or metrics
flush, a client to close. Shutdown (SIGTERM, SIGINT or `stop()`) goes in this order: the acceptors
stop accepting, uvicorn closes idle connections and lets requests in flight finish (up to
`GRACEFUL_SHUTDOWN_SECONDS`), the app's lifespan shuts down, the jobs' periodic loops are
cancelled, and then every job's `at_exit` action runs once, together, within `EXIT_TIMEOUT_SECONDS`:
the metrics' last flush (so the requests and refused handshakes of the interval cut short are
written, not dropped), closing the Redis pool and the HTTP clients. An action that fails or
overruns is logged on one line (`at exit: ...`) and the process exits as it would have; blocking
actions run in daemon threads, so a hung one cannot hold the exit either.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import resource
import signal
import socket
import threading
from asyncio import sslproto
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import uvicorn
from uvicorn.config import LifespanType

from runtime import names
from runtime.certificates.tls_context import ReloadableServerContext
from runtime.errors import MtlsError
from runtime.serving.acceptor import ACCEPT_BATCH, Acceptor
from runtime.serving.asgi_tls import TLSExtensionH11Protocol, TLSExtensionWSProtocol
from runtime.serving.bounded_h11 import BoundedH11Protocol
from runtime.serving.connection_limits import ConnectionLimits, mlflow_limits

log = logging.getLogger("hokusai_mtls")

BACKLOG = 2048
FILES_RESERVED = 128
"""Descriptors kept for everything but connections (logs, the database pool, certificate files)."""
GRACEFUL_SHUTDOWN_SECONDS = 10
"""How long requests in flight may take to finish after a stop (uvicorn's `timeout_graceful_shutdown`)."""
EXIT_TIMEOUT_SECONDS = 5.0
"""How long the background jobs' `at_exit` actions may take together: with the graceful shutdown,
well inside ECS's default 30 s `stopTimeout` between SIGTERM and SIGKILL."""
WS_MAX_MESSAGE_BYTES = 1024 * 1024
"""The largest WebSocket message a `websockets=True` listener takes; a bigger one closes the
connection (1009). uvicorn's default is 16 MiB."""
WS_PING_SECONDS = 20.0
"""A WebSocket is pinged this often, and closed if the pong takes longer than this."""
TLS_READ_BUFFER_BYTES = 32 * 1024
"""asyncio gives every TLS connection a 256 KiB read buffer (`asyncio.sslproto.SSLProtocol.max_size`)
from the moment it is accepted: about 300 KiB per pending handshake or idle TLS connection, 1.2 GiB
for 4,096. A TLS record carries at most 16 KiB, so 32 KiB reads lose nothing; see `_bound_tls_buffers`."""


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
    on_handshake_failure: Callable[[str], None] | None = None
    """Called with the reason of every failed TLS handshake (`handshake_failures.classify`; metrics)."""
    plain_too: bool = False
    """With `tls`: plain HTTP on the same port as well, told apart by the first byte."""
    limits: ConnectionLimits | None = None
    """Timeouts and the connection bound of this listener; None: those of its `Serving`."""
    sock: socket.socket | None = None
    """A socket already listening (a worker process's, from its supervisor: `runtime.serving.workers`);
    None: `Serving` binds host:port itself."""
    accept_batch: int = ACCEPT_BATCH
    """Connections taken per readiness event. Worker processes sharing one socket take 1, so a worker
    busy with a handshake leaves the next connection to an idle one instead of queueing a batch."""
    websockets: bool = False
    """Accept WebSocket upgrades (`TLSExtensionWSProtocol`: the TLS extension on the WebSocket scope,
    messages up to `WS_MAX_MESSAGE_BYTES`, no per-message deflate, pings every `WS_PING_SECONDS`).
    False: an upgrade request is answered as plain HTTP (MLflow and the API have no WebSocket routes)."""


@dataclass(frozen=True)
class Background:
    """A job that runs beside the listeners of a `Serving`.

    `run` (a coroutine function) runs from start until shutdown, when it is cancelled. `at_exit`
    runs once after that, when the listeners have stopped and their requests have drained: a
    coroutine function is awaited on the loop, any other callable runs in a daemon thread. Either
    may be None. See `periodic` for "every N seconds, and once more at exit".
    """

    name: str
    run: Callable[[], Coroutine[Any, Any, None]] | None = None
    """A coroutine function: `asyncio.create_task` takes a coroutine, not any awaitable."""
    at_exit: Callable[[], object] | None = None
    on_stop: Callable[[], None] | None = None
    """Called on the loop as soon as the `Serving` is told to stop, before its listeners drain (a
    supervisor tells its workers to stop then, not after its own shutdown)."""


def periodic(
    name: str,
    seconds: float,
    action: Callable[[], object],
    *,
    at_exit: bool = False,
    delay: Callable[[], float] | None = None,
) -> Background:
    """Run the blocking `action` in a thread every `seconds` (a failure is logged, the next run
    comes as planned); with `at_exit`, once more at shutdown, after a run still going has ended:
    for actions that hold state to write out, such as `Metrics.flush`. `delay`: each wait instead
    (a certificate refresh's jitter, `loader.refresh_delay`)."""
    job = _Periodic(name, seconds, action, delay)
    return Background(name, job.run, job.last_run if at_exit else None)


class _ListenerServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # `serve` handles SIGINT/SIGTERM once for every listener


def _config(listener: Listener, *, lifespan: LifespanType, limits: ConnectionLimits) -> uvicorn.Config:
    protocol: type[BoundedH11Protocol]
    if listener.tls is not None:
        protocol = TLSExtensionH11Protocol
        if listener.on_tls_connection is not None:
            protocol = protocol.with_hook(listener.on_tls_connection)
    else:
        protocol = BoundedH11Protocol
    return uvicorn.Config(
        listener.app,
        host=listener.host,
        port=listener.port,
        http=protocol.with_limits(limits),  # TLS is the acceptor's: uvicorn itself serves no socket
        # Without WebSockets: an upgrade stays an HTTP request. With them: our wsproto subclass takes
        # the connection over from our h11 protocol (its timers stop, its bound slot moves along).
        ws=TLSExtensionWSProtocol if listener.websockets else "none",
        ws_max_size=WS_MAX_MESSAGE_BYTES,
        ws_per_message_deflate=False,  # compression: a memory cost per connection and a decompression bomb
        ws_ping_interval=WS_PING_SECONDS,
        ws_ping_timeout=WS_PING_SECONDS,
        lifespan=lifespan,
        interface="asgi3",  # our apps are ASGI 3; auto-detection misreads bound methods as ASGI 2
        access_log=False,
        log_config=None,
        proxy_headers=False,  # never trust X-Forwarded-* here: identity comes from the TLS layer
        server_header=False,
        # uvicorn annotates it int, but only hands it to `loop.call_later` (seconds, a float); the
        # protocol (`BoundedH11Protocol`) sets the same value on every connection anyway.
        timeout_keep_alive=limits.keepalive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


@dataclass
class _Plan:
    listener: Listener
    limits: ConnectionLimits
    tls_server: _ListenerServer | None
    plain_server: _ListenerServer | None


def _protocol_factory(server: _ListenerServer) -> Callable[[], BoundedH11Protocol]:
    config = server.config

    def make() -> BoundedH11Protocol:
        # uvicorn types it `type[asyncio.Protocol]`; `_config` always passes a `BoundedH11Protocol`
        # subclass as `http=`, which `Config.load()` keeps as is.
        protocol_class = cast("type[BoundedH11Protocol]", config.http_protocol_class)
        return protocol_class(
            config=config, server_state=server.server_state, app_state=server.lifespan.state
        )

    return make


class Serving:
    """Several listeners for one app, started and stopped together.

    `run()` serves until SIGINT/SIGTERM or `stop()`; `started` (a threading.Event, so tests
    and other threads can wait on it) is set once every listener accepts connections.
    `limits` apply to every listener without its own; None: `mlflow_limits()` from the environment.
    """

    def __init__(
        self,
        listeners: Sequence[Listener],
        *,
        background: Sequence[Background | Callable[[], Coroutine[Any, Any, None]]] = (),
        limits: ConnectionLimits | None = None,
        exit_timeout: float = EXIT_TIMEOUT_SECONDS,
    ) -> None:
        """`background`: `Background` jobs, or coroutine functions (a job with nothing to do at exit)."""
        self.listeners = list(listeners)
        self.background = [
            job if isinstance(job, Background) else Background(getattr(job, "__name__", "background"), job)
            for job in background
        ]
        self.exit_timeout = exit_timeout
        self.limits = limits if limits is not None else mlflow_limits(os.environ)
        self.servers: list[_ListenerServer] = []
        self._plans: list[_Plan] = []
        for index, listener in enumerate(self.listeners):
            lifespan: LifespanType = "auto" if index == 0 else "off"
            limits_ = listener.limits or self.limits
            server = _ListenerServer(_config(listener, lifespan=lifespan, limits=limits_))
            self.servers.append(server)
            if listener.tls is None:
                self._plans.append(_Plan(listener, limits_, None, server))
                continue
            twin = None
            if listener.plain_too:
                twin = _ListenerServer(_config(replace(listener, tls=None), lifespan="off", limits=limits_))
                self.servers.append(twin)
            self._plans.append(_Plan(listener, limits_, server, twin))
        self.acceptors: list[Acceptor] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested = False
        self.started = threading.Event()

    def stop(self) -> None:
        """Stop accepting and shut the listeners down gracefully; callable from any thread."""
        self._stop_requested = True
        for server in self.servers:
            server.should_exit = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                loop.call_soon_threadsafe(self._close_acceptors)

    def _close_acceptors(self) -> None:
        for acceptor in self.acceptors:
            acceptor.close()
        if self._stopping is not None and not self._stopping.is_set():
            self._stopping.set()
            for job in self.background:
                if job.on_stop is not None:
                    job.on_stop()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        stopping = self._stopping = asyncio.Event()
        if self._stop_requested:
            stopping.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self.stop)
        room = _raise_open_file_limit()
        sockets: list[socket.socket] = []
        try:
            for plan in self._plans:
                # OSError here: nothing has started yet
                sockets.append(
                    plan.listener.sock
                    or listen_socket(plan.listener.name, plan.listener.host, plan.listener.port)
                )
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        if any(plan.tls_server is not None for plan in self._plans):
            _bound_tls_buffers()
        serving = [asyncio.create_task(server.serve(sockets=[])) for server in self.servers]
        jobs = [asyncio.create_task(job.run(), name=job.name) for job in self.background if job.run]
        try:
            while not all(server.started for server in self.servers):
                if any(task.done() for task in serving):
                    break  # a listener failed to start; uvicorn logged why
                await asyncio.sleep(0.01)
            else:
                for plan, sock in zip(self._plans, sockets, strict=True):
                    acceptor = _acceptor(plan, sock)
                    acceptor.start()
                    self.acceptors.append(acceptor)
                sockets = []
                self._log_started(room)
                if not any(server.should_exit for server in self.servers):
                    self.started.set()
                else:
                    self._close_acceptors()  # stop() came during start-up
            if not serving:  # only background jobs (a supervisor of workers): until stop()
                await stopping.wait()
            await asyncio.gather(*serving)
        finally:
            self.stop()
            self._close_acceptors()
            for sock in sockets:
                sock.close()
            await asyncio.gather(*serving, return_exceptions=True)  # every listener has drained
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await self._at_exit()

    async def _at_exit(self) -> None:
        """Every job's `at_exit`, together, within `exit_timeout`; failures logged on one line each."""
        jobs = [job for job in self.background if job.at_exit is not None]
        if jobs:
            await asyncio.gather(*(self._exit_action(job) for job in jobs))

    async def _exit_action(self, job: Background) -> None:
        action = job.at_exit
        if action is None:  # `_at_exit` passes only jobs with an action
            return
        running: asyncio.Future[object]
        if inspect.iscoroutinefunction(action):
            running = asyncio.ensure_future(action())
        else:
            running = _in_daemon_thread(action, job.name)
        done, _ = await asyncio.wait([running], timeout=self.exit_timeout)
        if not done:
            running.cancel()
            log.error(
                "at exit: %s did not finish within %g s; exiting without it", job.name, self.exit_timeout
            )
        elif not running.cancelled() and (exc := running.exception()) is not None:
            # one line, no traceback: the exit stays the last thing the log says
            log.error("at exit: %s failed: %s: %s", job.name, type(exc).__name__, exc)

    def _log_started(self, room: int) -> None:
        for plan in self._plans:
            listener = plan.listener
            kind = "mTLS, client certificate required" if listener.tls else "plain HTTP"
            if listener.plain_too:
                kind += ", and plain HTTP on the same port (permissive)"
            log.info(
                "listening: %s on %s:%d (%s; %s)",
                listener.name,
                listener.host,
                listener.port,
                kind,
                plan.limits.describe(tls=listener.tls is not None),
            )
        bound = sum(plan.limits.max_connections for plan in self._plans)
        level = logging.INFO if bound <= room else logging.WARNING
        log.log(
            level,
            "open files: room for about %d connections; these listeners hold at most %d together%s",
            room,
            bound,
            ""
            if bound <= room
            else f" (lower {names.ENV_MAX_CONNECTIONS} or raise the task's nofile ulimit: "
            "beyond the room, accepting fails until connections close)",
        )


def _acceptor(plan: _Plan, sock: socket.socket) -> Acceptor:
    listener = plan.listener
    return Acceptor(
        listener.name,
        sock,
        plan.limits,
        plain=_protocol_factory(plan.plain_server) if plan.plain_server is not None else None,
        tls=_protocol_factory(plan.tls_server) if plan.tls_server is not None else None,
        context=listener.tls.front if listener.tls is not None else None,
        accept_batch=listener.accept_batch,
        on_handshake_failure=listener.on_handshake_failure,
    )


def listen_socket(name: str, host: str, port: int) -> socket.socket:
    """A socket listening on host:port; OSError naming the listener if it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        raise OSError(exc.errno, f"listener {name} cannot listen on {host}:{port}: {exc.strerror}") from exc


def _raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return about how many connections fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        target = _nr_open()
    raised = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            raised = target
        except (ValueError, OSError) as exc:
            log.warning("open files: cannot raise the soft limit %d to %d: %s", soft, target, exc)
    if raised != soft:
        log.info("open files: soft limit raised from %d to the hard limit %d", soft, raised)
    limit = raised if raised != resource.RLIM_INFINITY else _nr_open()
    return max(0, limit - _open_descriptors() - FILES_RESERVED)


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def _bound_tls_buffers() -> None:
    """Give asyncio's TLS connections a 32 KiB read buffer instead of 256 KiB.

    `asyncio.sslproto.SSLProtocol` allocates `max_size` bytes per connection when it is created,
    i.e. at accept, before the handshake. The attribute is the size of each socket read and each
    decrypted read; a TLS record holds at most 16 KiB of data, so 32 KiB reads cost no throughput
    (benchmarks/bench_connections.py) and cut the memory of an idle or pending TLS connection about
    fourfold. Process-wide (asyncio offers no per-server setting); only servers with a TLS listener
    set it. A Python whose SSLProtocol lacks the attribute is left alone.
    """
    protocol = getattr(sslproto, "SSLProtocol", None)
    current = getattr(protocol, "max_size", None)
    if protocol is not None and isinstance(current, int) and current > TLS_READ_BUFFER_BYTES:
        protocol.max_size = TLS_READ_BUFFER_BYTES


def _in_daemon_thread(action: Callable[[], object], name: str) -> asyncio.Future:
    """`action()` in a new daemon thread, as a future of this loop.

    Not the loop's default executor: `asyncio.run` waits for that executor's threads before it
    returns, so one hung call (a certificate fetch, a flush to a blocked stdout) would hold the
    process past every timeout. A daemon thread that overruns is simply left behind at exit.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = action(), None
        except BaseException as exc:  # handed to the waiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: the process is exiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=f"hokusai-mtls {name}", daemon=True).start()
    return future


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class _Periodic:
    """The loop behind `periodic` and `every`: one run at a time, the last one awaited at exit."""

    def __init__(
        self,
        name: str,
        seconds: float,
        action: Callable[[], object],
        delay: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self.seconds = seconds
        self.action = action
        self._delay = delay or (lambda: seconds)
        self._current: asyncio.Future | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._delay())
            self._current = _in_daemon_thread(self.action, self.name)
            self._current.add_done_callback(_retrieved)  # cancelled below, a late failure is not "lost"
            try:
                await asyncio.shield(self._current)  # cancelled at shutdown: the run itself goes on
            except MtlsError as exc:  # a named failure (e.g. `refresh-failed`): its message says it all
                log.warning(
                    "periodic %s failed [%s]: %s; will retry in %ss", self.name, exc.code, exc, self.seconds
                )
            except Exception:  # a failed refresh must never take the server down
                log.exception("periodic %s failed; will retry in %ss", self.name, self.seconds)

    async def last_run(self) -> None:
        """After the run still going (if any), once more: what it held is written, in order."""
        if self._current is not None and not self._current.done():
            await asyncio.wait([self._current])
        await _in_daemon_thread(self.action, self.name)


async def every(seconds: float, action: Callable[[], object]) -> None:
    """Run the blocking `action` in a thread every `seconds`; log and go on when it fails.

    Nothing runs at exit: a job with a last run to make is `periodic(..., at_exit=True)`.
    """
    await _Periodic(getattr(action, "__name__", "task"), seconds, action).run()
