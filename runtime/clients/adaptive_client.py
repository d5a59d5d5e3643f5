"""HTTP clients for internal calls (API service -> MLflow) built from what the loader exported.

Seed 003 found "security theater": services that said mTLS but passed `verify=False`. Here the
loader's security level decides what the client *presents*, never whether it *verifies*:

- MTLS: trusts only the CA bundle (`MLFLOW_TRACKING_SERVER_CERT_PATH`) and presents the
  combined certificate+key PEM (`MLFLOW_TRACKING_CLIENT_CERT_PATH`), the files MLflow's own
  client uses, so both clients of one process connect the same way.
- TLS: trusts only the CA bundle and presents no certificate (development fallback).
- INSECURE: plain `http://` is expected; an `https://` URL is still verified, against the
  system trust store.

Every level verifies the server certificate and its hostname (CERT_REQUIRED, check_hostname).
A file the level needs that is missing, unreadable or not PEM raises `ClientConfigError`: the
service refuses to start rather than quietly downgrade. Callers cannot pass `verify`, `cert`,
`transport` or `mounts`, the ways httpx offers to bypass this context.

Pooling (issue 11 item 8): every pooled connection is kept alive when idle (`pool_limits`:
keep-alive = bound; httpcore closed an idle connection whenever the pool held more connections
than its keep-alive number, so 20 of 100 cost a new mTLS handshake per request above 20
concurrent ones). The async client pools in `ReusingPool`, O(1) per request where httpcore's
pool rescans every connection, over asyncio's own TLS streams (`AsyncioStream`), which hand over
all the data that has arrived instead of one 16 KiB TLS record per read. The API's proxy sizes
its pool to the API's own connection bound (`create_adaptive_client(max_connections=...)`).

>>> client = create_adaptive_client(base_url="https://mlflow.hokusai-staging.local:5000")
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import logging
import os
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpcore
import httpx

from runtime import names
from runtime.errors import ClientConfigError
from runtime.security_level import SecurityLevel

log = logging.getLogger("hokusai_mtls")

DEFAULT_TIMEOUT = httpx.Timeout(connect=2.0, read=30.0, write=30.0, pool=5.0)
"""A dead or unroutable server fails in 2 s; MLflow calls that do real work get 30 s; a request
waits at most 5 s for a free connection of a full pool (then `httpx.PoolTimeout`)."""
KEEPALIVE_EXPIRY = 4.0
"""Seconds an idle pooled connection is kept: less than MLflow's keep-alive (5 s,
`runtime.serving.connection_limits.MLFLOW_LIMITS`), so a request never lands on a connection the
server is just dropping."""
DEFAULT_MAX_CONNECTIONS = 100


def pool_limits(max_connections: int = DEFAULT_MAX_CONNECTIONS) -> httpx.Limits:
    """A pool of at most `max_connections`, each kept alive when idle (for `KEEPALIVE_EXPIRY`).

    Keep-alive equals the bound on purpose: httpcore 1.0 closes an idle connection whenever the
    pool holds more connections, busy or idle, than `max_keepalive_connections`. With 20 of 100
    (this module's limits until issue 11), every request above 20 concurrent ones closed its
    connection when it finished and the next one paid a new mTLS handshake (0.84 per request at
    50 concurrent callers). With both equal, a connection is closed only when it expires, the
    server closes it, or it breaks.
    """
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max_connections must be a whole number of at least 1, got {max_connections!r}")
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )


DEFAULT_LIMITS = pool_limits()
"""100 connections, all kept alive when idle; `create_adaptive_client(max_connections=N)` sizes it."""


# --- the async client's connections: asyncio's own streams -------------------------------------------
STREAM_BUFFER_BYTES = 64 * 1024
"""Per connection, received bytes asyncio buffers before it stops reading the socket (it pauses
at twice this): what a connection whose response nobody reads can hold, besides the kernel's."""


@contextlib.contextmanager
def _mapped(on_timeout: type[Exception], on_error: type[Exception]) -> Iterator[None]:
    """asyncio's errors as httpcore's, the original chained (`runtime.services.mlflow_proxy.classify` reads it)."""
    try:
        yield
    except TimeoutError as exc:
        raise on_timeout(str(exc) or type(exc).__name__) from exc
    except OSError as exc:  # ssl.SSLError, ConnectionResetError, ...
        raise on_error(str(exc) or type(exc).__name__) from exc


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection as an asyncio `StreamReader`/`StreamWriter` pair: TLS is asyncio's `SSLProtocol`.

    Why not httpcore's default (anyio's `TLSStream`): that one hands over one TLS record (at most
    16 KiB) per read, and every read pays the client's whole per-chunk path (h11, httpx, the
    proxy's relay, the downstream send). asyncio's TLS layer decrypts everything that has arrived
    at once, so a read returns up to what was asked (64 KiB from httpcore), four times fewer steps
    per body: a 50 MB body through the `/mlflow` proxy from a fast upstream on loopback came at
    150-230 MB/s with anyio's streams and 250-310 MB/s with these (the proxy's CPU per MB about
    halved; benchmarks/README.md, `bench_proxy.py`, has the figures against MLflow).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()

    async def aclose(self) -> None:
        """Close without waiting: asyncio sends TLS close_notify and ends the connection itself."""
        self._writer.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        try:
            with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
                async with asyncio.timeout(timeout):
                    await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except BaseException:
            self._writer.transport.abort()
            raise
        return self

    def get_extra_info(self, info: str):
        if info == "is_readable":  # asked of an idle connection: has the server closed it?
            return self._reader.at_eof() or self._reader.exception() is not None or self._writer.is_closing()
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info in ("ssl_object", "socket"):
            return self._writer.get_extra_info(info)
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on asyncio's streams (see `AsyncioStream`); TCP only."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options=None,
    ) -> httpcore.AsyncNetworkStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                    limit=STREAM_BUFFER_BYTES,
                )
        for option in socket_options or ():
            writer.get_extra_info("socket").setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not supported by this client")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# --- the async client's pool --------------------------------------------------------------------------
class ReusingPool:
    """httpcore's request interface over a bounded set of HTTP/1.1 connections, O(1) per request.

    httpcore 1.0's `AsyncConnectionPool` rescans every connection on every request and response
    (an idle one costs a socket poll, and the keep-alive rule is quadratic): with 100 idle
    connections each request through it cost 6 ms more than with one. This pool keeps the idle
    connections of each origin in a stack: a request takes the most recently used one (checked
    for expiry and for a server-side close, as httpcore checks it) or opens a new one while fewer
    than `max_connections` exist; a full pool makes it wait, at most the request's `pool`
    timeout (`httpcore.PoolTimeout`, which httpx raises as `httpx.PoolTimeout`). A connection
    goes back when its response is closed; idle ones older than `keepalive_expiry` are closed
    from the other end of the stack whenever the pool is used, so a pool shrinks back after a
    burst (one nobody uses keeps its sockets until the server closes them, noticed at the next
    use), and no more than `max_keepalive` are kept idle. The connections themselves are httpcore's (`AsyncHTTPConnection`: connect, TLS,
    h11, its trace events), only the pooling is ours. One event loop; not thread-safe.
    """

    def __init__(self, ssl_context: ssl.SSLContext, limits: httpx.Limits) -> None:
        self._ssl_context = ssl_context
        self._max_connections = limits.max_connections
        self._max_keepalive = limits.max_keepalive_connections
        self._keepalive_expiry = limits.keepalive_expiry
        self._idle: dict[tuple[bytes, bytes, int], deque[tuple[float, httpcore.AsyncHTTPConnection]]] = {}
        """(scheme, host, port) -> its idle connections with the time each became idle, oldest first."""
        self._idle_count = 0
        self._open = 0
        """Connections that exist: connecting, busy or idle."""
        self._waiters: deque[anyio.Event] = deque()
        self._closed = False
        self._backend = AsyncioBackend()

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return self._idle_count

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        timeout = request.extensions.get("timeout", {}).get("pool")
        deadline = None if timeout is None else anyio.current_time() + timeout
        while True:
            connection = await self._acquire(request.url.origin, deadline)
            try:
                response = await connection.handle_async_request(request)
            except httpcore.ConnectionNotAvailable:  # it closed between the check and the send
                await self._release(request.url.origin, connection)
                continue
            except BaseException:
                await self._release(request.url.origin, connection)
                raise
            return httpcore.Response(
                status=response.status,
                headers=response.headers,
                content=_ReleasingStream(response.stream, self, request.url.origin, connection),
                extensions=response.extensions,
            )

    async def _acquire(self, origin: httpcore.Origin, deadline: float | None) -> httpcore.AsyncHTTPConnection:
        while True:
            await self._close_expired()
            stack = self._idle.get(_key(origin))
            while stack:
                _, connection = stack.pop()
                self._idle_count -= 1
                if connection.is_available() and not connection.has_expired():
                    return connection
                await self._discard(connection)
            if self._max_connections is not None and self._open >= self._max_connections:
                if self._idle_count:  # room for this origin: close another origin's oldest idle one
                    other = next(s for s in self._idle.values() if s)
                    self._idle_count -= 1
                    await self._discard(other.popleft()[1])
                else:
                    await self._wait(deadline)
                    continue
            self._open += 1
            return httpcore.AsyncHTTPConnection(
                origin=origin,
                ssl_context=self._ssl_context,
                keepalive_expiry=self._keepalive_expiry,
                network_backend=self._backend,
            )

    async def _wait(self, deadline: float | None) -> None:
        event = anyio.Event()
        self._waiters.append(event)
        try:
            with anyio.fail_after(None if deadline is None else max(0.0, deadline - anyio.current_time())):
                await event.wait()
        except TimeoutError:
            raise httpcore.PoolTimeout(
                f"no free connection within the pool timeout ({self._max_connections} in use)"
            ) from None
        finally:
            if event in self._waiters:
                self._waiters.remove(event)
            elif event.is_set() and sys.exc_info()[0] is not None:
                self._wake_one()  # woken, but leaving (timed out meanwhile, cancelled): pass it on

    def _wake_one(self) -> None:
        while self._waiters:
            event = self._waiters.popleft()
            if not event.is_set():
                event.set()
                return

    async def _release(self, origin: httpcore.Origin, connection: httpcore.AsyncHTTPConnection) -> None:
        """A response is done with `connection`: keep it idle if it can take another request."""
        with anyio.CancelScope(shield=True):
            keep = (
                not self._closed
                and connection.is_idle()
                and not connection.is_closed()  # a failed connect counts as idle and closed
                and (self._max_keepalive is None or self._idle_count < self._max_keepalive)
            )
            if keep:
                self._idle.setdefault(_key(origin), deque()).append((anyio.current_time(), connection))
                self._idle_count += 1
            else:
                await self._discard(connection)
            self._wake_one()
            await self._close_expired()

    async def _discard(self, connection: httpcore.AsyncHTTPConnection) -> None:
        self._open -= 1
        with anyio.CancelScope(shield=True):
            await connection.aclose()
        self._wake_one()

    async def _close_expired(self) -> None:
        if self._keepalive_expiry is None or not self._idle_count:
            return
        oldest = anyio.current_time() - self._keepalive_expiry
        for stack in list(self._idle.values()):  # closing awaits: another task may add an origin
            while stack and stack[0][0] < oldest:
                self._idle_count -= 1
                await self._discard(stack.popleft()[1])

    async def aclose(self) -> None:
        self._closed = True
        stacks, self._idle, self._idle_count = list(self._idle.values()), {}, 0
        for stack in stacks:
            for _, connection in stack:
                await self._discard(connection)

    async def __aenter__(self) -> ReusingPool:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


def _key(origin: httpcore.Origin) -> tuple[bytes, bytes, int]:
    return (origin.scheme, origin.host, origin.port)


class _ReleasingStream:
    """A response body that gives its connection back to the pool when it is closed."""

    def __init__(
        self, stream, pool: ReusingPool, origin: httpcore.Origin, connection: httpcore.AsyncHTTPConnection
    ) -> None:
        self._stream = stream
        self._pool = pool
        self._origin = origin
        self._connection = connection
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()
            await self._pool._release(self._origin, self._connection)


class ReusingTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (its exception mapping, its response streams) over a `ReusingPool`."""

    def __init__(self, ssl_context: ssl.SSLContext, limits: httpx.Limits) -> None:
        super().__init__(verify=ssl_context, limits=limits)
        self._reusing_pool = ReusingPool(ssl_context, limits)
        # httpx types its private `_pool` as httpcore's AsyncConnectionPool; ReusingPool is a
        # duck-typed stand-in with what the transport calls (handle_async_request, aclose, async with).
        self._pool = self._reusing_pool  # type: ignore[assignment]

    @property
    def pool(self) -> ReusingPool:
        return self._reusing_pool


_RESERVED_OPTIONS = frozenset({"verify", "cert", "transport", "mounts"})


@dataclass(frozen=True)
class ClientTLS:
    """The verifying SSL context for one security level, and the files it was built from."""

    level: SecurityLevel
    context: ssl.SSLContext
    ca_bundle: Path | None = None
    """None: the system trust store (INSECURE level)."""
    client_certificate: Path | None = None
    """The combined certificate+key PEM presented to the server (MTLS level only)."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str | None] = os.environ) -> ClientTLS:
        """Read HOKUSAI_MTLS_SECURITY_LEVEL and the files that level needs; raise ClientConfigError."""
        level = security_level_from_environ(environ)
        if level is SecurityLevel.INSECURE:
            return cls(level, _verifying(ssl.create_default_context()))
        ca_bundle = _required_file(environ, names.ENV_MLFLOW_SERVER_CERT, names.ENV_CA_BUNDLE_FILE, level)
        try:
            context = ssl.create_default_context(cafile=str(ca_bundle))  # this CA only, no system CAs
        except (OSError, ssl.SSLError) as exc:
            raise ClientConfigError(f"CA bundle {ca_bundle} is not a usable PEM bundle: {exc}") from exc
        if level is SecurityLevel.TLS:
            return cls(level, _verifying(context), ca_bundle)
        certificate = _required_file(environ, names.ENV_MLFLOW_CLIENT_CERT, None, level)
        try:
            context.load_cert_chain(certificate)
        except (OSError, ssl.SSLError) as exc:
            raise ClientConfigError(
                f"client certificate {certificate} ({names.ENV_MLFLOW_CLIENT_CERT}) must hold the "
                f"certificate and its unencrypted key in one PEM file: {exc}"
            ) from exc
        return cls(level, _verifying(context), ca_bundle, certificate)

    def reload(self) -> None:
        """Take up the files the loader has just rewritten, in the live context.

        New handshakes present the new certificate (`load_cert_chain` replaces it) and trust
        the bundle's CAs (`load_verify_locations` adds; a CA removed after a rollover stays
        trusted by this client until it restarts, which only widens whom it trusts as server
        during the last rollover step). Open keep-alive connections keep their handshake.
        """
        if self.ca_bundle is not None:
            self.context.load_verify_locations(cafile=str(self.ca_bundle))
        if self.client_certificate is not None:
            self.context.load_cert_chain(self.client_certificate)

    def describe(self) -> str:
        if self.level is SecurityLevel.MTLS:
            return f"client certificate {self.client_certificate}, CA bundle {self.ca_bundle}"
        if self.level is SecurityLevel.TLS:
            return f"CA bundle {self.ca_bundle}, no client certificate: the server sees an anonymous caller"
        return "plain HTTP expected; an https:// server is verified against the system trust store"


def security_level_from_environ(environ: Mapping[str, str | None]) -> SecurityLevel:
    """The level the loader exported (HOKUSAI_MTLS_SECURITY_LEVEL); unset or unknown: ClientConfigError."""
    value = (environ.get(names.ENV_SECURITY_LEVEL) or "").strip()
    if not value:
        raise ClientConfigError(
            f"{names.ENV_SECURITY_LEVEL} is not set: run the certificate loader "
            f'(`eval "$(hokusai-mtls load-certs ...)"`) before starting the service'
        )
    try:
        return SecurityLevel(value.upper())
    except ValueError:
        choices = ", ".join(level.value for level in SecurityLevel)
        raise ClientConfigError(
            f"{names.ENV_SECURITY_LEVEL}={value!r} is not a security level; expected one of {choices}"
        ) from None


def _required_file(
    environ: Mapping[str, str | None], variable: str, fallback: str | None, level: SecurityLevel
) -> Path:
    """The file named by `variable` (or `fallback`), which must exist and be readable."""
    name, value = variable, environ.get(variable)
    if not value and fallback:
        name, value = fallback, environ.get(fallback)
    if not value:
        raise ClientConfigError(f"security level {level.value} needs {variable}, which is not set")
    path = Path(value)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ClientConfigError(
            f"security level {level.value} needs {name}={path}, which cannot be read: {exc.strerror}"
        ) from exc
    return path


def _verifying(context: ssl.SSLContext) -> ssl.SSLContext:
    """Pin what `create_default_context` promises, and check it: raise, never assert (python -O)."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname:
        raise ClientConfigError("refusing an SSL context that does not verify the server and its name")
    return context


def _no_cookies() -> http.cookiejar.CookieJar:
    """A jar that accepts nothing: a service client must not carry one caller's cookies to the next."""
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def _options(tls: ClientTLS, base_url: str, httpx_options: dict, max_connections: int | None) -> dict:
    reserved = sorted(_RESERVED_OPTIONS & httpx_options.keys())
    if reserved:
        raise ValueError(
            f"{', '.join(reserved)} cannot be passed: the security level decides TLS "
            f"({names.ENV_SECURITY_LEVEL}, set by the certificate loader)"
        )
    if max_connections is not None and "limits" in httpx_options:
        raise ValueError("pass max_connections or limits, not both")
    limits = DEFAULT_LIMITS if max_connections is None else pool_limits(max_connections)
    url = httpx.URL(base_url)
    where = f"{url.scheme}://{url.netloc.decode()}" if url.scheme else "(no base URL)"  # no userinfo
    if tls.level is not SecurityLevel.INSECURE and url.scheme == "http":
        log.warning(
            "HTTP client for %s: security level %s but a plain http:// URL, so no certificate is used",
            where,
            tls.level.value,
        )
    log_at = logging.INFO if tls.level is SecurityLevel.MTLS else logging.WARNING
    log.log(log_at, "HTTP client for %s: security level %s (%s)", where, tls.level.value, tls.describe())
    return {
        "timeout": DEFAULT_TIMEOUT,
        "limits": limits,
        "cookies": _no_cookies(),
        **httpx_options,
        "base_url": base_url,
        "verify": tls.context,
    }


def create_adaptive_client(
    *,
    environ: Mapping[str, str | None] = os.environ,
    base_url: str = "",
    tls: ClientTLS | None = None,
    max_connections: int | None = None,
    **httpx_options,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` whose TLS follows the loader's security level (module docstring).

    `max_connections`: the pool's bound, every connection kept alive (`pool_limits`; default
    `DEFAULT_MAX_CONNECTIONS`). Size it to the concurrency the client will see: the API's proxy
    gets the API's own connection bound. `httpx_options` go to httpx (e.g. `timeout=`,
    `limits=` instead of `max_connections`, `headers=`); the caller owns the client and closes
    it (`await client.aclose()`) at shutdown. Pass your own `tls` (`ClientTLS.from_environ`)
    to `reload()` it after a rotation. Raises `ClientConfigError`.
    """
    tls = tls or ClientTLS.from_environ(environ)
    options = _options(tls, base_url, httpx_options, max_connections)
    if not options.get("http2"):  # ReusingPool speaks HTTP/1.1; an HTTP/2 client keeps httpx's pool
        options["transport"] = ReusingTransport(tls.context, options["limits"])
    return httpx.AsyncClient(**options)


def create_adaptive_sync_client(
    *,
    environ: Mapping[str, str | None] = os.environ,
    base_url: str = "",
    max_connections: int | None = None,
    **httpx_options,
) -> httpx.Client:
    """The blocking twin of `create_adaptive_client` (workers, scripts, health checks)."""
    tls = ClientTLS.from_environ(environ)
    return httpx.Client(**_options(tls, base_url, httpx_options, max_connections))
