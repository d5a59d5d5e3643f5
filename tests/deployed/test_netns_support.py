"""tests/support/netns.py itself: isolation, name resolution, and a teardown that leaves nothing."""

from __future__ import annotations

import os
import socket

import pytest

from tests.support.netns import NetnsUnavailable, Network, require_netns

pytestmark = [pytest.mark.deployed]


@pytest.fixture
def root_required():
    try:
        require_netns()
    except NetnsUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


def open_then_fail(network: Network) -> None:
    network.open({"a": 10, "b": 11})
    assert network.leftovers(), "created"
    raise RuntimeError("boom")


def test_a_failed_run_still_removes_every_namespace_link_and_hosts_file(root_required):
    network = Network(hosts={"svc.test": "a"})
    try:
        with pytest.raises(RuntimeError, match="boom"):
            open_then_fail(network)
    finally:
        network.close()
    assert network.leftovers() == []


def test_names_resolve_in_processes_and_sockets_of_call_live_in_the_namespace(root_required):
    network = Network(hosts={"svc.test": "a"})
    try:
        network.open({"a": 10, "b": 11})
        a, b = network["a"], network["b"]
        assert b.run(["getent", "hosts", "svc.test"]).stdout.split()[0] == a.address

        def addresses() -> set[str]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((b.address, 9))  # no packet: only picks the source address
                return probe.getsockname()[0]

        assert a.call(addresses) == a.address
        with socket.create_server(("127.0.0.1", 0)) as listener:  # the root namespace's loopback
            port = listener.getsockname()[1]
            with pytest.raises(ConnectionRefusedError):  # b's loopback is b's own
                b.call(lambda: socket.create_connection(("127.0.0.1", port), timeout=2))
    finally:
        network.close()
    assert network.leftovers() == []


def test_without_root_the_reason_is_named(monkeypatch):
    """The fixtures turn this into a failure (pytest.fail), never a skip."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsUnavailable, match="must run as root"):
        require_netns()
