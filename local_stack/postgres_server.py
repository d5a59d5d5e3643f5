"""A PostgreSQL cluster for MLflow's backend store, as the deployment has one (`postgresql://`).

ECS runs MLflow on PostgreSQL (cdk.json `mlflow.backendStoreSecretName`), so `make local` and
the tests do too when Debian's server binaries are installed (`apt-get install -y postgresql`):
a missing driver or a migration that breaks only on PostgreSQL shows up here, not in ECS.

The cluster is one directory: `data/` (initdb's) and `password` (0600, random, so a kept
cluster can be reopened). Password (SCRAM) authentication over TCP on one address, no Unix
socket. PostgreSQL refuses to run as root, so as root its commands run as the `postgres` OS
user (`runuser`), who must own the directory and be able to reach it. Two ways to run it:
`server_command()` in the foreground (the local stack supervises it like its other children)
or `pg_ctl` (tests/support/postgres.py). `wrap` prefixes the server-side commands, e.g.
`ip netns exec NS` to run inside a network namespace.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

DATABASE = "mlflow"
USER = "hokusai"
PG_BIN_ENV = "HOKUSAI_PG_BIN"
"""Directory holding initdb and postgres, when they are not in /usr/lib/postgresql/<version>/bin or PATH."""
INSTALL_HINT = f"apt-get install -y postgresql (Debian), or set {PG_BIN_ENV} to its bin directory"
SERVER_SETTINGS = (
    "unix_socket_directories=",
    "fsync=off",  # throw-away clusters: speed over durability
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=60",
)


class PostgresMissing(RuntimeError):
    """PostgreSQL's server binaries are not installed."""


def find_binaries() -> Path:
    """The directory with initdb, postgres and pg_ctl: $HOKUSAI_PG_BIN, Debian's newest, or PATH."""
    candidates = [Path(os.environ[PG_BIN_ENV])] if os.environ.get(PG_BIN_ENV) else []
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for candidate in candidates:
        if all((candidate / tool).exists() for tool in ("initdb", "postgres", "pg_ctl")):
            return candidate
    raise PostgresMissing(f"PostgreSQL server binaries (initdb, postgres, pg_ctl) not found: {INSTALL_HINT}")


def available() -> bool:
    try:
        find_binaries()
    except PostgresMissing:
        return False
    return True


def redact(text: str, password: str) -> str:
    """`text` without `password` and without the password of any `postgresql://user:password@`."""
    if password:
        text = text.replace(password, "***")
    return re.sub(r"(postgresql(?:\+\w+)?://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


class PostgresCluster:
    """One cluster in `directory`, with database `mlflow` owned by `hokusai`, listening on host:port."""

    def __init__(self, directory: Path, host: str, port: int, *, wrap: Sequence[str] = ()) -> None:
        self.directory, self.host, self.port, self.wrap = Path(directory), host, port, list(wrap)
        self.bin = find_binaries()
        self._password: str | None = None

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def password(self) -> str:
        if self._password is None:
            stored = self.directory / "password"
            kept = stored.read_text().strip() if stored.exists() else ""
            self._password = kept or secrets.token_urlsafe(18)
        return self._password

    def url(self, database: str = DATABASE) -> str:
        """The backend store URI as ECS injects it (`MLFLOW_BACKEND_STORE_URI`): it holds the password."""
        return f"postgresql://{USER}:{self.password}@{self.host}:{self.port}/{database}"

    def as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def settings(self) -> list[str]:
        return [f"listen_addresses={self.host}", f"port={self.port}", *SERVER_SETTINGS]

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def init(self, timeout: float = 120) -> None:
        """initdb (once: a kept cluster is reused) with the password, and TCP password access."""
        if self.initialized():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        password = self.password  # generated before its file exists (an empty file would be read back)
        stored = self.directory / "password"
        stored.touch(mode=0o600)
        stored.write_text(password + "\n")
        password_file = self.directory / "pwfile"
        password_file.touch(mode=0o600)
        password_file.write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
            shutil.chown(password_file, "postgres", "postgres")
        try:
            self._run(
                [
                    *self.as_owner(),
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    USER,
                    f"--pwfile={password_file}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                timeout=timeout,
            )
        finally:
            password_file.unlink(missing_ok=True)
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 0.0.0.0/0 scram-sha-256\n")  # the address it listens on; password always

    def server_command(self) -> list[str]:
        """`postgres` in the foreground (SIGTERM: smart shutdown; SIGINT: fast)."""
        options = [part for setting in self.settings() for part in ("-c", setting)]
        return [*self.wrap, *self.as_owner(), str(self.bin / "postgres"), "-D", str(self.data), *options]

    def ready(self) -> bool:
        """Accepting connections (pg_isready; no password needed for the answer)."""
        probe = self.bin / "pg_isready"
        argv = [*self.wrap, str(probe), "-q", "-h", self.host, "-p", str(self.port), "-t", "2"]
        return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0

    def create_database(self, name: str = DATABASE, *, exist_ok: bool = False) -> str:
        """A database (a test module's own backend store, or the local stack's); returns its URL."""
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain database name: {name!r}")
        argv = [
            *self.wrap,
            str(self.bin / "createdb"),
            "-w",  # never prompt for a password (it would wait on the terminal)
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            USER,
            name,
        ]
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, env=env, check=False
        )
        if result.returncode != 0 and not (exist_ok and "already exists" in result.stderr):
            raise RuntimeError(f"createdb {name}: {redact(result.stderr.strip(), self.password)}")
        return self.url(name)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, argv: list[str], *, timeout: float) -> None:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.directory
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:6])} ... exited {result.returncode}: "
                f"{redact((result.stdout + result.stderr).strip(), self.password)}"
            )
