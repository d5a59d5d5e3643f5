"""The connection timeouts and bound: defaults, parsing, refusal of bad values, and the protocol's timers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from runtime import cli, names
from runtime.serving.bounded_h11 import BoundedH11Protocol
from runtime.serving.connection_limits import (
    API_LIMITS,
    MLFLOW_LIMITS,
    ConnectionLimits,
    api_limits,
    mlflow_limits,
)

VARIABLES = (
    names.ENV_HEADER_TIMEOUT_SECONDS,
    names.ENV_BODY_IDLE_TIMEOUT_SECONDS,
    names.ENV_KEEPALIVE_TIMEOUT_SECONDS,
    names.ENV_HANDSHAKE_TIMEOUT_SECONDS,
)


def test_the_documented_defaults():
    assert mlflow_limits({}) == MLFLOW_LIMITS == ConnectionLimits(10, 30, 5, 10, 4096)
    assert api_limits({}) == API_LIMITS


def test_the_api_keeps_connections_alive_longer_than_the_albs_idle_timeout():
    alb_default_idle_timeout = 60
    assert api_limits({}).keepalive_timeout > alb_default_idle_timeout


def test_every_variable_is_read():
    environ = {
        names.ENV_HEADER_TIMEOUT_SECONDS: "1.5",
        names.ENV_BODY_IDLE_TIMEOUT_SECONDS: "2",
        names.ENV_KEEPALIVE_TIMEOUT_SECONDS: " 75 ",
        names.ENV_HANDSHAKE_TIMEOUT_SECONDS: "3",
        names.ENV_MAX_CONNECTIONS: "100",
    }
    assert api_limits(environ) == ConnectionLimits(1.5, 2, 75, 3, 100)
    assert mlflow_limits({names.ENV_KEEPALIVE_TIMEOUT_SECONDS: ""}).keepalive_timeout == 5  # empty: default


@pytest.mark.parametrize("variable", VARIABLES)
@pytest.mark.parametrize("raw", ["abc", "0", "-1", "nan", "inf", "1e9", "10s"])
def test_a_bad_timeout_names_its_variable(variable, raw):
    with pytest.raises(ValueError, match=f"^{variable}=") as caught:
        mlflow_limits({variable: raw})
    assert "seconds" in str(caught.value)


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "1.5", "2000000"])
def test_a_bad_bound_names_its_variable(raw):
    with pytest.raises(ValueError, match=f"^{names.ENV_MAX_CONNECTIONS}=.*whole number"):
        api_limits({names.ENV_MAX_CONNECTIONS: raw})


@pytest.mark.parametrize("command", ["serve-api", "serve-mlflow"])
def test_the_servers_exit_1_with_the_variable_named_and_no_traceback(command, monkeypatch, capsys):
    monkeypatch.setenv(names.ENV_HEADER_TIMEOUT_SECONDS, "ten")
    assert cli.main([command]) == 1
    err = capsys.readouterr().err
    assert (
        f"hokusai-mtls: error [invalid-value]: {names.ENV_HEADER_TIMEOUT_SECONDS}='ten': expected a number of seconds"
        in err
    )
    assert "Traceback" not in err


def test_the_soft_open_file_limit_is_raised_to_the_hard_limit(monkeypatch, caplog):
    import resource

    from runtime.serving import server as serving

    limits = {"soft": 1024, "hard": 65536}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (limits["soft"], limits["hard"]))

    def setrlimit(_, value):
        limits["soft"] = value[0]

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    caplog.set_level(logging.INFO, logger="hokusai_mtls")
    room = serving._raise_open_file_limit()
    assert limits["soft"] == 65536
    assert 60000 < room < 65536
    assert any("raised from 1024 to the hard limit 65536" in r.getMessage() for r in caplog.records)


# --- the protocol's timers, without a network ----------------------------------------------------------
class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False
        self.written = b""
        self.buffered = 0

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def write(self, data) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def protocol_on(loop: asyncio.AbstractEventLoop, limits: ConnectionLimits) -> BoundedH11Protocol:
    import uvicorn
    from uvicorn.server import ServerState

    async def app(scope, receive, send):  # pragma: no cover - never called here
        raise AssertionError

    config = uvicorn.Config(
        app, http=BoundedH11Protocol.with_limits(limits), interface="asgi3", log_config=None
    )
    config.load()
    return config.http_protocol_class(config=config, server_state=ServerState(), app_state={}, _loop=loop)


def drain(loop: asyncio.AbstractEventLoop, protocol: BoundedH11Protocol) -> None:
    """Cancel the app tasks the requests started (the loop never ran them)."""
    tasks = list(protocol.tasks)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def test_no_timer_outlives_its_connection():
    loop = asyncio.new_event_loop()
    try:
        protocol = protocol_on(loop, ConnectionLimits(header_timeout=100, body_idle_timeout=100))
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"POST / HTTP/1.1\r\nhost: x\r\n")  # half the headers: the header timer
        header_timer = protocol._header_timer
        assert header_timer is not None
        protocol.data_received(b"content-length: 10\r\n\r\n12345")  # headers done: the body timer
        assert header_timer.cancelled() and protocol._header_timer is None
        body_timer = protocol._body_timer
        assert body_timer is not None
        transport.buffered = 100_000  # the client does not read
        protocol.pause_writing()
        write_timer = protocol._write_timer
        assert write_timer is not None
        protocol.connection_lost(None)
        assert body_timer.cancelled() and write_timer.cancelled()
        assert (protocol._header_timer, protocol._body_timer, protocol._write_timer) == (None, None, None)
        drain(loop, protocol)
    finally:
        loop.close()


def test_the_header_deadline_is_not_moved_by_trickled_bytes():
    loop = asyncio.new_event_loop()
    try:
        protocol = protocol_on(loop, ConnectionLimits(header_timeout=100))
        protocol.connection_made(FakeTransport())
        first = protocol._header_timer
        deadline = first.when()
        for byte in b"GET / HTTP/1.1\r\nx: ":
            protocol.data_received(bytes([byte]))
        assert protocol._header_timer is first and first.when() == deadline
        protocol.connection_lost(None)
        assert first.cancelled()
    finally:
        loop.close()


def test_a_keep_alive_request_that_arrives_whole_arms_no_timer():
    loop = asyncio.new_event_loop()
    try:
        protocol = protocol_on(loop, ConnectionLimits())
        protocol.connection_made(FakeTransport())
        protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (protocol._header_timer, protocol._body_timer) == (None, None)
        protocol.connection_lost(None)
        drain(loop, protocol)
    finally:
        loop.close()
