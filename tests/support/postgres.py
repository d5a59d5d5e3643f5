"""A real PostgreSQL server for MLflow's backend store, started and stopped by a test fixture.

The production backend store is `postgresql://...`, so the tests that claim "MLflow works as
deployed" run it on Debian's PostgreSQL (`local_stack.postgres_server.PostgresCluster`: initdb,
password auth, one TCP address), started with `pg_ctl` (optionally inside a network namespace:
`wrap=["ip", "netns", "exec", NS]`). The cluster lives in a temporary directory outside
pytest's (which is 0700 to root, and PostgreSQL runs as the `postgres` user when we are root)
and is deleted by `stop()`.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from local_stack.postgres_server import (
    DATABASE,
    INSTALL_HINT,
    PostgresCluster,
    PostgresMissing,
    find_binaries,
    redact,
)

__all__ = ["DATABASE", "INSTALL_HINT", "PostgresMissing", "PostgresServer", "find_binaries", "redact"]


class PostgresServer:
    """One throw-away cluster with database `mlflow`, owned by user `hokusai` with a random password."""

    def __init__(self, host: str, port: int, *, wrap: Sequence[str] = ()) -> None:
        self.host, self.port, self.wrap = host, port, list(wrap)
        self.cluster: PostgresCluster | None = None

    @property
    def password(self) -> str:
        return self.cluster.password if self.cluster else ""

    @property
    def log(self) -> Path:
        return self.cluster.directory / "postgres.log"

    def url(self, database: str = DATABASE) -> str:
        return self.cluster.url(database)

    def create_database(self, name: str) -> str:
        return self.cluster.create_database(name)

    def log_tail(self, characters: int = 2000) -> str:
        if self.cluster is None or not self.log.exists():
            return ""
        return redact(self.log.read_text(errors="replace")[-characters:], self.password)

    def start(self, timeout: float = 60) -> None:
        directory = Path(tempfile.mkdtemp(prefix="hk-pg-"))
        self.cluster = PostgresCluster(directory, self.host, self.port, wrap=self.wrap)
        self.cluster.init(timeout)
        options = " ".join(f"-c {shlex.quote(setting)}" for setting in self.cluster.settings())
        started = subprocess.run(
            [
                *self.wrap,
                *self.cluster.as_owner(),
                str(self.cluster.bin / "pg_ctl"),
                "start",
                "-D",
                str(self.cluster.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(int(timeout)),
                "-o",
                options,
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            check=False,
        )
        if started.returncode != 0:
            raise RuntimeError(
                f"pg_ctl start exited {started.returncode}: {started.stderr}\n{self.log_tail()}"
            )
        self.cluster.create_database(DATABASE)

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions), then delete the cluster."""
        if self.cluster is None:
            return
        try:
            if (self.cluster.data / "postmaster.pid").exists():
                subprocess.run(
                    [
                        *self.cluster.as_owner(),
                        str(self.cluster.bin / "pg_ctl"),
                        "stop",
                        "-D",
                        str(self.cluster.data),
                        "-m",
                        "fast",
                    ],
                    capture_output=True,
                    timeout=40,
                    check=False,
                )
        finally:
            self.cluster.remove()
            self.cluster = None
