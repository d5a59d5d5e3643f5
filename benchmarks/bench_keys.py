"""API keys from our own store (issue 14): cache-miss validation with 100,000 keys, and usage recording's cost.

Issue 14 asks `make bench` for two figures: validation p99 on a cache miss with 100,000 keys in the
store, on SQLite and on PostgreSQL (the seed: < 50 ms; our goal: <= 5 ms), and what recording each
request's usage costs the API-key path (goal: <= 5 %).

1. **validation**: one store per database, each filled with `--keys` (100,000) keys: a sample
   (`--sample`, 100) made by the real `KeyStore.create` (audited, as a user makes them), the rest
   bulk-inserted with SQLAlchemy core in batches (the same columns `KeyStore.create` writes, each
   hash `KeyHasher`'s over a key from `key_format.generate`, so every row is a key that works).
   SQLite is a file in the bench's temporary directory; PostgreSQL is Debian's server started by
   the bench (`local_stack.postgres_server.PostgresCluster`, `pg_ctl`, loopback, password auth).
   Then `KeyStoreBackend.validate(key)`, the real path the middleware takes on a cache miss (its
   thread pool, its deadline), one at a time: `--lookups` (2,000) known keys drawn at random from
   all 100,000, half as many unknown well-formed keys (one indexed query that finds nothing) and
   malformed ones (refused by the checksum, no query), in one shuffled order, the two stores taking
   turns. Every answer is checked (a known key must come back as its own id, the others as None).
   Figures: p99 in ms of known and unknown keys per database, target <= 5 ms (the goal; the seed's
   50 ms is shown beside it); malformed keys for information.
2. **usage recording**: real `hokusai-mtls serve-api` processes (the image's command, certificates
   from moto's Secrets Manager, `HOKUSAI_MTLS_KEY_STORE_URL` + `HOKUSAI_MTLS_KEY_HASH_SECRET`, the
   in-memory key cache), per database one with `HOKUSAI_MTLS_KEY_USAGE=on` and one with `off`, each
   with its own store holding one key. `--clients` (4) keep-alive httpx clients, one request in
   flight each, `GET /bench` with the key (a trivial platform app, `benchmarks/keys_app.py`: the
   API-key path is nearly all of the request), in rounds that alternate on / off after a warm-up
   round each. Figures: p50 and mean latency on / off (target <= 1.05x), and the server's CPU per
   request on / off with req/s (information: the figure other load on the machine disturbs least).
   Afterwards, with the servers stopped (which writes what their usage queues hold), the usage rows
   each store holds are counted against the requests sent, and on PostgreSQL the transactions each
   store committed (`pg_stat_database`) per request.

It reports, it does not judge: a missed target prints MISS and exits 0; non-zero only when
something fails to run (PostgreSQL not installed included; `--no-postgres` leaves it out).

    python benchmarks/bench_keys.py [--keys 100000] [--sample 100] [--lookups 2000]
        [--clients 4] [--rounds 10] [--requests 150] [--no-postgres] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import logging
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import (  # noqa: E402  (after the path set-up)
    child_env,
    figure,
    free_port,
    percentile,
    process_cpu,
    run_bench,
    secrets_with_a_set,
    stop,
)

ENVIRONMENT = "staging"
SECRET = b"bench-keys: the hashing secret, 32+ bytes"
GOAL_MS = 5.0
SEED_MS = 50.0
TARGET_RATIO = 1.05
BATCH = 5000
"""Rows per bulk insert."""
DATABASES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
KINDS = ("known", "unknown", "malformed")
CASES = ("on", "off")
PATH = "/bench"
APP = "benchmarks.keys_app:app"
WARMUP_LOOKUPS = 20


# --- PostgreSQL ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_postgres() -> Iterator:
    """Debian's PostgreSQL on 127.0.0.1 (`PostgresCluster`: initdb, password auth, no Unix socket,
    fsync off), started and stopped with pg_ctl as the tests' `tests/support/postgres.py` does; the
    cluster is deleted on exit. It lives in a directory of its own under the system's temporary
    directory: the `postgres` user (PostgreSQL runs as it when we are root) cannot enter the bench's
    own temporary directory, which is root's and 0700."""
    from local_stack.postgres_server import PostgresCluster

    directory = Path(tempfile.mkdtemp(prefix="hk-bench-pg-"))
    try:
        cluster = PostgresCluster(directory, "127.0.0.1", free_port())
        cluster.init()  # makes `directory` the postgres user's when we are root
        log = directory / "postgres.log"
        options = " ".join(f"-c {shlex.quote(s)}" for s in cluster.settings())
        pg_ctl = [*cluster.as_owner(), str(cluster.bin / "pg_ctl"), "-D", str(cluster.data)]
        started = subprocess.run(
            [*pg_ctl, "start", "-l", str(log), "-w", "-t", "60", "-o", options],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        if started.returncode != 0:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl start exited {started.returncode}: {started.stderr.strip()}\n{tail}")
        try:
            yield cluster
        finally:
            subprocess.run([*pg_ctl, "stop", "-m", "fast"], capture_output=True, timeout=60, check=False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def postgres_version() -> str | None:
    from local_stack.postgres_server import PostgresMissing, find_binaries

    try:
        binaries = find_binaries()
    except PostgresMissing:
        return None
    done = subprocess.run(
        [str(binaries / "postgres"), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout.strip().removeprefix("postgres (PostgreSQL) ") or None


def versions() -> dict[str, str | None]:
    """What decides part 1's figures besides the machine: the databases and their drivers."""
    import sqlite3
    from importlib.metadata import version

    import sqlalchemy

    return {
        "sqlite": sqlite3.sqlite_version,
        "postgresql": postgres_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": version("psycopg"),
    }


def commits(cluster, databases: list[str]) -> dict[str, int]:
    """Transactions each database has committed (PostgreSQL's own count, `pg_stat_database`)."""
    import sqlalchemy as sa

    engine = sa.create_engine(cluster.url("postgres"), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            found = connection.execute(
                sa.text("SELECT datname, xact_commit FROM pg_stat_database WHERE datname = ANY(:names)"),
                {"names": databases},
            )
            return {name: int(count) for name, count in found}
    finally:
        engine.dispose()


def store_urls(workdir: Path, cluster, name: str) -> dict[str, str]:
    """A fresh store URL per database: a SQLite file in `workdir`, a database in `cluster` (if any)."""
    urls = {"sqlite": f"sqlite:///{workdir}/{name}.db"}
    if cluster is not None:
        urls["postgresql"] = cluster.create_database(name)
    return urls


def open_store(url: str):
    from runtime.keys import migrate
    from runtime.keys.hashing import KeyHasher
    from runtime.keys.store import KeyStore

    engine = migrate.engine(url)
    migrate.upgrade(engine)
    return KeyStore(engine, KeyHasher(SECRET), environment=ENVIRONMENT)


# --- 1. validation on a cache miss ---------------------------------------------------------------------
@dataclass
class Keys:
    """The keys the stores hold: plaintext and id, the bulk rows to insert."""

    known: list[tuple[str, str]] = field(default_factory=list)  # (key, id) of every key
    rows: list[dict] = field(default_factory=list)
    generate_s: float = 0.0


def bulk_keys(count: int) -> Keys:
    """`count` keys with the rows `KeyStore.create` would write for them (hash, display prefix, ...)."""
    from runtime.keys import key_format
    from runtime.keys.hashing import KeyHasher

    hasher = KeyHasher(SECRET)
    started = time.perf_counter()
    keys = Keys()
    now = dt.datetime.now(dt.UTC)
    for index in range(count):
        key = key_format.generate(ENVIRONMENT)
        key_id = uuid.uuid4()
        keys.rows.append(
            {
                "id": key_id,
                "key_hash": hasher.digest(key),
                "key_prefix": key_format.display_prefix(key),
                "user_id": f"user-{index % 1000}",
                "name": f"bulk-{index}",
                "scopes": ["mlflow:read"],
                "created_at": now,
                "expires_at": None,
                "is_active": True,
                "rate_limit_per_hour": None,
                "allowed_ips": None,
                "rotated_from": None,
            }
        )
        keys.known.append((key, str(key_id)))
    keys.generate_s = time.perf_counter() - started
    return keys


def fill(store, keys: Keys, sample: int) -> dict:
    """`sample` keys through `KeyStore.create`, then the bulk rows in batches; timings and the count."""
    import sqlalchemy as sa

    from runtime.keys.schema import ApiKey

    started = time.perf_counter()
    created = [
        store.create(f"user-{i % 1000}", f"sample-{i}", actor="bench", scopes=["mlflow:read"])
        for i in range(sample)
    ]
    create_s = time.perf_counter() - started
    started = time.perf_counter()
    table = ApiKey.__table__
    with store.engine.begin() as connection:
        for offset in range(0, len(keys.rows), BATCH):
            connection.execute(sa.insert(table), keys.rows[offset : offset + BATCH])
    insert_s = time.perf_counter() - started
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
    return {
        "created": [(c.key, str(c.record.id)) for c in created],
        "create_s": create_s,
        "insert_s": insert_s,
        "rows": rows,
    }


def malformed_key(rng: random.Random) -> str:
    """Our prefix and length, random characters: the checksum refuses it (no query)."""
    from runtime.keys import key_format

    alphabet = key_format.ALPHABET
    while True:
        body = key_format.prefix_for(ENVIRONMENT) + "".join(
            rng.choice(alphabet) for _ in range(key_format.KEY_LENGTH - len(key_format.TEST_PREFIX))
        )
        try:
            key_format.parse(body)
        except key_format.InvalidKeyFormat:
            return body


async def time_lookups(
    backends: dict, known: dict[str, list[tuple[str, str]]], lookups: int, seed: int
) -> dict[str, dict[str, list[float]]]:
    """`lookups` known keys (each drawn at random from what that store holds), `lookups // 2` unknown and
    as many malformed ones, shuffled, every store in turn (the order flipping each step); seconds per
    store and kind. Every answer is checked."""
    from runtime.keys import key_format

    rng = random.Random(seed)  # noqa: S311 - which key to look up next, not a secret
    half = max(1, lookups // 2)
    plan = ["known"] * lookups + ["unknown"] * half + ["malformed"] * half
    rng.shuffle(plan)
    names = list(backends)
    seconds: dict[str, dict[str, list[float]]] = {n: {k: [] for k in KINDS} for n in names}

    async def one(name: str, kind: str, timed: bool) -> None:
        expected: str | None = None
        if kind == "known":
            key, expected = rng.choice(known[name])
        elif kind == "unknown":
            key = key_format.generate(ENVIRONMENT)
        else:
            key = malformed_key(rng)
        t0 = time.perf_counter()
        info = await backends[name].validate(key, request_id="bench")
        elapsed = time.perf_counter() - t0
        got = info.api_key_id if info is not None else None
        if got != expected:
            raise RuntimeError(f"{name}: a {kind} key came back as {got!r}, expected {expected!r}")
        if timed:
            seconds[name][kind].append(elapsed)

    for step in range(WARMUP_LOOKUPS):  # connections open, pages read, the threads started
        for name in names:
            await one(name, KINDS[step % len(KINDS)], timed=False)
    for step, kind in enumerate(plan):
        for name in names if step % 2 == 0 else names[::-1]:
            await one(name, kind, timed=True)
    return seconds


def ms_row(seconds: list[float]) -> dict:
    return {
        "n": len(seconds),
        "p50_ms": percentile(seconds, 50) * 1e3,
        "p99_ms": percentile(seconds, 99) * 1e3,
        "max_ms": max(seconds) * 1e3,
        "mean_ms": statistics.fmean(seconds) * 1e3,
    }


def validation(workdir: Path, cluster, args: argparse.Namespace) -> dict:
    from runtime.auth.key_store_backend import KeyStoreBackend

    sample = min(args.sample, args.keys)
    keys = bulk_keys(args.keys - sample)
    out: dict = {
        "keys": args.keys,
        "sample": sample,
        "lookups": args.lookups,
        "generate_s": keys.generate_s,
        "stores": {},
    }
    stores = {name: open_store(url) for name, url in store_urls(workdir, cluster, "bench_keys").items()}
    known: dict[str, list[tuple[str, str]]] = {}
    try:
        for name, store in stores.items():
            filled = fill(store, keys, sample)
            if filled["rows"] != args.keys:
                raise RuntimeError(f"{name}: the store holds {filled['rows']} keys, expected {args.keys}")
            known[name] = filled.pop("created") + keys.known
            out["stores"][name] = filled
        backends = {name: KeyStoreBackend(store) for name, store in stores.items()}
        try:
            seconds = asyncio.run(time_lookups(backends, known, args.lookups, seed=14))
        finally:
            for backend in backends.values():
                asyncio.run(backend.aclose())
    finally:
        for store in stores.values():
            store.engine.dispose()
    for name, by_kind in seconds.items():
        out["stores"][name]["kinds"] = {kind: ms_row(values) for kind, values in by_kind.items()}
    return out


# --- 2. usage recording on and off -------------------------------------------------------------------
@dataclass
class ApiServer:
    database: str
    usage: str
    url: str
    key: str
    process: subprocess.Popen
    log: Path
    store_url: str
    startup_s: float = 0.0


@contextlib.contextmanager
def running_apis(workdir: Path, cluster) -> Iterator[dict[tuple[str, str], ApiServer]]:
    """serve-api per database and usage setting, each on its own store with one key; stopped on exit."""
    from moto.server import ThreadedMotoServer

    from local_stack.environment import container_command, service_environment, wait_healthy
    from runtime import names

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every call
    stack = contextlib.ExitStack()
    servers: dict[tuple[str, str], ApiServer] = {}
    try:
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        stack.callback(moto.stop)
        endpoint, _files = secrets_with_a_set(moto, ENVIRONMENT, workdir / "client")
        for usage in CASES:
            for database, url in store_urls(workdir, cluster, f"bench_usage_{usage}").items():
                store = open_store(url)
                try:
                    key = store.create("bench", f"usage-{usage}", actor="bench").key
                finally:
                    store.engine.dispose()
                port = free_port()
                env = service_environment(
                    ENVIRONMENT,
                    endpoint,
                    base=child_env(),  # the checkout on PYTHONPATH: HOKUSAI_API_APP is in benchmarks/
                    **{
                        names.ENV_CERT_DIR: str(workdir / f"certs-{database}-{usage}"),
                        names.ENV_INTERNAL_CIDRS: "10.0.0.0/8",  # loopback is an external caller
                        names.ENV_METRICS_SECONDS: "60",
                        names.ENV_KEY_STORE_URL: url,
                        names.ENV_KEY_HASH_SECRET: base64.b64encode(SECRET).decode(),
                        names.ENV_KEY_USAGE: usage,
                        "HOKUSAI_API_APP": APP,
                        "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{free_port()}",  # never called
                    },
                )
                log = workdir / f"api-{database}-{usage}.log"
                with log.open("w") as output:
                    process = subprocess.Popen(
                        [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(port)],
                        cwd=ROOT,
                        env=env,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                stack.callback(stop, process)
                servers[(database, usage)] = ApiServer(
                    database, usage, f"http://127.0.0.1:{port}", key, process, log, url
                )
        started = time.monotonic()
        for server in servers.values():  # they start side by side
            wait_healthy(server.process, int(server.url.rsplit(":", 1)[1]), server.log, seconds=120)
            server.startup_s = time.monotonic() - started
        yield servers
    finally:
        stack.close()


async def drive(servers: dict[tuple[str, str], ApiServer], clients: int, rounds: int, requests: int) -> dict:
    """Per database: `rounds` rounds per usage setting, alternating (the order flipping every round),
    each `clients` keep-alive callers x `requests` calls; latencies, req/s and server CPU per round."""
    import httpx

    callers = {
        key: httpx.AsyncClient(
            base_url=server.url,
            headers={"X-API-Key": server.key},
            limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
            timeout=httpx.Timeout(30.0),
        )
        for key, server in servers.items()
    }
    sent = dict.fromkeys(servers, 0)

    async def one_round(key: tuple[str, str], per_client: int) -> tuple[list[float], float, float]:
        client, pid = callers[key], servers[key].process.pid

        async def caller() -> list[float]:
            seconds = []
            for _ in range(per_client):
                t0 = time.perf_counter()
                response = await client.get(PATH)
                seconds.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    raise RuntimeError(f"{key}: {response.status_code} {response.text[:300]}")
            return seconds

        cpu = process_cpu(pid)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(caller() for _ in range(clients)))
        wall = time.perf_counter() - t0
        cpu = process_cpu(pid) - cpu
        sent[key] += clients * per_client
        return [s for one in results for s in one], wall, cpu

    databases = list(dict.fromkeys(database for database, _ in servers))
    measured: dict = {
        d: {c: {"seconds": [], "wall": 0.0, "cpu": 0.0, "round_p50_ms": []} for c in CASES} for d in databases
    }
    try:
        for key in servers:  # warm-up: connections open, the key's answer in each server's cache
            await one_round(key, 3)
        for index in range(rounds):
            for database in databases:
                for case in CASES if index % 2 == 0 else CASES[::-1]:
                    got, wall, cpu = await one_round((database, case), requests)
                    row = measured[database][case]
                    row["seconds"] += got
                    row["wall"] += wall
                    row["cpu"] += cpu
                    row["round_p50_ms"].append(percentile(got, 50) * 1e3)
    finally:
        for client in callers.values():
            await client.aclose()
    out: dict = {}
    for database, by_case in measured.items():
        rows = {}
        for case, row in by_case.items():
            n = len(row["seconds"])
            rows[case] = {
                **ms_row(row["seconds"]),
                "requests_per_s": n / row["wall"],
                "server_cpu_ms_per_request": row["cpu"] / n * 1e3,
                "round_p50_ms": row["round_p50_ms"],
                "requests_sent": sent[(database, case)],
            }
        on, off = rows["on"], rows["off"]
        out[database] = {
            "rows": rows,
            "p50_ratio": on["p50_ms"] / off["p50_ms"],
            "mean_ratio": on["mean_ms"] / off["mean_ms"],
            "rps_ratio": on["requests_per_s"] / off["requests_per_s"],
            "cpu_ratio": on["server_cpu_ms_per_request"] / off["server_cpu_ms_per_request"]
            if off["server_cpu_ms_per_request"]
            else 0.0,
        }
    return out


def usage_rows(url: str) -> int | None:
    """Rows in the store's usage table (None if it cannot be read)."""
    import sqlalchemy as sa

    from runtime.keys import migrate
    from runtime.keys.schema import ApiKeyUsage

    engine = migrate.engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).select_from(ApiKeyUsage.__table__)
            ).scalar_one()
    except sa.exc.SQLAlchemyError:
        return None
    finally:
        engine.dispose()


def usage_cost(workdir: Path, cluster, args: argparse.Namespace) -> dict:
    pg_databases = {case: f"bench_usage_{case}" for case in CASES} if cluster is not None else {}
    with running_apis(workdir, cluster) as servers:
        before = commits(cluster, list(pg_databases.values())) if pg_databases else {}
        started = time.monotonic()
        result = asyncio.run(drive(servers, args.clients, args.rounds, args.requests))
        timed = time.monotonic() - started
        for server in servers.values():
            stop(server.process)  # SIGTERM: the usage writer writes what is queued
        exits = {f"{s.database}/{s.usage}": s.process.returncode for s in servers.values()}
        startup = max(s.startup_s for s in servers.values())
        for (database, usage), server in servers.items():
            result[database]["rows"][usage]["usage_rows"] = usage_rows(server.store_url)
        if pg_databases:
            time.sleep(0.5)  # the servers' backends end (and count their last transactions) after they do
            after = commits(cluster, list(pg_databases.values()))
            for case, name in pg_databases.items():
                row = result["postgresql"]["rows"][case]
                row["store_commits"] = after.get(name, 0) - before.get(name, 0)
    bad = {name: code for name, code in exits.items() if code != 0}
    if bad:
        raise RuntimeError(f"serve-api exited {bad}")
    return {
        "clients": args.clients,
        "rounds": args.rounds,
        "requests_per_client": args.requests,
        "startup_s": startup,
        "timed_s": timed,
        "databases": result,
    }


def measure(workdir: Path, args: argparse.Namespace) -> dict:
    with contextlib.ExitStack() as stack:
        cluster = None
        started = time.monotonic()
        if not args.no_postgres:
            cluster = stack.enter_context(running_postgres())
        postgres_s = time.monotonic() - started
        started = time.monotonic()
        checked = validation(workdir, cluster, args)
        checked["seconds"] = time.monotonic() - started
        started = time.monotonic()
        usage = usage_cost(workdir, cluster, args)
        usage["seconds"] = time.monotonic() - started
        return {"versions": versions(), "postgres_start_s": postgres_s, "validation": checked, "usage": usage}


# --- the report -----------------------------------------------------------------------------------------
def figures(report: dict) -> list[dict]:
    r = report["result"]
    v, u = r["validation"], r["usage"]
    out = []
    target = f"<= {GOAL_MS:g} ms (goal; seed: < {SEED_MS:g} ms)"
    for database, measured in v["stores"].items():
        label = DATABASES[database]
        for kind in KINDS:
            row = measured["kinds"][kind]
            out.append(
                figure(
                    f"cache-miss validation p99 (ms), {kind} key, {v['keys']:,} keys, {label}",
                    round(row["p99_ms"], 3),
                    f"p50 {row['p50_ms']:.2f} ms, max {row['max_ms']:.2f} ms, n={row['n']}",
                    at_most=GOAL_MS if kind != "malformed" else None,
                    unit="",
                    target=target if kind != "malformed" else "(information: no query)",
                )
            )
    for database, measured in u["databases"].items():
        label = DATABASES[database]
        on, off = measured["rows"]["on"], measured["rows"]["off"]
        out.append(
            figure(
                f"API-key request p50, usage recording on / off, {label}",
                measured["p50_ratio"],
                f"{on['p50_ms']:.2f} ms vs {off['p50_ms']:.2f} ms, n={on['n']} each, {u['clients']} clients",
                at_most=TARGET_RATIO,
            )
        )
        out.append(
            figure(
                f"API-key request mean, usage recording on / off, {label}",
                measured["mean_ratio"],
                f"{on['mean_ms']:.2f} ms vs {off['mean_ms']:.2f} ms (p99 {on['p99_ms']:.1f} vs {off['p99_ms']:.1f} ms)",
                at_most=TARGET_RATIO,
            )
        )
        out.append(
            figure(
                f"server CPU per API-key request, usage recording on / off, {label}",
                measured["cpu_ratio"],
                f"{on['server_cpu_ms_per_request']:.2f} vs {off['server_cpu_ms_per_request']:.2f} ms; "
                f"{on['requests_per_s']:.0f} vs {off['requests_per_s']:.0f} req/s",
            )
        )
    return out


def usage_rows_text(row: dict) -> str:
    rows = row.get("usage_rows")
    return "unreadable" if rows is None else f"{rows} of {row['requests_sent']}"


def commits_text(row: dict) -> str:
    """PostgreSQL's committed transactions in the server's store per request sent, or '-'."""
    if "store_commits" not in row:
        return "-"
    return f"{row['store_commits'] / row['requests_sent']:.2f}"


def fill_text(v: dict, measured: dict) -> str:
    bulk = v["keys"] - v["sample"]
    return (
        f"{v['sample']} keys by KeyStore.create in {measured['create_s']:.2f} s, {bulk:,} bulk rows in "
        f"{measured['insert_s']:.2f} s ({bulk / max(measured['insert_s'], 1e-9):,.0f} rows/s)"
    )


def print_report(report: dict) -> None:
    info, r = report["machine"], report["result"]
    v, u, versions_ = r["validation"], r["usage"], r["versions"]
    out = [
        f"hokusai-mtls API keys from our store, {report['date']}",
        f"machine: {info['cpu']}, {info['cores']} cores; {info['kernel']}; Python {info['python']} "
        f"({info['python_ssl']}); uvicorn {info['uvicorn']}",
        f"SQLite {versions_['sqlite']}, PostgreSQL {versions_['postgresql'] or '(not installed)'}, "
        f"SQLAlchemy {versions_['sqlalchemy']}, psycopg {versions_['psycopg']}",
        "",
        f"1. validation on a cache miss (KeyStoreBackend.validate, one at a time), {v['keys']:,} keys per store "
        f"({v['generate_s']:.1f} s to generate and hash the bulk keys)",
    ]
    if "postgresql" in v["stores"]:
        out.append(f"   PostgreSQL initialised and started in {r['postgres_start_s']:.1f} s")
    out += [f"   {DATABASES[d]}: {fill_text(v, m)}" for d, m in v["stores"].items()]
    out.append(f"   {'store/kind':<24} {'n':>6} {'p50':>9} {'p99':>9} {'max':>9} {'mean':>9}")
    for database, measured in v["stores"].items():
        for kind, row in measured["kinds"].items():
            out.append(
                f"   {database + '/' + kind:<24} {row['n']:>6} {row['p50_ms']:>7.3f}ms {row['p99_ms']:>7.3f}ms "
                f"{row['max_ms']:>7.3f}ms {row['mean_ms']:>7.3f}ms"
            )
    out += [
        "",
        f"2. usage recording on vs off: serve-api per database and setting (healthy after {u['startup_s']:.1f} s), "
        f"{u['clients']} keep-alive clients x {u['requests_per_client']} requests x {u['rounds']} rounds per case, "
        f"GET {PATH} with a key; timed part {u['timed_s']:.0f} s",
        f"   {'database/usage':<16} {'n':>6} {'p50':>9} {'p99':>9} {'mean':>9} {'req/s':>6} {'CPU/req':>9} "
        f"{'usage rows':>12} {'commits/req':>11}  round p50s (ms)",
    ]
    for database, measured in u["databases"].items():
        for case, row in measured["rows"].items():
            rounds = ", ".join(f"{x:.2f}" for x in row["round_p50_ms"])
            out.append(
                f"   {database + '/' + case:<16} {row['n']:>6} {row['p50_ms']:>7.2f}ms {row['p99_ms']:>7.2f}ms "
                f"{row['mean_ms']:>7.2f}ms {row['requests_per_s']:>6.0f} {row['server_cpu_ms_per_request']:>7.2f}ms "
                f"{usage_rows_text(row):>12} {commits_text(row):>11}  {rounds}"
            )
    out.append("")
    for f in report["figures"]:
        value = f"{f['value']:.3f}{f['unit']}"
        out.append(f"{f['name']:<70} {value:>8}  ({f['detail']})  target {f['target']}: {f['verdict']}")
    out.append(
        f"other processes on this machine used {report['others_cores']:.2f} cores on average meanwhile"
    )
    sys.stdout.write("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="keys in each store (default 100,000)")
    parser.add_argument(
        "--sample", type=int, default=100, help="of which made by KeyStore.create (default 100)"
    )
    parser.add_argument(
        "--lookups", type=int, default=2000, help="known keys looked up per store (default 2000)"
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent keep-alive clients (default 4)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per usage setting (default 10)")
    parser.add_argument(
        "--requests", type=int, default=150, help="requests per client per round (default 150)"
    )
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only (no PostgreSQL server)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)
    if min(args.keys, args.lookups, args.clients, args.rounds, args.requests) < 1 or args.sample < 0:
        parser.error(
            "--keys, --lookups, --clients, --rounds and --requests must be at least 1, --sample 0 or more"
        )
    report: dict = {"date": dt.date.today().isoformat(), "args": vars(args)}
    return run_bench("keys", report, lambda tmp: measure(tmp, args), figures, print_report, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
