"""Ours against the sidecar an ECS user would otherwise run: nginx terminating mTLS before `mlflow server`.

Issue 13. Without this project, mutual TLS for MLflow on ECS means a sidecar: nginx (or Envoy)
verifying client certificates and proxying to a plain `mlflow server`. Both sides run here on
the same machine, with the same certificate set and the same worker count N (`--workers`,
default: the machine's CPUs), each with its own fresh SQLite store in /dev/shm:

  ours     `hokusai-mtls serve-mlflow`, strict mode (mTLS only), certificates from moto's
           Secrets Manager (`benchmarks.common.running_mlflow`), `HOKUSAI_MTLS_WORKERS=N`;
  sidecar  Debian's nginx (`worker_processes N`, `ssl_verify_client on`, the CA bundle, the
           same server certificate and key) proxying over kept-alive upstream connections
           (`keepalive 32`, HTTP/1.1) to `mlflow server ... --workers N` on another loopback port.

Each side's server CPU is its whole process tree's (`benchmarks.common.tree_cpu`): ours = the
server and every process it starts; sidecar = nginx's master and workers + `mlflow server`'s
tree (uvicorn's workers, MLflow's job runner and its huey consumers; ours runs that job runner
too). The call is MLflow's cheap `GET experiments/get?experiment_id=0`, as the API service's
certificate. Figures, ours / sidecar, each against a target:

  1. keep-alive p50: one kept-alive mTLS connection, one request at a time   (<= 1.0x)
  2. new-connection p50: TCP + full mTLS handshake (no resumption) + the call, then close (<= 1.0x)
  3. server CPU per full handshake: a loop of handshakes that end with close_notify, no request,
     the tree's CPU over the loop / handshakes                                 (<= 1.0x)
  4. requests/s at `--clients` (32) concurrent keep-alive clients for `--seconds` (>= 1.0x): the
     load generator is this process (asyncio, one request in flight per connection) on the SAME
     cores as the servers; the report says how many cores it used.
  plus memory (RSS and PSS of each tree) for information.

Honesty checks: at start, a client without a certificate must be refused by both (nginx answers
400; ours closes the connection, TLS 1.3 refusing after the client's side of the handshake) and
the call must answer 200 with MLflow's default experiment; every answer during the run is
counted, and a single non-200 makes the run an error. Measurements alternate sides, the order
flipping each round, so drift (and other jobs on this shared machine) hits both alike. The
sidecar forwards no identity: its MLflow lets every verified client do everything, while ours
also maps the certificate to scopes, so ours does more per request.

Everything binds 127.0.0.1 on free ports and is stopped at the end, on errors, Ctrl-C and SIGTERM
too. It reports, it does not judge: a MISS exits 0; non-zero only when something fails to run.

    python benchmarks/bench_sidecar.py [--workers N] [--rounds 3] [--requests 200]
        [--new-connections 100] [--seconds 4] [--clients 32] [--settle 60]
        [--upstream-keepalive] [--json]

The sidecar proxies with nginx's default upstream (a new HTTP/1.0 connection to MLflow per
request): its best here. `--upstream-keepalive` keeps upstream connections alive, as nginx's docs
advise, and then `mlflow server --workers N>1` stalls every kept-alive response by ~40 ms
(uvicorn's shared socket has no TCP_NODELAY; benchmarks/README.md): we do not win by that bug.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import (  # noqa: E402  (after the path set-up)
    SNI,
    child_env,
    figure,
    free_port,
    latency_row,
    percentile,
    process_tree,
    run_bench,
    running_mlflow,
    stop_tree,
    tree_cpu,
    tree_memory,
)
from runtime import names  # noqa: E402

NGINX = Path("/usr/sbin/nginx")
MLFLOW = Path(sys.executable).parent / "mlflow"
CALL = "/api/2.0/mlflow/experiments/get?experiment_id=0"
REQUEST = f"GET {CALL} HTTP/1.1\r\nHost: {SNI}\r\n\r\n".encode()
REQUEST_CLOSE = f"GET {CALL} HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode()
SIDES = ("ours", "sidecar")
HUEY_STORAGE = "_MLFLOW_HUEY_STORAGE_PATH"  # mlflow.server.constants.HUEY_STORAGE_PATH_ENV_VAR


# --- the two sides ----------------------------------------------------------------------------------
@dataclass
class Side:
    """One running side: where to call it, the roots of its process trees by role, what it answered."""

    name: str
    port: int
    roots: dict[str, int]
    statuses: Counter = field(default_factory=Counter)

    def cpu(self) -> float:
        return sum(tree_cpu(pid) for pid in self.roots.values())

    def memory(self) -> dict[str, dict[str, float]]:
        return {role: tree_memory(pid) for role, pid in self.roots.items()}


@contextlib.contextmanager
def running_ours(workdir: Path, workers: int, jobs: dict[str, str]) -> Iterator[tuple[Side, dict[str, Path]]]:
    """serve-mlflow in strict mode, as common.running_mlflow starts it, with N workers asked for."""
    with running_mlflow(
        workdir,
        keys={},
        mode=names.MTLS_MODE_STRICT,
        environment={names.ENV_WORKERS: str(workers), **jobs},
    ) as server:
        try:
            yield Side("ours", server.port, {"serve-mlflow": server.process.pid}), server.files
        finally:
            stop_tree(server.process)  # the whole tree, whatever its workers do; then running_mlflow's stop


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
{user}pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream mlflow {{
        server 127.0.0.1:{upstream};
{upstream_keepalive}    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;  # as ours; nginx 1.22's default stops at TLSv1.2
        keepalive_requests 1000000;  # one connection per client for the whole run (default 1000)
        location / {{
            proxy_pass http://mlflow;
{proxy_keepalive}            proxy_set_header Host $host;  # MLflow refuses a Host that is not localhost or a private IP
        }}
    }}
}}
"""

UPSTREAM_KEEPALIVE = """\
        keepalive 32;
        keepalive_timeout 4s;  # under uvicorn's 5 s, so nginx never reuses a connection it is closing
"""
PROXY_KEEPALIVE = """\
            proxy_http_version 1.1;
            proxy_set_header Connection "";
"""


def wait_for(process: subprocess.Popen, port: int, log: Path, seconds: float = 120) -> None:
    """Until MLflow's `/health` on `port` answers 200; RuntimeError with the log's tail if it exits."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited {process.returncode}: {log.read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"MLflow not answering after {seconds:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def huey_storage(pid: int) -> Path | None:
    """The directory `mlflow server` made in /dev/shm for its job queue (it never removes it)."""
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for item in Path(f"/proc/{member}/environ").read_bytes().split(b"\0"):
                if item.startswith(HUEY_STORAGE.encode() + b"="):
                    return Path(item.split(b"=", 1)[1].decode())
    return None


@dataclass
class Upstream:
    """The sidecar's `mlflow server`, started before ours so the two start-ups overlap."""

    process: subprocess.Popen
    port: int
    log: Path


@contextlib.contextmanager
def running_upstream(workdir: Path, workers: int, jobs: dict[str, str]) -> Iterator[Upstream]:
    """`mlflow server --workers N` on a loopback port, its own SQLite store; stopped on exit."""
    root = workdir / "sidecar"
    root.mkdir()
    stack = contextlib.ExitStack()
    process = None
    try:
        shm = Path("/dev/shm")  # noqa: S108 - a private TemporaryDirectory inside it
        database = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else root)))
        port = free_port()
        env = {k: v for k, v in child_env().items() if not k.startswith(("MLFLOW_", "HOKUSAI_", "AWS_"))}
        env.update(jobs)
        log = root / "mlflow.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [
                    str(MLFLOW),
                    "server",
                    *("--backend-store-uri", f"sqlite:///{database}/mlflow.db"),
                    *("--artifacts-destination", str(database / "artifacts")),
                    *("--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)),
                ],
                cwd=root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        yield Upstream(process, port, log)
    finally:
        huey = huey_storage(process.pid) if process is not None and process.poll() is None else None
        if process is not None:
            stop_tree(process)
        if huey is not None:
            shutil.rmtree(huey, ignore_errors=True)
        stack.close()


@contextlib.contextmanager
def running_sidecar(
    upstream: Upstream, files: dict[str, Path], workers: int, keepalive: bool = True
) -> Iterator[Side]:
    """nginx in front of the (now ready) upstream, the same certificates as ours; stopped on exit.

    `keepalive=False`: nginx's default upstream, a new HTTP/1.0 connection per proxied request.
    """
    wait_for(upstream.process, upstream.port, upstream.log)
    root = upstream.log.parent
    port = free_port()
    server = files["server"]
    (root / "nginx.conf").write_text(
        NGINX_CONF.format(
            workers=workers,
            user="user root root;\n" if os.geteuid() == 0 else "",  # else nginx drops to nobody
            root=root,
            upstream=upstream.port,
            upstream_keepalive=UPSTREAM_KEEPALIVE if keepalive else "",
            proxy_keepalive=PROXY_KEEPALIVE if keepalive else "",
            port=port,
            cert=server / names.CERT_FILE,
            key=server / names.KEY_FILE,
            ca=files["ca"],
        )
    )
    log = root / "nginx.stderr"
    with log.open("w") as err:
        nginx = subprocess.Popen(
            [str(NGINX), "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log")],
            cwd=root,
            stdout=err,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if nginx.poll() is not None:
                raise RuntimeError(f"nginx exited {nginx.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nginx not listening after 30 s: {(root / 'error.log').read_text()[-2000:]}"
                )
            time.sleep(0.1)
        yield Side("sidecar", port, {"nginx": nginx.pid, "mlflow server": upstream.process.pid})
    finally:
        stop_tree(nginx)


def settle(sides: dict[str, Side], timeout: float, quiet: float = 0.1) -> dict[str, float]:
    """Wait (at most `timeout` s) until no tree uses more than `quiet` cores; each one's idle use.

    Both job runners start their huey consumers after the server answers, and each imports
    MLflow: seconds of CPU that would land in the first measurements of one side.
    """
    deadline = time.monotonic() + timeout
    while True:
        before, started = {name: side.cpu() for name, side in sides.items()}, time.monotonic()
        time.sleep(1.0)
        elapsed = time.monotonic() - started
        idle = {name: (side.cpu() - before[name]) / elapsed for name, side in sides.items()}
        if max(idle.values()) <= quiet or time.monotonic() > deadline:
            return idle


def commands(side: Side) -> list[str]:
    """Each process of the side's trees, by its command line (shortened): who is doing the work."""
    out = []
    for root in side.roots.values():
        for pid in process_tree(root):
            with contextlib.suppress(OSError):
                out.append(
                    Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120].strip()
                )
    return out


# --- the client: raw HTTP/1.1 over TLS, the same bytes to both sides --------------------------------
def client_context(files: dict[str, Path], certificate: bool = True) -> ssl.SSLContext:
    """What requests/httpx build from `verify=CA, cert=client.pem`; without the certificate on demand."""
    context = ssl.create_default_context(cafile=str(files["ca"]))
    if certificate:
        context.load_cert_chain(str(files["client"]))
    return context


def parse_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) of a response head; both sides frame MLflow's answers by length."""
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if length is None:
        raise RuntimeError(f"a response without Content-Length: {head[:200]!r}")
    return status, int(length[1])


def read_response(tls: ssl.SSLSocket) -> tuple[int, bytes]:
    """One response on a blocking TLS socket: (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed after {data[:80]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, length = parse_head(head)
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed in the body")
        body += chunk
    return status, body


def connect(side: Side, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A new TCP connection and a full handshake (a fresh connection offers no session to resume)."""
    raw = socket.create_connection(("127.0.0.1", side.port), timeout=30)
    try:
        return context.wrap_socket(raw, server_hostname=SNI)
    except BaseException:
        raw.close()
        raise


def check_side(side: Side, files: dict[str, Path]) -> dict:
    """Once at start: the call answers 200 with MLflow's default experiment; no certificate, no answer."""
    with connect(side, client_context(files)) as tls:
        tls.sendall(REQUEST_CLOSE)
        status, body = read_response(tls)
        protocol = f"{tls.version()} {tls.cipher()[0]}"
    if status != 200 or json.loads(body)["experiment"]["name"] != "Default":
        raise RuntimeError(f"{side.name}: {CALL} answered {status}: {body[:200]!r}")
    try:
        with connect(side, client_context(files, certificate=False)) as tls:
            tls.sendall(REQUEST_CLOSE)
            status, body = read_response(tls)
    except (ssl.SSLError, ConnectionError) as exc:  # refused at the handshake (or right after it)
        refused = f"{type(exc).__name__}: {exc}"[:120]
    except RuntimeError as exc:  # closed: TLS 1.3 refuses after the client's side of the handshake
        refused = f"closed without an answer ({exc})"[:120]
    else:
        if status == 200:
            raise RuntimeError(f"{side.name} answered 200 to a client without a certificate")
        title = re.search(rb"<title>([^<]*)</title>", body)
        refused = f"HTTP {status}" + (f" ({title[1].decode(errors='replace')})" if title else "")
    return {"negotiated": protocol, "without_certificate": refused}


# --- the four measurements ---------------------------------------------------------------------------
def keepalive_latency(side: Side, context: ssl.SSLContext, requests: int) -> list[float]:
    """Seconds per call on one kept-alive connection, one request at a time (after 3 untimed)."""
    seconds = []
    with connect(side, context) as tls:
        for index in range(requests + 3):
            started = time.perf_counter()
            tls.sendall(REQUEST)
            status, _ = read_response(tls)
            if index >= 3:
                seconds.append(time.perf_counter() - started)
            side.statuses[status] += 1
    return seconds


def new_connection_latency(side: Side, context: ssl.SSLContext, requests: int) -> list[float]:
    """Seconds per call when each call opens a new connection: TCP, full handshake, request, close."""
    seconds = []
    for _ in range(requests):
        started = time.perf_counter()
        with connect(side, context) as tls:
            tls.sendall(REQUEST_CLOSE)
            status, _ = read_response(tls)
            if tls.session_reused:
                raise RuntimeError(f"{side.name}: a session was resumed")
        seconds.append(time.perf_counter() - started)
        side.statuses[status] += 1
    return seconds


def handshake_cpu(side: Side, context: ssl.SSLContext, seconds: float) -> dict:
    """Full handshakes for `seconds`, one at a time, each closed with close_notify (no request).

    The client waits for the server's close (`unwrap`), so the server has read the whole client
    flight (certificate, its signature, Finished) and verified it before the next one starts.
    """
    count = 0
    cpu = side.cpu()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or count == 0:
        tls = connect(side, context)
        try:
            tls.unwrap()
        except (ssl.SSLError, OSError):
            pass  # the server closed the TCP connection without its close_notify: also done
        finally:
            tls.close()
        count += 1
    elapsed = time.perf_counter() - started
    used = side.cpu() - cpu
    return {"handshakes": count, "per_s": count / elapsed, "server_cpu_ms": used / count * 1e3}


def throughput(side: Side, context: ssl.SSLContext, clients: int, seconds: float) -> dict:
    """Requests/s of `clients` kept-alive connections, one request in flight each, over `seconds`
    after a 1-s warm-up; the server tree's CPU and this process's (the load generator's) meanwhile.

    Requests/s counts the answers that arrived in the window; latencies only the requests sent
    and answered in it (the window is extended until there is one).
    """
    state = {"measuring": False, "stop": False, "completed": 0}
    latencies: list[float] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", side.port, ssl=context, server_hostname=SNI
        )
        try:
            while not state["stop"]:
                measuring, started = state["measuring"], time.perf_counter()
                writer.write(REQUEST)
                status, length = parse_head(await reader.readuntil(b"\r\n\r\n"))
                await reader.readexactly(length)
                side.statuses[status] += 1
                if state["measuring"]:
                    state["completed"] += 1
                    if measuring:
                        latencies.append(time.perf_counter() - started)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def run() -> dict:
        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        try:
            await asyncio.sleep(1.0)
            server_cpu, client_cpu = side.cpu(), time.process_time()
            started = time.perf_counter()
            state["measuring"] = True
            await asyncio.sleep(seconds)
            while not latencies and time.perf_counter() - started < seconds + 30:
                await asyncio.sleep(0.05)
            state["measuring"] = False
            elapsed = time.perf_counter() - started
            server_cpu, client_cpu = side.cpu() - server_cpu, time.process_time() - client_cpu
        finally:
            state["stop"] = True
            await asyncio.gather(*tasks)
        n = state["completed"]
        return {
            "requests": n,
            "per_s": n / elapsed,
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "server_cpu_ms_per_request": server_cpu / n * 1e3,
            "server_cores": server_cpu / elapsed,
            "load_generator_cores": client_cpu / elapsed,
        }

    return asyncio.run(run())


# --- the run ------------------------------------------------------------------------------------------
def measure(workdir: Path, args: argparse.Namespace) -> dict:
    started = time.monotonic()
    # MLflow's job runner (on by default) and its 7 huey consumers, on both sides or on neither
    jobs = {names.ENV_MLFLOW_JOB_EXECUTION: "false"} if args.no_jobs else {}
    with (
        running_upstream(workdir, args.workers, jobs) as upstream,
        running_ours(workdir, args.workers, jobs) as (ours, files),
        running_sidecar(upstream, files, args.workers, args.upstream_keepalive) as sidecar,
    ):
        sides = {"ours": ours, "sidecar": sidecar}
        checks = {name: check_side(side, files) for name, side in sides.items()}
        setup_s = time.monotonic() - started
        idle = settle(sides, args.settle)
        settle_s = time.monotonic() - started - setup_s
        command_lines = {name: commands(side) for name, side in sides.items()}
        context = client_context(files)
        samples = {name: {"keepalive": [], "new_connection": []} for name in sides}
        rounds = {name: {"handshake": [], "throughput": []} for name in sides}
        memory = {name: [] for name in sides}
        for round_ in range(args.rounds):
            order = list(SIDES) if round_ % 2 == 0 else list(reversed(SIDES))
            for name in order:
                samples[name]["keepalive"] += keepalive_latency(sides[name], context, args.requests)
            for name in order:
                samples[name]["new_connection"] += new_connection_latency(
                    sides[name], context, args.new_connections
                )
            for name in order:
                rounds[name]["handshake"].append(handshake_cpu(sides[name], context, args.seconds))
            for name in order:
                rounds[name]["throughput"].append(
                    throughput(sides[name], context, args.clients, args.seconds)
                )
                memory[name].append(sides[name].memory())
        statuses = {name: {str(code): n for code, n in side.statuses.items()} for name, side in sides.items()}
        timings = {
            "setup_s": setup_s,
            "settle_s": settle_s,
            "measure_s": time.monotonic() - started - setup_s - settle_s,
        }
    failed = {name: {s: n for s, n in counts.items() if s != "200"} for name, counts in statuses.items()}
    if any(failed.values()):
        raise RuntimeError(f"non-200 answers: {failed}")

    def summary(name: str) -> dict:
        hs, tp = rounds[name]["handshake"], rounds[name]["throughput"]
        trees = max(memory[name], key=lambda m: sum(t["rss_mib"] for t in m.values()))
        return {
            "keepalive": latency_row(samples[name]["keepalive"]),
            "new_connection": latency_row(samples[name]["new_connection"]),
            "handshake_server_cpu_ms": statistics.median(r["server_cpu_ms"] for r in hs),
            "handshakes_per_s": statistics.median(r["per_s"] for r in hs),
            "requests_per_s": statistics.median(r["per_s"] for r in tp),
            "loaded_p50_ms": statistics.median(r["p50_ms"] for r in tp),
            "loaded_p99_ms": statistics.median(r["p99_ms"] for r in tp),
            "server_cpu_ms_per_request": statistics.median(r["server_cpu_ms_per_request"] for r in tp),
            "load_generator_cores": statistics.median(r["load_generator_cores"] for r in tp),
            "server_cores": statistics.median(r["server_cores"] for r in tp),
            "idle_cores": idle[name],
            "rss_mib": sum(t["rss_mib"] for t in trees.values()),
            "pss_mib": sum(t["pss_mib"] for t in trees.values()),
            "processes": sum(t["processes"] for t in trees.values()),
            "trees": trees,
            "commands": command_lines[name],
            "statuses": statuses[name],
            "rounds": rounds[name],
            **checks[name],
        }

    return {**{name: summary(name) for name in SIDES}, "timings": timings}


def figures(report: dict) -> list[dict]:
    o, s = report["result"]["ours"], report["result"]["sidecar"]
    rounds, clients, cores = report["rounds"], report["clients"], report["machine"]["cores"]
    nginx_mib, mlflow_mib = s["trees"]["nginx"]["rss_mib"], s["trees"]["mlflow server"]["rss_mib"]
    latency = [
        figure(
            f"{label} p50, ours / sidecar",
            o[key]["p50_ms"] / s[key]["p50_ms"],
            f"{o[key]['p50_ms']:.2f} ms vs {s[key]['p50_ms']:.2f} ms "
            f"(p99 {o[key]['p99_ms']:.2f} vs {s[key]['p99_ms']:.2f}), n={o[key]['n']} each",
            at_most=1.0,
        )
        for key, label in (("keepalive", "keep-alive"), ("new_connection", "new connection per request"))
    ]
    return [
        *latency,
        figure(
            "server CPU per full mTLS handshake, ours / sidecar",
            o["handshake_server_cpu_ms"] / s["handshake_server_cpu_ms"],
            f"{o['handshake_server_cpu_ms']:.2f} ms vs {s['handshake_server_cpu_ms']:.2f} ms "
            f"({o['handshakes_per_s']:.0f} vs {s['handshakes_per_s']:.0f} handshakes/s, one at a time), "
            f"median of {rounds}",
            at_most=1.0,
        ),
        figure(
            f"requests/s at {clients} keep-alive clients, ours / sidecar",
            o["requests_per_s"] / s["requests_per_s"],
            f"{o['requests_per_s']:.0f} vs {s['requests_per_s']:.0f} req/s (server CPU "
            f"{o['server_cpu_ms_per_request']:.2f} vs {s['server_cpu_ms_per_request']:.2f} ms/request); "
            f"the load generator used {o['load_generator_cores']:.2f} / {s['load_generator_cores']:.2f} "
            f"of the same {cores} cores; median of {rounds}",
            at_least=1.0,
        ),
        figure(
            "memory (RSS of the process trees), ours / sidecar",
            o["rss_mib"] / s["rss_mib"],
            f"{o['rss_mib']:.0f} MiB ({o['processes']} processes) vs {s['rss_mib']:.0f} MiB "
            f"(nginx {nginx_mib:.0f} + mlflow server {mlflow_mib:.0f}, {s['processes']} processes); "
            f"PSS {o['pss_mib']:.0f} vs {s['pss_mib']:.0f} MiB",
        ),
    ]


def print_report(report: dict) -> None:
    info, r = report["machine"], report["result"]
    out = [
        f"ours (serve-mlflow, strict) vs sidecar (nginx + mlflow server), {report['date']}: "
        f"{report['workers']} worker(s) each, {report['rounds']} round(s), sides alternating",
        f"machine: {info['cpu']}, {info['cores']} cores; {info['kernel']}; Python {info['python']} "
        f"({info['python_ssl']}); mlflow {info['mlflow']}; nginx {report['nginx']}",
        f"call: GET {CALL} with the API service's certificate; load generator = this process, "
        "on the same cores as both servers",
        "sidecar upstream: "
        + (
            "kept-alive HTTP/1.1 connections (keepalive 32)"
            if report["upstream_keepalive"]
            else "a new HTTP/1.0 connection per request (nginx's default)"
        )
        + f"; set-up {r['timings']['setup_s']:.0f} s, settling {r['timings']['settle_s']:.0f} s, "
        f"measuring {r['timings']['measure_s']:.0f} s",
        "",
        f"{'':<34} {'ours':>12} {'sidecar':>12}",
    ]
    rows = [
        (
            "keep-alive p50 / p99 (ms)",
            lambda x: f"{x['keepalive']['p50_ms']:.2f}/{x['keepalive']['p99_ms']:.2f}",
        ),
        (
            "new connection p50 / p99 (ms)",
            lambda x: f"{x['new_connection']['p50_ms']:.2f}/{x['new_connection']['p99_ms']:.2f}",
        ),
        ("server CPU per handshake (ms)", lambda x: f"{x['handshake_server_cpu_ms']:.2f}"),
        ("handshakes/s (one at a time)", lambda x: f"{x['handshakes_per_s']:.0f}"),
        (f"req/s, {report['clients']} clients", lambda x: f"{x['requests_per_s']:.0f}"),
        ("  p50 / p99 under load (ms)", lambda x: f"{x['loaded_p50_ms']:.1f}/{x['loaded_p99_ms']:.1f}"),
        ("  server CPU per request (ms)", lambda x: f"{x['server_cpu_ms_per_request']:.2f}"),
        (
            "  server / load generator cores",
            lambda x: f"{x['server_cores']:.2f}/{x['load_generator_cores']:.2f}",
        ),
        ("idle CPU of the trees (cores)", lambda x: f"{x['idle_cores']:.3f}"),
        ("RSS / PSS (MiB)", lambda x: f"{x['rss_mib']:.0f}/{x['pss_mib']:.0f}"),
        ("processes", lambda x: f"{x['processes']}"),
    ]
    out += [f"{label:<34} {fmt(r['ours']):>12} {fmt(r['sidecar']):>12}" for label, fmt in rows]
    out.append("")
    for name in SIDES:
        out.append(
            f"{name}: {r[name]['negotiated']}; answers {r[name]['statuses']}; "
            f"without a certificate: {r[name]['without_certificate']}"
        )
    out.append("")
    for f in report["figures"]:
        out.append(f"{f['name']:<52} {f['value']:>7.3f}x  target {f['target']}: {f['verdict']}")
        out.append(f"    {f['detail']}")
    out.append(
        f"other processes on this machine used {report['others_cores']:.2f} cores on average meanwhile"
    )
    sys.stdout.write("\n".join(out) + "\n")


def nginx_version() -> str:
    done = subprocess.run([str(NGINX), "-v"], capture_output=True, text=True, check=False)
    return done.stderr.strip().rsplit("/", 1)[-1]


def _terminate(signum, frame) -> None:
    """SIGTERM (run_all's timeout, Ctrl-C there) unwinds like Ctrl-C: every server is stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="worker processes per side (default: CPUs)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds, sides alternating (default 3)")
    parser.add_argument(
        "--requests", type=int, default=200, help="keep-alive calls per side and round (default 200)"
    )
    parser.add_argument(
        "--new-connections",
        type=int,
        default=100,
        help="new-connection calls per side and round (default 100)",
    )
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="handshake loop and load per side and round (default 4)"
    )
    parser.add_argument("--clients", type=int, default=32, help="concurrent keep-alive clients (default 32)")
    parser.add_argument(
        "--settle",
        type=float,
        default=60,
        help="seconds to wait at most for both process trees to go idle after start-up (default 60)",
    )
    parser.add_argument(
        "--no-jobs",
        action="store_true",
        help="both sides without MLflow's job runner (7 huey consumers each): less CPU at start, less memory",
    )
    parser.add_argument(
        "--upstream-keepalive",
        action="store_true",
        help="keep nginx's connections to MLflow alive (then uvicorn's --workers stall: ~40 ms per response)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)
    if (
        min(args.workers, args.rounds, args.requests, args.new_connections, args.clients) < 1
        or args.seconds <= 0
    ):
        parser.error("counts must be at least 1, --seconds positive, --settle not negative")
    for needed in (NGINX, MLFLOW):
        if not needed.exists():
            sys.stderr.write(f"bench_sidecar: error: {needed} is not installed\n")
            return 1
    signal.signal(signal.SIGTERM, _terminate)
    report: dict = {
        "date": dt.date.today().isoformat(),
        "workers": args.workers,
        "rounds": args.rounds,
        "requests": args.requests,
        "new_connections": args.new_connections,
        "seconds": args.seconds,
        "clients": args.clients,
        "upstream_keepalive": args.upstream_keepalive,
        "jobs": not args.no_jobs,
        "nginx": nginx_version(),
    }
    return run_bench(
        "sidecar",
        report,
        lambda tmp: measure(tmp, args),
        figures,
        print_report,
        as_json=args.json,
        errors=(RuntimeError, OSError, ValueError, subprocess.SubprocessError),
    )


if __name__ == "__main__":
    sys.exit(main())
