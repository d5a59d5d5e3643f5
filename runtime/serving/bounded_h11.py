"""uvicorn's h11 protocol with the timeouts it lacks: headers, body, and a stalled reader.

uvicorn 0.54's `H11Protocol` has one timer, `timeout_keep_alive`, armed after a response and
cancelled by ANY received byte (`data_received` -> `_unset_keepalive_if_required`). So a
connection that sends nothing before its first request, half a request, or a byte every few
seconds is held for ever, and so is one whose client stops reading a response. This subclass adds
(settings: `runtime.serving.connection_limits.ConnectionLimits`):

- a header timer: from the connection (or, on a kept-alive connection, the first byte of the next
  request) until the request's headers are complete. It is a deadline, not an idle timer:
  trickled bytes do not extend it (nginx's `client_header_timeout`). On expiry a client that sent
  part of a request gets `408 Request Timeout`; then the connection is closed;
- a body idle timer: while the request body is being read, no byte for `body_idle_timeout`
  closes the connection, and the app's `receive()` sees `http.disconnect`. Time the client cannot
  send is not counted: reading paused because the app has not read what arrived, or a client
  waiting for `100 Continue` the app has not asked for yet;
- a drain timer: while bytes of a response wait in the transport's buffer (the client does not
  read: the buffer went over its high-water mark, or the response is complete, or the connection
  is closing, whose `close()` would otherwise wait for the buffer for ever), `body_idle_timeout`
  without the buffer shrinking at all aborts the connection. A slow reader of a big response
  drains it and is left alone (if uvicorn's keep-alive timer closes the connection meanwhile, the
  close still delivers the rest). For TLS the buffer seen is the TLS layer's, and a TLS connection
  being closed is bounded by asyncio's 30 s TLS shutdown timeout as well.

The app's own time is never counted: once the request is read, only the keep-alive timer (after
the response) runs. Timers are `loop.call_later` handles, at most one of each per connection,
re-armed lazily (a byte records the time; the timer re-checks when it fires), and cancelled in
`connection_lost`. A keep-alive request that arrives whole in one read arms no timer at all.

The class depends on uvicorn internals (`conn`, `cycle`, `flow`, `timeout_keep_alive_task`,
`on_response_complete`): the uvicorn range is pinned and tests/integration exercises it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from runtime.serving.connection_limits import ConnectionLimits

log = logging.getLogger("hokusai_mtls")

REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 15\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"Request Timeout"
)


class Slot:
    """A place in a listener's connection bound; `release` gives it back, once."""

    __slots__ = ("_release",)

    def __init__(self, release) -> None:
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class BoundedH11Protocol(H11Protocol):
    """`H11Protocol` with header, body-idle and drain timeouts; see the module docstring."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    """This listener's limits; `with_limits` makes a subclass with others."""

    # Slots, not instance attributes: 7 more keys in uvicorn's instance dict would take it past
    # CPython's key-sharing limit and cost about 1.3 KiB per connection.
    __slots__ = (
        "_body_activity",
        "_body_timer",
        "_header_started",
        "_header_timer",
        "_write_mark",
        "_write_timer",
        "opened_at",
        "slot",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn annotates `timeout_keep_alive` as int (its Config's type); it only goes to
        # `loop.call_later`, which takes seconds as a float.
        self.timeout_keep_alive = self.limits.keepalive_timeout  # type: ignore[assignment]
        # Set by the acceptor: the bound's slot (released when the connection is lost) and, for
        # plain connections, when the header clock of the first request starts (the accept).
        self.slot: Slot | None = None
        self.opened_at: float | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_started: float | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_activity = 0.0
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_mark = 0

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[BoundedH11Protocol]:
        return type(cls.__name__, (cls,), {"limits": limits})

    # --- uvicorn's protocol interface ----------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_started = self.opened_at if self.opened_at is not None else self.loop.time()
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:
            self._body_activity = self.loop.time()
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()
        self._watch_drain()  # also when the response closed the connection: a close waits for the buffer

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)
        self._unset_keepalive_if_required()  # uvicorn leaves it armed when the connection failed
        if self.slot is not None:
            self.slot.release()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        """Hand the connection to the WebSocket protocol (a listener with `websockets=True`): our
        timers stop (a WebSocket is long-lived; its own pings bound a dead peer) and the connection
        bound's slot goes with it, released when the WebSocket's connection is lost."""
        self._cancel_header_timer()
        self._cancel_body_timer()
        self._cancel_write_timer()
        super().handle_websocket_upgrade(event)
        slot, self.slot = self.slot, None
        successor = self.transport.get_protocol()
        if slot is not None:
            if hasattr(successor, "slot"):
                successor.slot = slot
            else:  # a WebSocket protocol of uvicorn's own: release when the transport goes
                slot.release()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_drain()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_timer()

    # --- which timer runs ------------------------------------------------------------------------
    def _watch(self) -> None:
        """Arm or cancel the header and body timers for the state h11 is in now."""
        if self.transport is None or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # waiting for a request line and headers
            self._cancel_body_timer()
            if self._header_timer is not None:
                return
            if self._header_started is None:
                if self.timeout_keep_alive_task is not None:
                    return  # an idle kept-alive connection: uvicorn's keep-alive timer runs
                self._header_started = self.loop.time()  # the next request's first byte
            delay = max(0.0, self._header_started + self.limits.header_timeout - self.loop.time())
            self._header_timer = self.loop.call_later(delay, self._header_timed_out)
            return
        self._cancel_header_timer()
        self._header_started = None
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_activity = self.loop.time()
                self._body_timer = self.loop.call_later(self.limits.body_idle_timeout, self._body_check)
        else:
            self._cancel_body_timer()

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial, _ = self.conn.trailing_data
        log.debug("closing %s: no complete request headers in %gs", self.client, self.limits.header_timeout)
        if partial:
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()
        self._watch_drain()

    def _body_check(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._body_activity = now  # the client cannot send: we are not reading, or it awaits 100
        idle = now - self._body_activity
        if idle < self.limits.body_idle_timeout:
            self._body_timer = self.loop.call_later(self.limits.body_idle_timeout - idle, self._body_check)
            return
        log.debug("closing %s: no request body byte in %gs", self.client, self.limits.body_idle_timeout)
        self.transport.close()  # connection_lost tells the app: its receive() returns http.disconnect

    def _watch_drain(self) -> None:
        """While bytes wait for the client, it must take some every `body_idle_timeout`."""
        if self._write_timer is None and self.transport.get_write_buffer_size():
            self._write_mark = self.transport.get_write_buffer_size()
            self._write_timer = self.loop.call_later(self.limits.body_idle_timeout, self._drain_check)

    def _drain_check(self) -> None:
        self._write_timer = None
        buffered = self.transport.get_write_buffer_size()
        if not buffered:
            return
        if buffered < self._write_mark:  # the client reads, slowly: a big response drains for a while
            self._write_mark = buffered
            self._write_timer = self.loop.call_later(self.limits.body_idle_timeout, self._drain_check)
            return
        log.debug("aborting %s: the client read nothing in %gs", self.client, self.limits.body_idle_timeout)
        self.transport.abort()  # close() would wait for the buffer, for ever

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
