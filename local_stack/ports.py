"""Free TCP ports on 127.0.0.1 for servers started by the local stack, tests and benchmarks."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; bind soon, another process may too)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
