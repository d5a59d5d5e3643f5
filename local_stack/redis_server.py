"""A real `redis-server` (Debian's package) on 127.0.0.1 and a free port, without persistence.

Tests that need Redis fail, with the fix in the message, when redis-server is not installed:
a skip would let a machine without it pass the suite without ever testing the Redis paths.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from local_stack.ports import free_port

INSTALL_HINT = "redis-server is not installed: apt-get install -y redis-server (.ci/run does it)"


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    def command(self) -> list[str]:
        """redis-server on 127.0.0.1:`self.port`, no persistence; RuntimeError (the apt-get hint) if missing."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError(INSTALL_HINT)
        return [
            executable,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log_file),
        ]  # fmt: skip

    def start(self, timeout: float = 10) -> None:
        for _attempt in range(3):  # another process may take the free port before redis binds it
            self.port = free_port()
            self._process = subprocess.Popen(
                self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._process.poll() is None:
                if self.answers():
                    return
                time.sleep(0.05)
            self.stop()
        log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
        raise RuntimeError(f"redis-server did not start on 127.0.0.1; its log ends:\n{log}")

    def answers(self) -> bool:
        """PING answered on 127.0.0.1:`self.port`."""
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def flush(self) -> None:
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5) as client:
            client.flushall()

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        self._process = None
