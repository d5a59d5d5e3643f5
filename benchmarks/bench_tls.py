"""What does mutual TLS cost on the request path? Three measurements, each a ratio from one run.

1. mlflow     MLflow's own client (`MlflowClient`: one pooled keep-alive `requests.Session`)
              against ONE real `hokusai-mtls serve-mlflow` in permissive mode, which serves
              TLS and plain HTTP on the same port: the same calls (log_metric, get_run) over
              https:// with a client certificate (the middleware's mTLS path) and over http://
              with an API key (the auth-service test double answers the first call, the
              in-memory key cache every later one). Target: p50 mTLS / p50 plain <= 1.10.
2. handshake  full mTLS handshakes per second, a new connection per request, with our default
              keys (ECDSA P-256 on both sides) against the seed's RSA-4096 (both sides): the
              same server code (runtime.serving.server + ReloadableServerContext), two listeners in
              one server process; and the raw handshake alone, in memory, against the
              listener's context. Target: ECDSA / RSA-4096 >= 4.
3. rps        requests per second through one uvicorn server over mTLS keep-alive: a small
              Starlette app behind `APIKeyAuthMiddleware` (its mTLS path) against the same app
              without it, two listeners of one server process. The load comes from a separate
              process (raw asyncio keep-alive connections, cheaper than the server per request,
              the same in both cases). Target: with / without >= 0.9. A third listener, the
              same app and middleware on a permissive port (TLS and plain), is informative.

Metrics must not cost a log line per request: the servers write CloudWatch EMF lines once per
interval. The script counts the server's stdout lines against the requests it served.

Servers bind 127.0.0.1 on free ports and are stopped by the script; every loop is bounded by a
count or a time. Cases alternate (call by call for MLflow, round by round otherwise), so drift
hits both sides alike. It reports, it
does not judge: a missed target prints MISS and still exits 0 (non-zero only if something fails
to run).

    python benchmarks/bench_tls.py [--only mlflow,handshake,rps] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import (  # noqa: E402  (after the path set-up)
    OPERATIONS,
    SNI,
    child_env,
    cpu_snapshot,
    figure,
    free_port,
    latency_row,
    machine,
    mlflow_client_environment,
    mtls_credentials,
    others_cores,
    percentile,
    process_cpu,
    running_mlflow,
    stop,
    time_operations,
    token_credentials,
    use_credentials,
    verdict,
    write_set,
)

ENV = "development"
BENCH_KEY = "hk_bench_mlflow_0123456789abcdef"
CASES = ("mlflow", "handshake", "rps")
TARGETS = {"mlflow": 1.10, "handshake": 4.0, "rps": 0.9}


# --- small helpers --------------------------------------------------------------------------------
def wait_for_ports(ports: list[int], process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited {process.returncode}: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} not listening after {timeout:.0f} s") from None
                time.sleep(0.1)


def emf_totals(lines: list[str]) -> dict[str, float]:
    """Sum each metric over EMF lines, `Name[auth_path]` when the line has that dimension."""
    from runtime import names

    totals: dict[str, float] = {}
    for line in lines:
        try:
            document = json.loads(line)
            metrics = document["_aws"]["CloudWatchMetrics"][0]["Metrics"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        for metric in metrics:
            value = document[metric["Name"]]
            if isinstance(value, dict):  # a latency distribution: count its samples
                value = sum(value["Counts"])
            key = metric["Name"] + (
                f"[{document[names.DIM_AUTH_PATH]}]" if names.DIM_AUTH_PATH in document else ""
            )
            totals[key] = totals.get(key, 0) + value
    return totals


def client_context(files: dict[str, Path]) -> ssl.SSLContext:
    """What requests/httpx build from `verify=CA, cert=client.pem`: chain and hostname checked."""
    context = ssl.create_default_context(cafile=str(files["ca"]))
    context.load_cert_chain(str(files["client"]))
    return context


# --- the server process for `handshake` and `rps` ------------------------------------------------------
async def _ping(request):
    from starlette.responses import JSONResponse

    return JSONResponse({"ok": True})


def serve(spec: dict) -> None:
    """Listeners of one `runtime.serving.server.Serving`: each mTLS, with or without the middleware."""
    import ipaddress
    import logging

    from starlette.applications import Starlette
    from starlette.routing import Route

    from runtime import names
    from runtime.auth.client_address import AddressPolicy
    from runtime.auth.middleware import APIKeyAuthMiddleware, mlflow_scope
    from runtime.auth.peer_identity import IdentityPolicy
    from runtime.auth.rate_limit import MemoryRateLimiter
    from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
    from runtime.observability.metrics import Metrics
    from runtime.serving.server import Listener, Serving, every

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    metrics = Metrics(environment=ENV, service=names.MLFLOW_SERVICE)  # EMF to stdout, as in ECS
    app = Starlette(routes=[Route("/ping", _ping)])
    with_middleware = APIKeyAuthMiddleware(
        app,
        identities=IdentityPolicy(ENV),
        addresses=AddressPolicy(internal=(ipaddress.ip_network("10.0.0.0/8"),)),
        validator=None,  # mTLS only: no request here takes the API-key path
        limiter=MemoryRateLimiter(),
        metrics=metrics,
        required_scope=mlflow_scope,
    )
    listeners = []
    for item in spec["listeners"]:
        tls = ReloadableServerContext(
            ServerFiles.from_directory(Path(item["dir"])), on_handshake=metrics.handshake_started
        )
        listeners.append(
            Listener(
                item["name"],
                "127.0.0.1",
                item["port"],
                with_middleware if item["middleware"] else app,
                tls,
                metrics.handshake_completed,
                plain_too=item.get("plain_too", False),
            )
        )
    seconds = spec["metrics_seconds"]
    serving = Serving(listeners, background=[lambda: every(seconds, metrics.flush)])
    asyncio.run(serving.run())


def start_server(workdir: Path, listeners: list[dict], metrics_seconds: float):
    spec = workdir / "serve.json"
    spec.write_text(json.dumps({"listeners": listeners, "metrics_seconds": metrics_seconds}))
    stdout, stderr = workdir / "server.stdout", workdir / "server.stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(spec)], env=child_env(), stdout=out, stderr=err
        )
    try:
        wait_for_ports([item["port"] for item in listeners], process, stderr)
    except BaseException:
        stop(process)
        raise
    return process, stdout


# --- 1. MLflow client: mTLS port vs plain port of one serve-mlflow -------------------------------------
def bench_mlflow(workdir: Path, repeat: int, ops: int, metrics_seconds: float) -> dict:
    from local_stack.auth_service import key_record

    keys = {
        BENCH_KEY: key_record("key-bench", scopes=["mlflow:read", "mlflow:write"], rate_limit_per_hour=10**7)
    }
    with running_mlflow(workdir, keys=keys, metrics_seconds=metrics_seconds) as server:
        stdout, stderr = server.stdout, server.stderr
        mlflow_client_environment()
        from mlflow import MlflowClient

        targets = {
            "mtls": (
                MlflowClient(tracking_uri=f"https://127.0.0.1:{server.port}"),
                mtls_credentials(server.files),
            ),
            # the same port; the key is sent as `Authorization: Bearer`
            "plain": (
                MlflowClient(tracking_uri=f"http://127.0.0.1:{server.port}"),
                token_credentials(BENCH_KEY),
            ),
        }

        def use(target: str):
            client, variables = targets[target]
            use_credentials(variables)
            return client

        setup = use("mtls")
        experiment_id = setup.create_experiment(f"bench-{time.time_ns()}")
        run_id = setup.create_run(experiment_id).info.run_id
        latencies = {(op, t): [] for op in OPERATIONS for t in targets}
        requests_made = dict.fromkeys(targets, 0)
        step = 0
        lines_before = stderr_before = 0
        timed_started = 0.0
        for round_ in range(repeat + 1):  # round 0 warms connections and the key cache up
            if round_ == 1:
                lines_before = len(stdout.read_text().splitlines())
                stderr_before = len(stderr.read_text().splitlines())
                timed_started = time.monotonic()
            for index in range(ops if round_ else max(10, ops // 10)):
                # Both targets in every iteration, in alternating order: drift (the database
                # growing, other jobs on the machine) hits them alike.
                for target in targets if index % 2 == 0 else reversed(list(targets)):
                    step += 1
                    seconds = time_operations(use(target), run_id, step)
                    requests_made[target] += len(seconds)
                    if round_:
                        for op, value in seconds.items():
                            latencies[(op, target)].append(value)
        timed_s = time.monotonic() - timed_started
        timed_lines = len(stdout.read_text().splitlines()) - lines_before
        timed_stderr = len(stderr.read_text().splitlines()) - stderr_before
        time.sleep(metrics_seconds + 1)  # let the last interval flush
        all_lines = stdout.read_text().splitlines()
        stderr_lines = len(stderr.read_text().splitlines())
        startup_s = server.startup_s
        auth_calls = server.auth.calls

    rows = {f"{op}/{target}": latency_row(values) for (op, target), values in latencies.items()}
    ratios = {
        op: {
            "p50": rows[f"{op}/mtls"]["p50_ms"] / rows[f"{op}/plain"]["p50_ms"],
            "p99": rows[f"{op}/mtls"]["p99_ms"] / rows[f"{op}/plain"]["p99_ms"],
            "mean": rows[f"{op}/mtls"]["mean_ms"] / rows[f"{op}/plain"]["mean_ms"],
        }
        for op in OPERATIONS
    }
    timed_requests = sum(len(v) for v in latencies.values())
    return {
        "server_startup_s": startup_s,
        "rows": rows,
        "ratios": ratios,
        "pass": all(r["p50"] <= TARGETS["mlflow"] for r in ratios.values()),
        "auth_service_calls": auth_calls,
        "log_lines": {
            "timed_requests": timed_requests,
            "timed_seconds": timed_s,
            "stdout_lines_during_timed_run": timed_lines,
            "stderr_lines_during_timed_run": timed_stderr,
            "stdout_lines_total": len(all_lines),
            "stderr_lines_total": stderr_lines,
            "requests_total_by_bench": requests_made,
            "emf_totals": emf_totals(all_lines),
            "metrics_seconds": metrics_seconds,
        },
    }


# --- 2. full handshakes: ECDSA P-256 vs RSA-4096 -----------------------------------------------------
REQUEST_CLOSE = f"GET /ping HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode()
REQUEST_KEEP = f"GET /ping HTTP/1.1\r\nHost: {SNI}\r\n\r\n".encode()


def read_response(read) -> bytes:
    """One HTTP/1.1 response with a Content-Length, read with `read(n)`; returns its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = read(65536)
        if not chunk:
            raise RuntimeError(f"connection closed after {data[:80]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head)[1])
    while len(body) < length:
        chunk = read(65536)
        if not chunk:
            raise RuntimeError("connection closed in the body")
        body += chunk
    return head


def one_handshake(port: int, context: ssl.SSLContext) -> None:
    """A new TCP connection, a full handshake (no resumption), one request, close."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=SNI) as tls,
    ):
        tls.sendall(REQUEST_CLOSE)
        head = read_response(tls.recv)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"handshake case answered {head[:40]!r}")


def bench_handshake(workdir: Path, repeat: int, seconds: float) -> dict:
    from runtime import names
    from runtime.certificates.certset import CertificateSet
    from runtime.certificates.issuance import KeyType

    root = workdir / "handshake"
    made = time.perf_counter()
    sets = {
        "ecdsa-p256": CertificateSet.issue(
            ENV, key_type=KeyType.ECDSA_P256, server_sans=(SNI,), identities=(names.SERVER, names.API)
        ),
        "rsa-4096": CertificateSet.issue(
            ENV, key_type=KeyType.RSA_4096, server_sans=(SNI,), identities=(names.SERVER, names.API)
        ),
    }
    issue_s = time.perf_counter() - made
    files = {case: write_set(root / case, s) for case, s in sets.items()}
    ports = {case: free_port() for case in sets}
    listeners = [
        {"name": case, "port": ports[case], "dir": str(files[case]["server"]), "middleware": True}
        for case in sets
    ]
    process, _ = start_server(root, listeners, metrics_seconds=60)
    samples: dict[str, list[dict]] = {case: [] for case in sets}
    try:
        contexts = {case: client_context(files[case]) for case in sets}
        protocol = {case: negotiated(ports[case], contexts[case]) for case in sets}
        for case in sets:  # warm-up: imports, first-connection paths
            for _ in range(5):
                one_handshake(ports[case], contexts[case])
        for round_ in range(repeat):
            for case in sets if round_ % 2 == 0 else reversed(list(sets)):
                count = 0
                server_cpu, client_cpu = process_cpu(process.pid), time.process_time()
                start = time.perf_counter()
                deadline = start + seconds
                while time.perf_counter() < deadline:
                    one_handshake(ports[case], contexts[case])
                    count += 1
                elapsed = time.perf_counter() - start
                samples[case].append(
                    {
                        "handshakes": count,
                        "seconds": elapsed,
                        "per_s": count / elapsed,
                        "server_cpu_ms": (process_cpu(process.pid) - server_cpu) / count * 1e3,
                        "client_cpu_ms": (time.process_time() - client_cpu) / count * 1e3,
                    }
                )
    finally:
        stop(process)
    memory = memory_handshakes(files, repeat, seconds / 2)
    rows = {
        case: {
            "per_s": statistics.median(s["per_s"] for s in runs),
            "handshakes": sum(s["handshakes"] for s in runs),
            "server_cpu_ms": statistics.median(s["server_cpu_ms"] for s in runs),
            "client_cpu_ms": statistics.median(s["client_cpu_ms"] for s in runs),
            "rounds": runs,
        }
        for case, runs in samples.items()
    }
    ratio = rows["ecdsa-p256"]["per_s"] / rows["rsa-4096"]["per_s"]
    server_ratio = rows["rsa-4096"]["server_cpu_ms"] / rows["ecdsa-p256"]["server_cpu_ms"]
    memory_ratio = memory["ecdsa-p256"]["per_s"] / memory["rsa-4096"]["per_s"]
    return {
        "issue_both_sets_s": issue_s,
        "negotiated": protocol,
        "rows": rows,
        "ratio": ratio,
        "server_cpu_ratio": server_ratio,
        "pass": ratio >= TARGETS["handshake"],
        "memory": {"rows": memory, "ratio": memory_ratio, "pass": memory_ratio >= TARGETS["handshake"]},
    }


def memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[float, float]:
    """One full handshake between two in-memory TLS objects: (client seconds, server seconds).

    No sockets, no event loop: the TLS library's work (key exchange, signatures, chain checks,
    session tickets) and the server context's SNI callback, nothing else.
    """
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(c_in, c_out, server_hostname=SNI)
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    spent = [0.0, 0.0]
    done = [False, False]
    for _ in range(8):  # TLS 1.3 needs 2 flights each way; bounded anyway
        for index, (tls, incoming, outgoing) in enumerate(
            ((tls_client, s_out, c_in), (tls_server, c_out, s_in))
        ):
            outgoing.write(incoming.read())
            if not done[index]:
                started = time.perf_counter()
                try:
                    tls.do_handshake()
                    done[index] = True
                except ssl.SSLWantReadError:
                    pass
                spent[index] += time.perf_counter() - started
        if all(done):
            break
    if not all(done) or tls_server.getpeercert(binary_form=True) is None:
        raise RuntimeError("in-memory handshake did not complete with a client certificate")
    return spent[0], spent[1]


def memory_handshakes(files: dict[str, dict[str, Path]], repeat: int, seconds: float) -> dict:
    """Raw handshakes in this process against `ReloadableServerContext.front`, round-robin."""
    from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles

    pairs = {
        case: (ReloadableServerContext(ServerFiles.from_directory(f["server"])).front, client_context(f))
        for case, f in files.items()
    }
    samples: dict[str, list[dict]] = {case: [] for case in pairs}
    for pair in pairs.values():  # warm-up
        for _ in range(5):
            memory_handshake(*pair)
    for round_ in range(repeat):
        for case in pairs if round_ % 2 == 0 else reversed(list(pairs)):
            count, client_s, server_s = 0, 0.0, 0.0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                spent = memory_handshake(*pairs[case])
                client_s, server_s, count = client_s + spent[0], server_s + spent[1], count + 1
            elapsed = time.perf_counter() - start
            samples[case].append(
                {
                    "per_s": count / elapsed,
                    "handshakes": count,
                    "client_ms": client_s / count * 1e3,
                    "server_ms": server_s / count * 1e3,
                }
            )
    return {
        case: {
            "per_s": statistics.median(s["per_s"] for s in runs),
            "handshakes": sum(s["handshakes"] for s in runs),
            "client_ms": statistics.median(s["client_ms"] for s in runs),
            "server_ms": statistics.median(s["server_ms"] for s in runs),
        }
        for case, runs in samples.items()
    }


def negotiated(port: int, context: ssl.SSLContext) -> str:
    """The protocol, cipher and key exchange group a client gets (the group from OpenSSL 3.2 on)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=SNI) as tls,
    ):
        group = getattr(tls, "group", lambda: None)()
        tls.sendall(REQUEST_CLOSE)
        read_response(tls.recv)
        return " ".join(filter(None, [tls.version(), tls.cipher()[0], group]))


# --- 3. requests/s with and without the middleware ---------------------------------------------------
def load(spec: dict) -> dict:
    """The load generator's process: keep-alive connections, one request in flight on each."""
    context = ssl.create_default_context(cafile=spec["ca"])
    context.load_cert_chain(spec["cert"])
    state = {"measuring": False, "stop": False}
    latencies: list[float] = []
    totals = {"requests": 0}

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", spec["port"], ssl=context, server_hostname=SNI
        )
        try:
            while not state["stop"]:
                t0 = time.perf_counter()
                writer.write(REQUEST_KEEP)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head)[1])
                await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"answered {head[:40]!r}")
                totals["requests"] += 1
                if state["measuring"]:
                    latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    async def main() -> dict:
        tasks = [asyncio.create_task(connection()) for _ in range(spec["connections"])]
        await asyncio.sleep(spec["warmup"])
        server_cpu, client_cpu = process_cpu(spec["server_pid"]), time.process_time()
        start = time.perf_counter()
        state["measuring"] = True
        await asyncio.sleep(spec["seconds"])
        state["measuring"] = False
        elapsed = time.perf_counter() - start
        server_cpu = process_cpu(spec["server_pid"]) - server_cpu
        client_cpu = time.process_time() - client_cpu
        state["stop"] = True
        await asyncio.gather(*tasks)
        n = len(latencies)
        return {
            "requests": n,
            "seconds": elapsed,
            "per_s": n / elapsed,
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "server_cpu_us": server_cpu / n * 1e6,
            "client_cpu_us": client_cpu / n * 1e6,
            "server_core_busy": server_cpu / elapsed,
            "client_core_busy": client_cpu / elapsed,
            "requests_total": totals["requests"],
        }

    return asyncio.run(main())


def middleware_breakdown(certificates, count: int = 20_000) -> dict[str, float]:
    """Microseconds per request in this process, no server: where the middleware's time goes.

    The app and the middleware as `serve` builds them, called with a scope that carries the
    TLS extension of the API's certificate, and its parts alone.
    """
    import io
    import ipaddress

    from starlette.applications import Starlette
    from starlette.routing import Route

    from runtime import names
    from runtime.auth.client_address import AddressPolicy
    from runtime.auth.middleware import APIKeyAuthMiddleware, mlflow_scope
    from runtime.auth.peer_identity import IdentityPolicy, peer_certificate
    from runtime.auth.rate_limit import MemoryRateLimiter
    from runtime.certificates import pem
    from runtime.observability.metrics import Metrics

    app = Starlette(routes=[Route("/ping", _ping)])
    metrics = Metrics(environment=ENV, service=names.MLFLOW_SERVICE, stream=io.StringIO())
    policy = IdentityPolicy(ENV)
    wrapped = APIKeyAuthMiddleware(
        app,
        identities=policy,
        addresses=AddressPolicy(internal=(ipaddress.ip_network("10.0.0.0/8"),)),
        validator=None,
        limiter=MemoryRateLimiter(),
        metrics=metrics,
        required_scope=mlflow_scope,
    )
    certificate = certificates.identities["api"].certificate
    chain = [pem.certificate_pem(certificate).decode()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": "/ping",
        "raw_path": b"/ping",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", SNI.encode()), (b"user-agent", b"bench")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 443),
        "extensions": {"tls": {"client_cert_chain": chain, "client_cert_name": None}},
        "state": {},
    }

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        return None

    async def requests(target) -> float:
        start = time.perf_counter()
        for _ in range(count):
            await target(dict(scope), receive, send)
        return (time.perf_counter() - start) / count * 1e6

    def calls(action) -> float:
        start = time.perf_counter()
        for _ in range(count):
            action()
        return (time.perf_counter() - start) / count * 1e6

    asyncio.run(requests(app))  # warm-up
    return {
        "app_us": asyncio.run(requests(app)),
        "app_with_middleware_us": asyncio.run(requests(wrapped)),
        "pem_parse_us": calls(lambda: peer_certificate(scope)),
        "identify_fresh_certificate_us": calls(lambda: policy.identify(peer_certificate(scope)))
        - calls(lambda: peer_certificate(scope)),
        "metrics_us": calls(lambda: (metrics.auth("mtls", "success"), metrics.internal_latency(0.001))),
    }


def bench_rps(workdir: Path, repeat: int, seconds: float, connections: int, metrics_seconds: float) -> dict:
    from runtime import names
    from runtime.certificates.certset import CertificateSet

    root = workdir / "rps"
    certificates = CertificateSet.issue(ENV, server_sans=(SNI,), identities=(names.SERVER, names.API))
    files = write_set(root, certificates)
    # The third case is informative (no target): the same app and middleware on a permissive
    # listener (TLS and plain HTTP on one port, told apart by the first byte), mTLS clients.
    cases = {"with_middleware": free_port(), "without": free_port(), "permissive_port": free_port()}
    listeners = [
        {
            "name": case,
            "port": port,
            "dir": str(files["server"]),
            "middleware": case != "without",
            "plain_too": case == "permissive_port",
        }
        for case, port in cases.items()
    ]
    process, stdout = start_server(root, listeners, metrics_seconds)
    samples: dict[str, list[dict]] = {case: [] for case in cases}
    try:
        for round_ in range(repeat):
            for case in cases if round_ % 2 == 0 else reversed(list(cases)):
                spec = {
                    "port": cases[case],
                    "seconds": seconds,
                    "warmup": 0.5,
                    "connections": connections,
                    "ca": str(files["ca"]),
                    "cert": str(files["client"]),
                    "server_pid": process.pid,
                }
                done = subprocess.run(
                    [sys.executable, __file__, "--load", json.dumps(spec)],
                    env=child_env(),
                    capture_output=True,
                    text=True,
                    timeout=seconds + 60,
                    check=False,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"load generator failed: {done.stderr.strip()[-1500:]}")
                samples[case].append(json.loads(done.stdout))
        served = {case: sum(s["requests_total"] for s in runs) for case, runs in samples.items()}
        time.sleep(metrics_seconds + 1)  # the last interval's flush
        lines = stdout.read_text().splitlines()
    finally:
        stop(process)
    breakdown = middleware_breakdown(certificates)
    rows = {
        case: {
            key: statistics.median(s[key] for s in runs)
            for key in (
                "per_s",
                "p50_ms",
                "p99_ms",
                "server_cpu_us",
                "client_cpu_us",
                "server_core_busy",
                "client_core_busy",
            )
        }
        | {"rounds": runs}
        for case, runs in samples.items()
    }
    ratio = rows["with_middleware"]["per_s"] / rows["without"]["per_s"]
    return {
        "connections": connections,
        "rows": rows,
        "ratio": ratio,
        "cpu_ratio": rows["without"]["server_cpu_us"] / rows["with_middleware"]["server_cpu_us"],
        "in_process_us": breakdown,
        "pass": ratio >= TARGETS["rps"],
        "log_lines": {
            "requests_served": sum(served.values()),
            "requests_through_middleware": served["with_middleware"] + served["permissive_port"],
            "stdout_lines": len(lines),
            "emf_totals": emf_totals(lines),
            "metrics_seconds": metrics_seconds,
        },
    }


# --- report ----------------------------------------------------------------------------------------------
def print_report(report: dict) -> None:
    info = report["machine"]
    out = [
        f"hokusai-mtls TLS benchmark, {report['date']}: {report['repeat']} timed rounds per case",
        f"machine: {info['cpu']}, {info['cores']} cores; {info['os']}",
        f"         Python {info['python']} ({info['python_ssl']}); cryptography {info['cryptography']}; "
        f"uvicorn {info['uvicorn']}; mlflow {info['mlflow']}",
    ]
    if "mlflow" in report:
        r = report["mlflow"]
        logs = r["log_lines"]
        out += [
            "",
            "1. MLflow client (MlflowClient, pooled keep-alive) -> one serve-mlflow, permissive mode (one port)",
            f"   mtls = https:// with a client certificate; plain = http:// with an API key "
            f"(auth service called {r['auth_service_calls']}x, then the in-memory key cache)",
            f"   server start-up to healthy: {r['server_startup_s']:.1f}s",
            f"   {'call':<20} {'n':>5} {'p50':>9} {'p99':>9} {'mean':>9}",
        ]
        out += [
            f"   {key:<20} {row['n']:>5} {row['p50_ms']:>7.2f}ms {row['p99_ms']:>7.2f}ms {row['mean_ms']:>7.2f}ms"
            for key, row in r["rows"].items()
        ]
        for op, ratio in r["ratios"].items():
            out.append(
                f"   {op + ' mTLS/plain':<22} p50 {ratio['p50']:.3f}x  (p99 {ratio['p99']:.2f}x, "
                f"mean {ratio['mean']:.3f}x)  target p50 <= {TARGETS['mlflow']:.2f}x: "
                f"{verdict(ratio['p50'] <= TARGETS['mlflow'])}"
            )
        emf = logs["emf_totals"]
        out.append(
            f"   server stdout: {logs['stdout_lines_during_timed_run']} lines while serving "
            f"{logs['timed_requests']} timed requests in {logs['timed_seconds']:.0f}s "
            f"(EMF every {logs['metrics_seconds']:g}s), stderr {logs['stderr_lines_during_timed_run']} lines; "
            f"in all (start-up included) stdout {logs['stdout_lines_total']}, stderr {logs['stderr_lines_total']}"
        )
        out.append(
            f"   EMF totals: AuthenticatedRequests mtls={emf.get('AuthenticatedRequests[mtls]', 0):.0f} "
            f"api_key={emf.get('AuthenticatedRequests[api_key]', 0):.0f}, "
            f"PlainPortRequests={emf.get('PlainPortRequests', 0):.0f}; the bench made "
            f"mtls={logs['requests_total_by_bench']['mtls']} (+ setup) plain={logs['requests_total_by_bench']['plain']}"
        )
        out.append(others_line(r))
    if "handshake" in report:
        r = report["handshake"]
        out += [
            "",
            "2. Full mTLS handshakes, new connection per request (sequential), same server code path",
            f"   negotiated: {'; '.join(f'{k}: {v}' for k, v in r['negotiated'].items())}; issuing both sets took {r['issue_both_sets_s']:.1f}s",
            f"   {'keys (both sides)':<20} {'per s':>8} {'n':>6} {'server CPU':>11} {'client CPU':>11}",
        ]
        out += [
            f"   {case:<20} {row['per_s']:>8.1f} {row['handshakes']:>6} {row['server_cpu_ms']:>9.2f}ms "
            f"{row['client_cpu_ms']:>9.2f}ms"
            for case, row in r["rows"].items()
        ]
        out.append(
            f"   ECDSA/RSA-4096 handshakes/s {r['ratio']:.2f}x  target >= {TARGETS['handshake']:.0f}x: "
            f"{verdict(r['pass'])}   (server CPU per handshake RSA/ECDSA {r['server_cpu_ratio']:.1f}x)"
        )
        memory = r["memory"]
        out.append(
            "   raw handshake only, in memory (no sockets, no event loop), server = the listener's context:"
        )
        out += [
            f"   {case:<20} {row['per_s']:>8.1f} {row['handshakes']:>6} {row['server_ms']:>9.2f}ms "
            f"{row['client_ms']:>9.2f}ms"
            for case, row in memory["rows"].items()
        ]
        out.append(
            f"   ECDSA/RSA-4096 raw handshakes/s {memory['ratio']:.2f}x  target >= {TARGETS['handshake']:.0f}x: "
            f"{verdict(memory['pass'])}"
        )
        out.append(others_line(r))
    if "rps" in report:
        r = report["rps"]
        logs = r["log_lines"]
        out += [
            "",
            f"3. Requests/s over mTLS keep-alive, {r['connections']} connections from a separate process, "
            "one uvicorn server",
            f"   {'app':<18} {'req/s':>8} {'p50':>8} {'p99':>8} {'server CPU/req':>15} {'client CPU/req':>15}",
        ]
        out += [
            f"   {case:<18} {row['per_s']:>8.0f} {row['p50_ms']:>6.2f}ms {row['p99_ms']:>6.2f}ms "
            f"{row['server_cpu_us']:>11.0f}us ({row['server_core_busy']:.0%}) "
            f"{row['client_cpu_us']:>6.0f}us ({row['client_core_busy']:.0%})"
            for case, row in r["rows"].items()
        ]
        out.append(
            "   (permissive_port, informative: the same app + middleware on a permissive listener, TLS and "
            "plain HTTP on one port)"
        )
        out.append(
            f"   with/without middleware {r['ratio']:.3f}x  target >= {TARGETS['rps']:.1f}x: {verdict(r['pass'])}"
            f"   (server CPU per request, without/with: {r['cpu_ratio']:.3f}x)"
        )
        emf = logs["emf_totals"]
        out.append(
            f"   server stdout: {logs['stdout_lines']} lines for {logs['requests_served']} requests "
            f"(EMF every {logs['metrics_seconds']:g}s); EMF AuthenticatedRequests[mtls]="
            f"{emf.get('AuthenticatedRequests[mtls]', 0):.0f} vs {logs['requests_through_middleware']} "
            "sent through the middleware"
        )
        b = r["in_process_us"]
        out.append(
            f"   in-process, no server, per request: app {b['app_us']:.1f}us, app + middleware "
            f"{b['app_with_middleware_us']:.1f}us (+{b['app_with_middleware_us'] - b['app_us']:.1f}us); "
            f"parts: PEM parse {b['pem_parse_us']:.1f}us, identity from the fresh certificate "
            f"{b['identify_fresh_certificate_us']:.1f}us, metrics {b['metrics_us']:.1f}us"
        )
        out.append(others_line(r))
    sys.stdout.write("\n".join(out) + "\n")


def figures(report: dict) -> list[dict]:
    """The figures against their targets, for `run_all.py` (the issue's wording of each target)."""
    out = []
    if "mlflow" in report:
        r = report["mlflow"]
        for op, ratio in r["ratios"].items():
            mtls, plain = r["rows"][f"{op}/mtls"], r["rows"][f"{op}/plain"]
            out.append(
                figure(
                    f"MLflow {op}, keep-alive mTLS / plain HTTP, p50",
                    ratio["p50"],
                    f"{mtls['p50_ms']:.2f} ms vs {plain['p50_ms']:.2f} ms (p99 {ratio['p99']:.2f}x), "
                    f"n={mtls['n']} each",
                    at_most=TARGETS["mlflow"],
                )
            )
    if "handshake" in report:
        r = report["handshake"]
        rows, memory = r["rows"], r["memory"]["rows"]
        out.append(
            figure(
                "full mTLS handshakes/s, ECDSA P-256 / RSA-4096 (new connection each)",
                r["ratio"],
                f"{rows['ecdsa-p256']['per_s']:.1f}/s vs {rows['rsa-4096']['per_s']:.1f}/s, "
                f"n={rows['ecdsa-p256']['handshakes']} and {rows['rsa-4096']['handshakes']}",
                at_least=TARGETS["handshake"],
            )
        )
        out.append(
            figure(
                "raw handshakes/s in memory, ECDSA P-256 / RSA-4096 (no sockets)",
                r["memory"]["ratio"],
                f"{memory['ecdsa-p256']['per_s']:.1f}/s vs {memory['rsa-4096']['per_s']:.1f}/s, "
                f"n={memory['ecdsa-p256']['handshakes']} and {memory['rsa-4096']['handshakes']}",
                at_least=TARGETS["handshake"],
            )
        )
    if "rps" in report:
        r = report["rps"]
        rows = r["rows"]
        out.append(
            figure(
                "requests/s, middleware mTLS path / bare app (trivial app)",
                r["ratio"],
                f"{rows['with_middleware']['per_s']:.0f} vs {rows['without']['per_s']:.0f} req/s, "
                f"{r['connections']} keep-alive connections, {len(rows['without']['rounds'])} rounds",
                at_least=TARGETS["rps"],
            )
        )
    return out


def others_line(result: dict) -> str:
    return f"   other processes on this machine used {result['others_cores']:.2f} cores on average meanwhile"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per case (default 3)")
    parser.add_argument("--ops", type=int, default=150, help="mlflow: calls of each kind per round (150)")
    parser.add_argument("--seconds", type=float, default=4.0, help="handshake and rps: seconds per round (4)")
    parser.add_argument("--connections", type=int, default=8, help="rps: keep-alive connections (8)")
    parser.add_argument("--metrics-seconds", type=float, default=5.0, help="EMF flush interval (5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: the server process
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: the load generator process
    args = parser.parse_args(argv)
    if args.serve:
        serve(json.loads(Path(args.serve).read_text()))
        return 0
    if args.load:
        sys.stdout.write(json.dumps(load(json.loads(args.load))) + "\n")
        return 0
    only = args.only.split(",") if args.only else list(CASES)
    unknown = set(only) - set(CASES)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    if args.repeat < 1 or args.ops < 1 or args.seconds <= 0 or args.connections < 1:
        parser.error("--repeat, --ops, --seconds and --connections must be positive")
    report: dict = {"date": dt.date.today().isoformat(), "repeat": args.repeat}
    try:
        report["machine"] = machine()
        with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
            workdir = Path(tmp)
            started = time.monotonic()
            benches = {
                "mlflow": lambda: bench_mlflow(workdir, args.repeat, args.ops, args.metrics_seconds),
                "handshake": lambda: bench_handshake(workdir, args.repeat, args.seconds),
                "rps": lambda: bench_rps(
                    workdir, args.repeat, args.seconds, args.connections, args.metrics_seconds
                ),
            }
            for name in CASES:
                if name in only:
                    before = cpu_snapshot()
                    report[name] = benches[name]()
                    report[name]["others_cores"] = others_cores(before)
            report["total_seconds"] = time.monotonic() - started
    except (RuntimeError, OSError, subprocess.SubprocessError, ssl.SSLError) as exc:
        sys.stderr.write(f"bench_tls: error: {exc}\n")
        return 1
    report["figures"] = figures(report)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        print_report(report)
        sys.stdout.write(f"\ntotal: {report['total_seconds']:.0f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
