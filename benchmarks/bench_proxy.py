"""The API's `/mlflow` proxy against calling MLflow directly: latency under load, and bulk bodies.

Issue 11 item 8 (an outside run): above 20 concurrent proxied calls most requests paid a full
mTLS handshake to MLflow (the API's pool kept 20 idle connections), and a 50 MB artifact came
through the proxy at about 110 MB/s against 290 MB/s directly. This measures both, the way they
are deployed: one real `hokusai-mtls serve-mlflow` (strict mTLS, SQLite in /dev/shm, local
artifact store) and one real `hokusai-mtls serve-api` in front of it (the images' commands,
certificates from moto's Secrets Manager, API keys through the auth-service test double,
in-memory key cache), every process on 127.0.0.1.

  direct    https:// to MLflow with the API service's client certificate (mTLS path);
  proxied   http:// to the API with an API key: the middleware's API-key path, then the proxy,
            which calls MLflow over mTLS with the API's own certificate.

1. **latency**: `--clients` (50) callers, each with its own keep-alive connection and one request
   in flight (`GET experiments/get`), in rounds that alternate direct / proxied after a warm-up
   round of each. Figures: proxied p50 / direct p50 (target <= 1.2x), and the new TLS handshakes
   MLflow completed per proxied request (its `hokusai_mtls_handshakes_completed` counter around
   each proxied round; with connection reuse about 0).
2. **download**: a `--size-mb` (50) artifact from MLflow's artifact store
   (`GET /api/2.0/mlflow-artifacts/artifacts/...`), alternately through the proxy and directly,
   one at a time; proxied time / direct time (target <= 1.2x), and MB/s of each.
3. **upload**: the same size `PUT` into the artifact store both ways (information).

Bodies are read and written in 1 MiB pieces by the bench and never kept. It reports, it does not
judge: a missed target prints MISS and exits 0; non-zero only when something fails to run.

    python benchmarks/bench_proxy.py [--clients 50] [--rounds 6] [--requests 5]
        [--size-mb 50] [--transfers 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import (  # noqa: E402  (after the path set-up)
    SNI,
    figure,
    free_port,
    percentile,
    run_bench,
    secrets_with_a_set,
    stop,
)
from runtime.serving.connection_limits import MLFLOW_LIMITS  # noqa: E402

ENVIRONMENT = "staging"
TARGET_RATIO = 1.2
MiB = 1024 * 1024
PIECE = MiB  # what the bench reads or writes at a time
BENCH_KEY = "hk_bench_proxy_0123456789abcdef"
ARTIFACT = "bench/blob.bin"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
CALLS = {
    "version": "/version",
    "get_experiment": "/api/2.0/mlflow/experiments/get?experiment_id=0",
}
"""The latency calls: MLflow's lightest (its version: our middleware, MLflow's app, no database),
where the proxy's share of the time is largest, and a database read."""
CASES = ("direct", "proxied")


CLIENT_KEEPALIVE_SECONDS = MLFLOW_LIMITS.keepalive_timeout - 1
"""The bench's own clients drop an idle connection before MLflow's keep-alive (5 s) closes it: on a
busy machine a round of the other case can outlast it, and a request on a connection MLflow is
just closing fails with "Server disconnected" (a CI run did). The API keeps its connections 65 s."""


@dataclass
class Stack:
    """The two servers and how to reach them."""

    mlflow_url: str
    mlflow_health: int
    api_url: str
    files: dict[str, Path]
    artifacts: Path
    mlflow_startup_s: float
    api_startup_s: float

    def handshakes(self) -> float:
        """TLS handshakes MLflow's mTLS port has completed since it started (its own counter)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.mlflow_health}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "hokusai_mtls_handshakes_completed_total"
        )

    def mtls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.files["ca"]))
        context.load_cert_chain(self.files["client"])
        return context

    def base(self, case: str) -> tuple[str, str]:
        """(base URL, path prefix) of one case."""
        return (self.mlflow_url, "") if case == "direct" else (self.api_url, "/mlflow")

    def headers(self, case: str) -> dict[str, str]:
        return {} if case == "direct" else {"authorization": f"Bearer {BENCH_KEY}"}


@contextlib.contextmanager
def running_stack(workdir: Path) -> Iterator[Stack]:
    """serve-mlflow (strict) and serve-api as the images run them; everything stopped on exit."""
    import logging

    from moto.server import ThreadedMotoServer

    from local_stack.auth_service import FakeAuthService, key_record
    from local_stack.environment import container_command, service_environment, wait_healthy
    from runtime import names

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every call
    stack = contextlib.ExitStack()
    try:
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        stack.callback(moto.stop)
        endpoint, files = secrets_with_a_set(moto, ENVIRONMENT, workdir / "client")
        auth = FakeAuthService(
            {
                BENCH_KEY: key_record(
                    "key-bench", scopes=["mlflow:read", "mlflow:write"], rate_limit_per_hour=10**8
                )
            }
        )
        auth_url = auth.start()
        stack.callback(auth.stop)

        shm = Path("/dev/shm")  # noqa: S108 - a private TemporaryDirectory inside it
        database = Path(
            stack.enter_context(tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else workdir))
        )
        artifacts = database / "artifacts"  # memory-backed too: the bench measures the network path
        common = {
            names.ENV_INTERNAL_CIDRS: "10.0.0.0/8",
            names.ENV_AUTH_SERVICE_URL: auth_url,
            names.ENV_METRICS_SECONDS: "60",
        }
        port, health = free_port(), free_port()
        mlflow_env = service_environment(
            ENVIRONMENT,
            endpoint,
            **common,
            **{
                names.ENV_MTLS_MODE: names.MTLS_MODE_STRICT,
                names.ENV_CERT_DIR: str(workdir / "mlflow-certs"),
                names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{database}/mlflow.db",
                names.ENV_MLFLOW_ARTIFACTS_DESTINATION: str(artifacts),
            },
        )
        mlflow_log = workdir / "mlflow.log"
        with mlflow_log.open("w") as out:
            mlflow = subprocess.Popen(
                [
                    *container_command("Dockerfile.mlflow"),
                    *("--host", "127.0.0.1", "--port", str(port), "--health-port", str(health)),
                ],
                cwd=ROOT,
                env=mlflow_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        stack.callback(stop, mlflow)
        api_port = free_port()
        api_env = service_environment(
            ENVIRONMENT,
            endpoint,
            **common,
            **{
                names.ENV_CERT_DIR: str(workdir / "api-certs"),
                "MLFLOW_TRACKING_URI": f"https://{SNI}:{port}",
            },
        )
        api_log = workdir / "api.log"
        with api_log.open("w") as out:
            api = subprocess.Popen(
                [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(api_port)],
                cwd=ROOT,
                env=api_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        stack.callback(stop, api)
        started = time.monotonic()
        wait_healthy(api, api_port, api_log, seconds=120)
        api_startup = time.monotonic() - started
        report = wait_healthy(mlflow, health, mlflow_log, seconds=120)
        if report.get("status") != "ok":
            raise RuntimeError(f"serve-mlflow reports {report}")
        yield Stack(
            mlflow_url=f"https://{SNI}:{port}",
            mlflow_health=health,
            api_url=f"http://127.0.0.1:{api_port}",
            files=files,
            artifacts=artifacts,
            mlflow_startup_s=time.monotonic() - started,
            api_startup_s=api_startup,
        )
    finally:
        stack.close()


# --- 1. latency at N concurrent callers -------------------------------------------------------------
async def latency(stack: Stack, clients: int, rounds: int, requests: int) -> dict:
    """Per call: `rounds` rounds per case, alternating, each `clients` callers x `requests` calls.

    Rounds are kept short (a few seconds): a connection idle for longer than a keep-alive (4 s in
    the API's pool, 5 s on MLflow) is closed, and its next request would count a handshake that
    says nothing about the pool.
    """
    import httpx

    limits = httpx.Limits(
        max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=CLIENT_KEEPALIVE_SECONDS
    )
    callers = {}
    for case in CASES:
        base, prefix = stack.base(case)
        callers[case] = httpx.AsyncClient(
            base_url=base + prefix,
            headers=stack.headers(case),
            verify=stack.mtls_context() if case == "direct" else True,
            limits=limits,
            timeout=httpx.Timeout(30.0),
        )

    async def one_round(case: str, path: str, per_client: int) -> list[float]:
        client = callers[case]

        async def caller() -> list[float]:
            seconds = []
            for _ in range(per_client):
                t0 = time.perf_counter()
                response = await client.get(path)
                seconds.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    raise RuntimeError(f"{case} {path}: {response.status_code} {response.text[:300]}")
            return seconds

        results = await asyncio.gather(*(caller() for _ in range(clients)))
        return [s for one in results for s in one]

    out: dict = {"clients": clients, "rounds": rounds, "requests_per_client": requests, "calls": {}}
    try:
        for call, path in CALLS.items():
            for case in CASES:  # warm-up: connections open, the API's key cache holds the key
                await one_round(case, path, 2)
            seconds: dict[str, list[float]] = {case: [] for case in CASES}
            handshakes: dict[str, float] = dict.fromkeys(CASES, 0.0)
            round_p50: dict[str, list[float]] = {case: [] for case in CASES}
            for index in range(rounds):
                for case in CASES if index % 2 == 0 else CASES[::-1]:
                    before = await asyncio.to_thread(stack.handshakes)
                    got = await one_round(case, path, requests)
                    handshakes[case] += await asyncio.to_thread(stack.handshakes) - before
                    seconds[case] += got
                    round_p50[case].append(percentile(got, 50) * 1e3)
            rows = {}
            for case in CASES:
                n = len(seconds[case])
                rows[case] = {
                    "n": n,
                    "p50_ms": percentile(seconds[case], 50) * 1e3,
                    "p99_ms": percentile(seconds[case], 99) * 1e3,
                    "mean_ms": statistics.fmean(seconds[case]) * 1e3,
                    "round_p50_ms": round_p50[case],
                    "new_handshakes": handshakes[case],
                    "handshakes_per_request": handshakes[case] / n,
                }
            out["calls"][call] = {
                "path": path,
                "rows": rows,
                "p50_ratio": rows["proxied"]["p50_ms"] / rows["direct"]["p50_ms"],
                "p99_ratio": rows["proxied"]["p99_ms"] / rows["direct"]["p99_ms"],
            }
    finally:
        for client in callers.values():
            await client.aclose()
    return out


# --- 2. and 3. one large body at a time ---------------------------------------------------------------
def make_artifact(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    piece = os.urandom(PIECE)  # incompressible; the same piece repeated is fine for a transfer
    with path.open("wb") as out:
        for offset in range(0, size, PIECE):
            out.write(piece[: min(PIECE, size - offset)])


def transfers(stack: Stack, size: int, repeat: int) -> dict:
    import httpx

    clients = {
        case: httpx.Client(
            base_url=stack.base(case)[0] + stack.base(case)[1],
            headers=stack.headers(case),
            verify=stack.mtls_context() if case == "direct" else True,
            timeout=60,
            limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_SECONDS),
        )
        for case in CASES
    }
    piece = os.urandom(PIECE)

    def body() -> Iterator[bytes]:
        for offset in range(0, size, PIECE):
            yield piece[: min(PIECE, size - offset)]

    def download(case: str) -> float:
        t0 = time.perf_counter()
        received = 0
        with clients[case].stream("GET", f"{ARTIFACTS_API}/{ARTIFACT}") as response:
            if response.status_code != 200:
                raise RuntimeError(f"{case} download: {response.status_code} {response.read()[:300]!r}")
            for chunk in response.iter_raw(PIECE):
                received += len(chunk)
        seconds = time.perf_counter() - t0
        if received != size:
            raise RuntimeError(f"{case} download: {received} bytes, expected {size}")
        return seconds

    def upload(case: str, index: int) -> float:
        target = f"{ARTIFACTS_API}/bench/upload-{case}-{index}.bin"
        t0 = time.perf_counter()
        response = clients[case].put(target, content=body(), headers={"content-length": str(size)})
        seconds = time.perf_counter() - t0
        if response.status_code != 200:
            raise RuntimeError(f"{case} upload: {response.status_code} {response.text[:300]}")
        stored = stack.artifacts / f"bench/upload-{case}-{index}.bin"
        if stored.stat().st_size != size:
            raise RuntimeError(f"{case} upload stored {stored.stat().st_size} bytes, expected {size}")
        stored.unlink()
        return seconds

    try:
        for case in CASES:  # warm-up: connections, key cache, page cache
            download(case)
        times: dict[str, dict[str, list[float]]] = {
            "download": {c: [] for c in CASES},
            "upload": {c: [] for c in CASES},
        }
        for index in range(repeat):
            for case in CASES if index % 2 == 0 else CASES[::-1]:
                times["download"][case].append(download(case))
            for case in CASES if index % 2 == 0 else CASES[::-1]:
                times["upload"][case].append(upload(case, index))
    finally:
        for client in clients.values():
            client.close()
    out: dict = {"size_bytes": size, "repeat": repeat}
    for kind, by_case in times.items():
        rows = {}
        for case, seconds in by_case.items():
            median = statistics.median(seconds)
            rows[case] = {
                "seconds": seconds,
                "median_s": median,
                "mb_per_s": size / 1e6 / median,
            }
        out[kind] = {"rows": rows, "ratio": rows["proxied"]["median_s"] / rows["direct"]["median_s"]}
    return out


def measure(workdir: Path, args: argparse.Namespace) -> dict:
    size = int(args.size_mb * 1e6)
    with running_stack(workdir) as stack:
        make_artifact(stack.artifacts / ARTIFACT, size)
        started = time.monotonic()
        result = {
            "mlflow_startup_s": stack.mlflow_startup_s,
            "api_startup_s": stack.api_startup_s,
            "latency": asyncio.run(latency(stack, args.clients, args.rounds, args.requests)),
            "bodies": transfers(stack, size, args.transfers),
        }
        result["timed_seconds"] = time.monotonic() - started
    return result


def figures(report: dict) -> list[dict]:
    lat, bodies = report["result"]["latency"], report["result"]["bodies"]
    out = []
    for call, measured in lat["calls"].items():
        d, p = measured["rows"]["direct"], measured["rows"]["proxied"]
        out.append(
            figure(
                f"{call} p50 at {lat['clients']} concurrent clients, proxied / direct",
                measured["p50_ratio"],
                f"{p['p50_ms']:.1f} ms vs {d['p50_ms']:.1f} ms, n={p['n']} each (p99 {measured['p99_ratio']:.2f}x)",
                at_most=TARGET_RATIO,
            )
        )
        out.append(
            figure(
                f"{call}: new MLflow TLS handshakes per proxied request",
                p["handshakes_per_request"],
                f"{p['new_handshakes']:.0f} in {p['n']} proxied requests (direct: {d['new_handshakes']:.0f} in {d['n']})",
                unit="",
            )
        )
    size_mb = bodies["size_bytes"] / 1e6
    for kind in ("download", "upload"):
        rows = bodies[kind]["rows"]
        out.append(
            figure(
                f"{size_mb:.0f} MB {kind}, time via the proxy / directly",
                bodies[kind]["ratio"],
                f"{rows['proxied']['mb_per_s']:.0f} vs {rows['direct']['mb_per_s']:.0f} MB/s, "
                f"median of {bodies['repeat']} each",
                at_most=TARGET_RATIO if kind == "download" else None,
            )
        )
    return out


def print_report(report: dict) -> None:
    info, r = report["machine"], report["result"]
    lat, bodies = r["latency"], r["bodies"]
    out = [
        f"hokusai-mtls /mlflow proxy vs direct, {report['date']}",
        f"machine: {info['cpu']}, {info['cores']} cores; {info['kernel']}; Python {info['python']} "
        f"({info['python_ssl']}); mlflow {info['mlflow']}; uvicorn {info['uvicorn']}",
        f"serve-mlflow (strict) healthy after {r['mlflow_startup_s']:.1f}s, serve-api after "
        f"{r['api_startup_s']:.1f}s; timed part {r['timed_seconds']:.0f}s",
        "",
        f"latency: {lat['clients']} clients x {lat['requests_per_client']} requests x {lat['rounds']} rounds "
        "per case and call, keep-alive",
        f"{'call/case':<24} {'n':>6} {'p50':>9} {'p99':>9} {'mean':>9}  handshakes/request  round p50s",
    ]
    for call, measured in lat["calls"].items():
        for case, row in measured["rows"].items():
            rounds = ", ".join(f"{v:.1f}" for v in row["round_p50_ms"])
            out.append(
                f"{call + '/' + case:<24} {row['n']:>6} {row['p50_ms']:>7.2f}ms {row['p99_ms']:>7.2f}ms "
                f"{row['mean_ms']:>7.2f}ms  {row['handshakes_per_request']:>18.3f}  {rounds}"
            )
    out += ["", f"bodies: {bodies['size_bytes'] / 1e6:.0f} MB, {bodies['repeat']} of each, one at a time"]
    for kind in ("download", "upload"):
        for case, row in bodies[kind]["rows"].items():
            runs = ", ".join(f"{s:.3f}" for s in row["seconds"])
            out.append(
                f"{kind:<9} {case:<8} median {row['median_s']:.3f}s  {row['mb_per_s']:>6.0f} MB/s  ({runs})"
            )
    out.append("")
    for f in report["figures"]:
        value = f"{f['value']:.3f}{f['unit']}"
        out.append(f"{f['name']:<52} {value:>8}  ({f['detail']})  target {f['target']}: {f['verdict']}")
    out.append(
        f"other processes on this machine used {report['others_cores']:.2f} cores on average meanwhile"
    )
    sys.stdout.write("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent callers (default 50)")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per case and call (default 6)")
    parser.add_argument("--requests", type=int, default=5, help="requests per caller per round (default 5)")
    parser.add_argument("--size-mb", type=float, default=50, help="body size in MB (default 50)")
    parser.add_argument("--transfers", type=int, default=5, help="downloads and uploads per case (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)
    if min(args.clients, args.rounds, args.requests, args.transfers) < 1 or args.size_mb <= 0:
        parser.error("--clients, --rounds, --requests and --transfers must be at least 1, --size-mb positive")
    report: dict = {"date": dt.date.today().isoformat(), "args": vars(args)}
    return run_bench(
        "proxy", report, lambda tmp: measure(tmp, args), figures, print_report, as_json=args.json
    )


if __name__ == "__main__":
    sys.exit(main())
