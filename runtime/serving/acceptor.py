"""Our own accept loop for every listener: a connection bound, a TLS handshake timeout, the sniff.

uvicorn's `loop.create_server(ssl=...)` leaves the TLS handshake at asyncio's default 60 s and has
no bound on connections, so a listener holds as many half-open connections as clients open
(about 300 KiB each with TLS, measured: benchmarks/bench_connections.py). Every listener in
`runtime.serving.server` is therefore fed by an `Acceptor` instead (uvicorn runs with `sockets=[]` and
serves what we hand it, so its graceful shutdown and `server_state.connections` work unchanged):

- a listener holds at most `max_connections`, pending handshakes and the permissive sniff
  included; a connection beyond that is accepted and closed at once (the client sees EOF rather
  than a full backlog), counted, and logged at WARNING at most every `REFUSED_LOG_SECONDS`;
- a TLS handshake must complete within `handshake_timeout` of the accepted connection
  (`loop.connect_accepted_socket(..., ssl_handshake_timeout=...)`);
- permissive mode (TLS and plain HTTP on one port): the first byte, peeked without consuming it,
  must arrive within min(header, handshake timeout); 0x16 (a TLS handshake record) goes to the TLS
  protocol, anything else to the plain one (the way Istio's permissive mode tells them apart);
- TCP_NODELAY on every accepted socket (without it a keep-alive response waits for the client's
  delayed ACK, ~40 ms).

A `Slot` tracks each connection's place in the bound: taken at accept, released exactly once,
by the acceptor when the connection fails before the HTTP protocol has it, else by the protocol's
`connection_lost` (`runtime.serving.bounded_h11`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable

from runtime import names
from runtime.serving import handshake_failures
from runtime.serving.asgi_tls import TLSExtensionH11Protocol
from runtime.serving.bounded_h11 import BoundedH11Protocol, Slot
from runtime.serving.connection_limits import ConnectionLimits

log = logging.getLogger("hokusai_mtls")

TLS_HANDSHAKE_RECORD = 0x16
REFUSED_LOG_SECONDS = 10.0
"""At most one WARNING per listener this often about refused connections (with their count)."""
ACCEPT_BATCH = 128
"""Connections accepted per readiness event before other callbacks get the loop."""
ACCEPT_RETRY_SECONDS = 1.0
"""After an accept error (EMFILE, ENFILE, ENOBUFS, ENOMEM), accepting pauses this long (as asyncio's own
server does), instead of spinning on a listening socket that stays readable."""
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

ProtocolFactory = Callable[[], BoundedH11Protocol]


class Acceptor:
    """Accepts on `sock` and hands each connection to the plain or TLS protocol of one listener."""

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        limits: ConnectionLimits,
        *,
        plain: ProtocolFactory | None = None,
        tls: ProtocolFactory | None = None,
        context: ssl.SSLContext | None = None,
        accept_batch: int = ACCEPT_BATCH,
        on_handshake_failure: Callable[[str], None] | None = None,
    ) -> None:
        """`plain` and/or `tls` make the protocols; both: permissive (told apart by the first byte).
        `on_handshake_failure` is called with the reason of every failed TLS handshake (metrics); each is
        also logged, at most once per peer address and reason a minute (`handshake_failures`)."""
        if tls is not None and context is None:
            raise ValueError("a TLS listener needs its SSL context")
        if tls is None and plain is None:
            raise ValueError("a listener needs a plain or a TLS protocol")
        self.name = name
        self.sock = sock
        self.limits = limits
        self.plain = plain
        self.tls = tls
        self.context = context
        self.accept_batch = accept_batch
        self.on_handshake_failure = on_handshake_failure
        self.failures = handshake_failures.FailureLog(name)
        self.open = 0
        """Connections held now: pending (sniff, handshake) and served."""
        self.refused = 0
        """Connections refused at the bound since start."""
        self._refused_logged = 0
        self._next_warning = 0.0
        self._warning_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # --- accepting ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._accept)

    @property
    def _started_loop(self) -> asyncio.AbstractEventLoop:
        """The loop `start` registered on; every callback below runs only after `start`."""
        if self._loop is None:
            raise RuntimeError(f"listener {self.name}: the acceptor was not started")
        return self._loop

    def close(self) -> None:
        """Stop accepting and drop pending connections (served ones are uvicorn's to shut down)."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in list(self._tasks):
            task.cancel()
        if self._warning_timer is not None:
            self._warning_timer.cancel()
            self._flush_refused()

    def _accept(self) -> None:
        loop = self._started_loop
        for _ in range(self.accept_batch):
            try:
                connection, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM or worse: back off, then retry
                level = logging.ERROR if exc.errno in _RESOURCE_ERRORS else logging.CRITICAL
                log.log(
                    level,
                    "listener %s: cannot accept (%s); pausing %gs",
                    self.name,
                    exc,
                    ACCEPT_RETRY_SECONDS,
                )
                loop.remove_reader(self.sock.fileno())
                loop.call_later(ACCEPT_RETRY_SECONDS, self._resume)
                return
            if self.open >= self.limits.max_connections:
                connection.close()
                self._refuse()
                continue
            self.open += 1
            slot = Slot(self._release)
            try:
                connection.setblocking(False)
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # reset between accept and here
                connection.close()
                slot.release()
                continue
            task = loop.create_task(self._serve(connection, slot, loop.time()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume(self) -> None:
        if not self._closed:
            self._started_loop.add_reader(self.sock.fileno(), self._accept)

    def _release(self) -> None:
        self.open -= 1

    # --- one connection ------------------------------------------------------------------------------
    async def _serve(self, connection: socket.socket, slot: Slot, opened_at: float) -> None:
        loop = self._started_loop
        use_tls = self.tls is not None
        if self.tls is not None and self.plain is not None:
            try:
                first = await self._first_byte(connection, opened_at)
            except BaseException as exc:  # silent client, reset, or shutting down
                connection.close()
                slot.release()
                if not isinstance(exc, TimeoutError | OSError):
                    raise
                return
            if not first:
                connection.close()
                slot.release()
                return
            use_tls = first[0] == TLS_HANDSHAKE_RECORD
        factory = self.tls if use_tls else self.plain
        if factory is None:  # not reached: __init__ refuses a listener without either protocol
            connection.close()
            slot.release()
            raise RuntimeError(f"listener {self.name}: no protocol for this connection")
        made: list[BoundedH11Protocol] = []
        peer = _peer_host(connection)

        def protocol(factory: ProtocolFactory, started: float | None) -> BoundedH11Protocol:
            made.append(instance := factory())
            instance.slot = slot
            instance.opened_at = started
            if isinstance(instance, TLSExtensionH11Protocol):  # refused once up (revoked, resumed): a failure
                instance.on_tls_refused = lambda reason, detail: self._failed(reason, peer, detail)
            return instance

        # From here the transport owns the socket: it closes it on every failure.
        try:
            if use_tls:
                remaining = max(0.05, opened_at + self.limits.handshake_timeout - loop.time())
                await loop.connect_accepted_socket(
                    lambda: protocol(factory, None),  # the header clock starts after the handshake
                    sock=connection,
                    ssl=self.context,
                    ssl_handshake_timeout=remaining,
                )
            else:
                await loop.connect_accepted_socket(lambda: protocol(factory, opened_at), sock=connection)
        except (OSError, ssl.SSLError) as exc:  # refused or timed-out handshake, reset
            log.debug("listener %s: connection failed before HTTP: %r", self.name, exc)
            slot.release()
            if use_tls:
                self._handshake_failed(exc, peer)
            return
        except BaseException:
            slot.release()
            raise
        if not made or made[0].transport is None:  # closed during the handshake without an error
            slot.release()

    async def _first_byte(self, connection: socket.socket, opened_at: float) -> bytes:
        """Wait until `connection` is readable and peek at its first byte without consuming it."""
        loop = self._started_loop
        readable = loop.create_future()
        deadline = opened_at + min(self.limits.header_timeout, self.limits.handshake_timeout)

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(connection.fileno(), wake)
        try:
            await asyncio.wait_for(readable, max(0.0, deadline - loop.time()))
        finally:
            loop.remove_reader(connection.fileno())
        return connection.recv(1, socket.MSG_PEEK)

    def _handshake_failed(self, exc: BaseException, peer: str) -> None:
        self._failed(handshake_failures.classify(exc), peer, handshake_failures.describe(exc))

    def _failed(self, reason: str, peer: str, detail: str) -> None:
        self.failures.failed(reason, peer, detail)
        if self.on_handshake_failure is not None:
            self.on_handshake_failure(reason)

    # --- refused connections -----------------------------------------------------------------------
    def _refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now >= self._next_warning:
            self._flush_refused()
            self._next_warning = now + REFUSED_LOG_SECONDS
        elif self._warning_timer is None:
            self._warning_timer = self._started_loop.call_later(self._next_warning - now, self._flush_refused)

    def _flush_refused(self) -> None:
        self._warning_timer = None
        new = self.refused - self._refused_logged
        if new <= 0:
            return
        self._refused_logged = self.refused
        self._next_warning = time.monotonic() + REFUSED_LOG_SECONDS
        log.warning(
            "listener %s: refused %d connection(s): it holds %d, the most %s=%d allows (%d refused since start)",
            self.name,
            new,
            self.open,
            names.ENV_MAX_CONNECTIONS,
            self.limits.max_connections,
            self.refused,
        )


def _peer_host(connection: socket.socket) -> str:
    """The peer's address, for the failure log; `unknown` once the peer has reset the connection."""
    try:
        return str(connection.getpeername()[0])
    except OSError:
        return "unknown"
