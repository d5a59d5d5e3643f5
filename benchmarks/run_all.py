"""Every benchmark in one run, one report: benchmarks/RESULTS.md (`make bench`).

Runs bench_prd (the PRD's comparison), bench_tls (keep-alive mTLS vs plain, ECDSA vs RSA-4096
handshakes, the middleware's cost), bench_proxy (the API's `/mlflow` proxy against calling MLflow
directly: p50 at 50 concurrent clients, a 50 MB download and upload), bench_sidecar (ours against
nginx terminating mTLS in front of a plain `mlflow server`), bench_keys (API keys from our store:
cache-miss validation with 100,000 keys on SQLite and PostgreSQL, usage recording on vs off),
bench_issuance (our CLI vs the seed's openssl script) and bench_synth (cdk synth of 1/3/10
environments), each as its own process with `--json`, so one bench's servers, environment
variables and imports cannot touch another's and a crash is reported instead of ending the suite.
Each bench computes its own figures against its targets (`benchmarks.common.figure`); this script
tabulates them, describes the machine, and writes the report with how to reproduce it. Ratios come
from one run of one bench on one machine: both sides of every ratio are measured in the same process
run, interleaved.

    python benchmarks/run_all.py                     # full sizes, about 6-8 minutes on 2 cores
    python benchmarks/run_all.py --quick             # small samples, about 2 minutes: noisy ratios
    python benchmarks/run_all.py --smoke             # does every bench still run? the least work
                                                     # each bench accepts, all at once (make test)
    python benchmarks/run_all.py --only prd,tls      # a subset
    python benchmarks/run_all.py --auth-delay-ms 20  # the auth-service double answers 20 ms later
    python benchmarks/run_all.py --output /tmp/r.md  # write the report elsewhere (tests do)

It reports, it does not gate: a missed target is a MISS in the report and the exit status is
still 0. The status is 1 only if a bench failed to run (its section then says why).

`--smoke` measures nothing worth reading: one sample per case, and the benches run side by side
(`--jobs`, default all at once; 1, one after the other, for the other sizes), so each slows the
others down. It checks that every bench starts its servers, runs every case and reports figures
with a verdict, in a fraction of `--quick`'s time; tests/integration/test_benchmarks.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import child_env, cpu_snapshot, machine, others_cores  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "RESULTS.md"


@dataclass(frozen=True)
class Bench:
    script: str
    title: str
    what: str
    full: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    smoke: list[str] = field(default_factory=list)
    """The least work the bench accepts: every case once, at the smallest size."""


BENCHES: dict[str, Bench] = {
    "prd": Bench(
        "bench_prd.py",
        "The PRD's comparison: the seed's internal path vs ours",
        "MLflow's client, `log_metric` + `get_run`, against one `serve-mlflow` (permissive: TLS and plain "
        "HTTP on one port). Ours: mTLS with the API service's certificate, no auth service. Seed: plain "
        "HTTP + API key through the auth-service double and a real Redis key cache and rate limit, with "
        "the cache warm and with a miss on every request (a key the cache has never seen). Calls to the "
        "auth service are counted by the double.",
        full=[],  # --ops 600 --warmup 20
        quick=["--ops", "60", "--warmup", "5"],
        smoke=["--ops", "1", "--warmup", "1"],
    ),
    "tls": Bench(
        "bench_tls.py",
        "What mTLS costs on the request path",
        "(1) MLflow's client over keep-alive mTLS vs plain HTTP + API key (warm in-memory cache), same "
        "server and port; (2) full handshakes per second, a new connection each, ECDSA P-256 vs the seed's "
        "RSA-4096, and the raw handshake in memory; (3) requests/s through the middleware's mTLS path vs "
        "the bare app (a trivial Starlette app, so the middleware's share is as large as it gets).",
        full=[],  # --repeat 3 --ops 150 --seconds 4
        quick=["--repeat", "1", "--ops", "30", "--seconds", "1", "--metrics-seconds", "1"],
        smoke=[
            "--repeat",
            "1",
            "--ops",
            "1",
            "--seconds",
            "0.2",
            "--connections",
            "1",
            "--metrics-seconds",
            "1",
        ],
    ),
    "proxy": Bench(
        "bench_proxy.py",
        "The API's /mlflow proxy against calling MLflow directly",
        "One `serve-mlflow` (strict mTLS) and one `serve-api` in front of it, as the images run them. "
        "Direct: https:// to MLflow with the API's client certificate; proxied: http:// to the API with "
        "an API key, then the proxy's pooled mTLS connections. 50 concurrent keep-alive callers "
        "(MLflow's `/version` and `experiments/get`, rounds alternating), the TLS handshakes MLflow "
        "counted per proxied request, and a 50 MB artifact downloaded and uploaded both ways.",
        full=[],  # --clients 50 --rounds 6 --requests 5 --size-mb 50 --transfers 5
        quick=["--rounds", "2", "--requests", "3", "--transfers", "1"],
        smoke=["--clients", "1", "--rounds", "1", "--requests", "1", "--size-mb", "1", "--transfers", "1"],
    ),
    "sidecar": Bench(
        "bench_sidecar.py",
        "Ours against the sidecar: nginx terminating mTLS before a plain mlflow server",
        "The same certificates and worker count N (the machine's CPUs) on both sides. Ours: `serve-mlflow` "
        "in strict mode with `HOKUSAI_MTLS_WORKERS=N`. Sidecar: Debian's nginx (`worker_processes N`, "
        "`ssl_verify_client on`) proxying over kept-alive upstream connections to `mlflow server --workers N`. "
        "MLflow's `experiments/get`: p50 over one kept-alive connection, p50 with a full handshake per "
        "request, server CPU per full handshake (each side's whole process tree), requests/s at 32 "
        "keep-alive clients (the load generator shares the cores), and memory. Sides alternate.",
        full=[],  # --rounds 3 --requests 200 --new-connections 100 --seconds 4 --clients 32
        quick=[
            "--rounds",
            "1",
            "--requests",
            "50",
            "--new-connections",
            "30",
            "--seconds",
            "2",
            "--settle",
            "30",
        ],
        smoke=[
            "--rounds",
            "1",
            "--requests",
            "1",
            "--new-connections",
            "1",
            "--seconds",
            "0.2",
            "--clients",
            "2",
            "--settle",
            "0",
            "--no-jobs",  # no MLflow job runners: 14 huey consumers importing MLflow, 20-30 s of CPU
        ],
    ),
    "keys": Bench(
        "bench_keys.py",
        "API keys from our store: cache-miss validation with 100,000 keys, and usage recording's cost",
        "(1) `KeyStoreBackend.validate` (the middleware's cache-miss path, its thread pool) against a store "
        "of 100,000 keys (a sample made by `KeyStore.create`, the rest bulk-inserted), on a SQLite file and "
        "on a PostgreSQL the bench starts (Debian's): known, unknown and malformed keys, one at a time, the "
        "stores taking turns; issue 14's goal p99 <= 5 ms (the seed: < 50 ms). (2) Real `serve-api` "
        "processes on each database with `HOKUSAI_MTLS_KEY_USAGE=on` and `off`, 4 keep-alive clients "
        "sending a key to a trivial platform route (`benchmarks/keys_app.py`), rounds alternating: "
        "latency and req/s on / off (goal <= 1.05x), and the usage rows each store then holds.",
        full=[],  # --keys 100000 --sample 100 --lookups 2000 --clients 4 --rounds 10 --requests 150
        quick=["--lookups", "500", "--rounds", "3", "--requests", "100"],
        smoke=[
            "--keys",
            "1000",
            "--sample",
            "5",
            "--lookups",
            "10",
            "--clients",
            "2",
            "--rounds",
            "1",
            "--requests",
            "2",
        ],
    ),
    "issuance": Bench(
        "bench_issuance.py",
        "Certificate issuance: our CLI vs the seed's openssl script",
        "`hokusai-mtls certs issue` as a user runs it (a fresh process, start-up included) against the "
        "PRD's `generate_mtls_certs.sh` (six openssl processes, RSA-4096), as written and with the worker "
        "certificate our set also issues.",
        full=["--repeat", "5"],
        quick=["--repeat", "1"],
        smoke=["--repeat", "1"],  # one warm-up round and one timed round: 14 RSA-4096 keys
    ),
    "synth": Bench(
        "bench_synth.py",
        "cdk synth: how it grows with environments",
        "`npx cdk synth '**'` as `make synth` runs it (3 environments, cdk-nag), then the app with 1, 3 "
        "and 10 stages in a fresh process each, synthesis timed apart from start-up. The issue sets no "
        "target; the check is that it grows no faster than linearly.",
        full=["--repeat", "3", "--stages", "1,3,10"],
        quick=["--repeat", "1", "--stages", "1,3"],
        smoke=["--repeat", "1", "--stages", "1,2"],  # the CLI's synth, then 1 and 2 stages in-process
    ),
}


RUNNING: set[subprocess.Popen] = set()
"""The bench processes running now (several with --jobs): what Ctrl-C stops."""
_running_lock = threading.Lock()


@dataclass
class Outcome:
    name: str
    argv: list[str]
    seconds: float
    others_cores: float
    report: dict | None = None
    error: str | None = None


def run_bench(name: str, bench: Bench, args: argparse.Namespace) -> Outcome:
    """One bench in its own process; its JSON document, or why there is none."""
    sizes = bench.smoke if args.smoke else bench.quick if args.quick else bench.full
    extra = ["--auth-delay-ms", f"{args.auth_delay_ms:g}"] if name == "prd" and args.auth_delay_ms else []
    argv = [sys.executable, str(HERE / bench.script), *sizes, *extra, "--json"]
    before = cpu_snapshot()
    started = time.monotonic()
    # Its own process group: on a timeout or Ctrl-C the bench's servers (serve-mlflow,
    # redis-server, load generators) are stopped with it, not left running.
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with _running_lock:
        RUNNING.add(process)
    try:
        stdout, stderr = process.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        stop_group(process)
        seconds = time.monotonic() - started
        return Outcome(
            name, argv, seconds, others_cores(before), error=f"timed out after {args.timeout:.0f} s"
        )
    except KeyboardInterrupt:
        stop_group(process)
        raise
    finally:
        with _running_lock:
            RUNNING.discard(process)
    outcome = Outcome(name, argv, time.monotonic() - started, others_cores(before))
    if process.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        outcome.error = f"exited {process.returncode}:\n{tail}"
        return outcome
    try:
        outcome.report = json.loads(stdout)
        figures = outcome.report["figures"]
        if not figures or not all({"name", "value", "target", "verdict"} <= set(f) for f in figures):
            raise ValueError("no figures in its report")
    except (ValueError, KeyError, TypeError) as exc:
        outcome.report = None
        outcome.error = f"unreadable report ({exc}); stdout ends: {stdout.strip()[-500:]}"
    return outcome


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the bench's process group (it cleans up its servers), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.communicate(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_side_by_side(one: Callable[[int, str], Outcome], names: list[str], jobs: int) -> list[Outcome]:
    """`one` for every bench, `jobs` at a time, in threads; Ctrl-C stops every running bench.

    The benches' process groups do not see the terminal's SIGINT (their own sessions), and only
    this thread gets KeyboardInterrupt: SIGTERM to each group, SIGKILL to what is left after 30 s.
    """
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(one, index, name) for index, name in enumerate(names, start=1)]
    try:
        return [future.result() for future in futures]
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with _running_lock:
                running = list(RUNNING)
            for process in running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
            if not wait_for(futures, timeout=wait).not_done:
                break
        raise
    finally:
        pool.shutdown(wait=False)


# --- the report -------------------------------------------------------------------------------------
def value_text(f: dict) -> str:
    unit = f.get("unit", "")
    if unit == "x":
        return f"{f['value']:.3f}x"
    if unit == "s":
        return f"{f['value']:.1f} s"
    return f"{f['value']:g}{unit}"


def figure_rows(figures: list[dict]) -> list[str]:
    rows = ["| figure | value | measured | target | verdict |", "| --- | ---: | --- | --- | --- |"]
    rows += [
        f"| {f['name']} | {value_text(f)} | {f['detail']} | {f['target']} | **{f['verdict']}** |"
        for f in figures
    ]
    return rows


def git_revision() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def node_version() -> str | None:
    node = ROOT / ".venv" / "bin" / "node"
    if not node.exists():
        return None
    return subprocess.run(
        [str(node), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()


def command_line(args: argparse.Namespace) -> str:
    parts = ["python", "benchmarks/run_all.py"]
    if args.smoke:
        parts.append("--smoke")
    if args.quick:
        parts.append("--quick")
    if args.only:
        parts += ["--only", args.only]
    if args.auth_delay_ms:
        parts += ["--auth-delay-ms", f"{args.auth_delay_ms:g}"]
    return " ".join(parts)


def sizes_text(args: argparse.Namespace) -> str:
    if args.smoke:
        return (
            f"SMOKE sizes (one sample per case, {args.jobs} bench(es) at a time: it checks that every "
            "bench runs; its numbers are not figures)"
        )
    return "QUICK sizes (small samples, noisy ratios)" if args.quick else "full sizes"


def render(outcomes: list[Outcome], args: argparse.Namespace, info: dict, total_s: float) -> str:
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    busy = max((o.others_cores for o in outcomes), default=0.0)
    out = [
        "# Benchmark results",
        "",
        f"Written by `{command_line(args)}` on {started}, working tree `{git_revision()}`, "
        f"{sizes_text(args)}; "
        f"the whole run took {total_s:.0f} s.",
        "Every ratio compares two cases measured in the same run of one bench, on this machine, "
        "interleaved so drift hits both. The suite reports, it does not gate: MISS marks a missed target.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPU | {info['cpu']} |",
        f"| cores | {info['cores']} |",
        f"| memory | {info['memory_gib']} GiB |",
        f"| kernel | {info['kernel']} |",
        f"| Python | {info['python']} ({info['python_ssl']}) |",
        f"| cryptography | {info['cryptography']} |",
        f"| openssl CLI | {info['openssl_cli']} |",
        f"| mlflow / uvicorn | {info['mlflow']} / {info['uvicorn']} |",
        f"| redis-server | {info['redis_server']} |",
        f"| Node | {node_version()} |",
        f"| other load | other processes used up to {busy:.2f} cores on average during a bench "
        f"(per bench below){'; rerun on an idle machine' if busy > 0.25 else ''} |",
        "",
        "## Summary",
        "",
        "| benchmark | figure | value | target | verdict |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for o in outcomes:
        if o.report is None:
            out.append(f"| {o.name} | (failed to run) | | | **ERROR** |")
            continue
        out += [
            f"| {o.name} | {f['name']} | {value_text(f)} | {f['target']} | **{f['verdict']}** |"
            for f in o.report["figures"]
        ]
    for index, o in enumerate(outcomes, start=1):
        bench = BENCHES[o.name]
        out += [
            "",
            f"## {index}. {o.name}: {bench.title} (`benchmarks/{bench.script}`)",
            "",
            bench.what,
            "",
            f"Command: `{shlex.join(['python', f'benchmarks/{bench.script}', *o.argv[2:-1]])}` (with `--json`); "
            f"took {o.seconds:.0f} s; other processes used {o.others_cores:.2f} cores on average meanwhile.",
            "",
        ]
        if o.report is None:
            out += ["**ERROR**: the bench did not produce figures:", "", "```", o.error or "", "```"]
            continue
        out += figure_rows(o.report["figures"])
        out += details(o.name, o.report)
    out += [
        "",
        "## How to reproduce",
        "",
        "```sh",
        "make bench                                        # = python benchmarks/run_all.py, full sizes",
        "make bench BENCH_ARGS=--quick                     # about 2 minutes, small samples",
        "make bench BENCH_ARGS=--smoke                     # does every bench run? (no figures)",
        f"{command_line(args)}",
        "python benchmarks/bench_prd.py --auth-delay-ms 20  # one bench alone, its own table",
        "```",
        "",
        "Needs the project's `.venv` and `node_modules` (`make synth` sets both up), `redis-server` and "
        "`openssl` on PATH, and Debian's `postgresql` and `nginx` packages (bench_keys, bench_sidecar). Everything binds 127.0.0.1 on free ports; moto stands in for Secrets Manager, "
        "the auth-service test double for the external auth service. For figures worth comparing, run on "
        "an otherwise idle machine: the `other load` row says how busy it was.",
        "",
    ]
    return "\n".join(out)


def details(name: str, report: dict) -> list[str]:
    """Per-bench lines under the table: sample sizes and the numbers behind the ratios."""
    if name == "prd":
        r = report["result"]
        lines = [
            "",
            f"{report['ops']} timed iterations (+{report['warmup']} warm-up), each one `log_metric` and one "
            f"`get_run` on every path, paths in rotating order; auth-service double delay "
            f"{report['auth_delay_ms']:g} ms. The server's own counts over the timed part: {r['server_counts']}; Redis's: {r['redis_counts']}.",
            "",
            "| call / path | n | p50 | p99 | mean | auth-service calls per 1,000 |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, row in r["rows"].items():
            path = key.split("/")[1]
            lines.append(
                f"| {key} | {row['n']} | {row['p50_ms']:.2f} ms | {row['p99_ms']:.2f} ms | "
                f"{row['mean_ms']:.2f} ms | {r['auth_calls_per_1000'][path]:.0f} |"
            )
        return lines
    if name == "tls":
        lines = ["", f"{report['repeat']} timed rounds per case."]
        if "mlflow" in report:
            lines.append(
                f"MLflow: {report['mlflow']['log_lines']['timed_requests']} timed requests; server stdout "
                f"{report['mlflow']['log_lines']['stdout_lines_during_timed_run']} lines meanwhile (EMF per "
                "interval, no line per request)."
            )
        if "rps" in report:
            b = report["rps"]["in_process_us"]
            lines.append(
                f"Middleware in-process: app {b['app_us']:.1f} us, app + middleware "
                f"{b['app_with_middleware_us']:.1f} us per request."
            )
        return lines
    if name == "proxy":
        r = report["result"]
        lat, bodies = r["latency"], r["bodies"]
        lines = [
            "",
            f"{lat['clients']} concurrent callers x {lat['requests_per_client']} requests x {lat['rounds']} rounds "
            f"per case and call; bodies {bodies['size_bytes'] / 1e6:.0f} MB, {bodies['repeat']} each way.",
            "",
            "| call / case | n | p50 | p99 | new handshakes per request |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for call, measured in lat["calls"].items():
            lines += [
                f"| {call} / {case} | {row['n']} | {row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms | "
                f"{row['handshakes_per_request']:.3f} |"
                for case, row in measured["rows"].items()
            ]
        lines += ["", "| body / case | median | MB/s |", "| --- | ---: | ---: |"]
        for kind in ("download", "upload"):
            lines += [
                f"| {kind} / {case} | {row['median_s']:.3f} s | {row['mb_per_s']:.0f} |"
                for case, row in bodies[kind]["rows"].items()
            ]
        return lines
    if name == "sidecar":
        r = report["result"]
        o, c = r["ours"], r["sidecar"]
        upstream = "kept-alive" if report["upstream_keepalive"] else "a new connection per request"
        lines = [
            "",
            f"{report['workers']} worker(s) per side, {report['rounds']} round(s); per side and round "
            f"{report['requests']} keep-alive and {report['new_connections']} new-connection calls, "
            f"{report['seconds']:g} s of handshakes and {report['seconds']:g} s at {report['clients']} "
            f"clients; nginx {report['nginx']}, upstream {upstream}, MLflow's job runners "
            f"{'on' if report['jobs'] else 'off'}. Answers: ours {o['statuses']}, "
            f"sidecar {c['statuses']}; without a certificate: ours {o['without_certificate']}, "
            f"sidecar {c['without_certificate']}.",
            "",
            "| | ours | sidecar |",
            "| --- | ---: | ---: |",
        ]
        rows = [
            (
                "keep-alive p50 / p99",
                lambda x: f"{x['keepalive']['p50_ms']:.2f} / {x['keepalive']['p99_ms']:.2f} ms",
            ),
            (
                "new connection p50 / p99",
                lambda x: f"{x['new_connection']['p50_ms']:.2f} / {x['new_connection']['p99_ms']:.2f} ms",
            ),
            ("server CPU per full handshake", lambda x: f"{x['handshake_server_cpu_ms']:.2f} ms"),
            (f"req/s at {report['clients']} clients", lambda x: f"{x['requests_per_s']:.0f}"),
            ("server CPU per request under load", lambda x: f"{x['server_cpu_ms_per_request']:.2f} ms"),
            ("load generator (same cores)", lambda x: f"{x['load_generator_cores']:.2f} cores"),
            ("RSS / PSS", lambda x: f"{x['rss_mib']:.0f} / {x['pss_mib']:.0f} MiB"),
            ("processes", lambda x: str(x["processes"])),
        ]
        lines += [f"| {label} | {fmt(o)} | {fmt(c)} |" for label, fmt in rows]
        return lines
    if name == "keys":
        r = report["result"]
        v, u, versions = r["validation"], r["usage"], r["versions"]
        bulk = v["keys"] - v["sample"]
        lines = [
            "",
            f"SQLite {versions['sqlite']}, PostgreSQL {versions['postgresql']}, SQLAlchemy "
            f"{versions['sqlalchemy']}, psycopg {versions['psycopg']}. {v['keys']:,} keys per store: "
            f"{v['sample']} by `KeyStore.create`, {bulk:,} bulk-inserted ("
            + "; ".join(f"{database} {m['insert_s']:.2f} s" for database, m in v["stores"].items())
            + f"); {v['lookups']} known, {max(1, v['lookups'] // 2)} unknown and as many malformed "
            "lookups per store.",
            "",
            "| store / key | n | p50 | p99 | max | mean |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for database, measured in v["stores"].items():
            lines += [
                f"| {database} / {kind} | {row['n']} | {row['p50_ms']:.2f} ms | {row['p99_ms']:.2f} ms | "
                f"{row['max_ms']:.2f} ms | {row['mean_ms']:.2f} ms |"
                for kind, row in measured["kinds"].items()
            ]
        lines += [
            "",
            f"Usage: {u['clients']} keep-alive clients x {u['requests_per_client']} requests x {u['rounds']} "
            "rounds per setting; usage rows in each store after its server stopped, against the requests "
            "sent (warm-up included); PostgreSQL's committed transactions in the store per request.",
            "",
            "| store / usage | n | p50 | p99 | mean | req/s | server CPU per request | usage rows | commits per request |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for database, measured in u["databases"].items():
            for case, row in measured["rows"].items():
                rows = row.get("usage_rows")
                commits = (
                    f"{row['store_commits'] / row['requests_sent']:.2f}" if "store_commits" in row else "-"
                )
                lines.append(
                    f"| {database} / {case} | {row['n']} | {row['p50_ms']:.2f} ms | {row['p99_ms']:.2f} ms | "
                    f"{row['mean_ms']:.2f} ms | {row['requests_per_s']:.0f} | "
                    f"{row['server_cpu_ms_per_request']:.2f} ms | "
                    f"{'?' if rows is None else rows} of {row['requests_sent']} | {commits} |"
                )
        return lines
    if name == "issuance":
        lines = ["", "| case | median | min |", "| --- | ---: | ---: |"]
        lines += [
            f"| {r['label']} | {r['median_s']:.3f} s | {r['min_s']:.3f} s |"
            for r in report["results"].values()
        ]
        return lines
    if name == "synth":
        lines = ["", "| stages | start-up | synth | total |", "| ---: | ---: | ---: | ---: |"]
        lines += [
            f"| {n} | {m['startup']:.1f} s | {m['synth']:.1f} s | {m['total']:.1f} s |"
            for n, m in report["median"].items()
        ]
        return lines
    return []


def print_figures(outcome: Outcome) -> None:
    if outcome.report is None:
        print(f"  ERROR: {outcome.error}")
        return
    for f in outcome.report["figures"]:
        print(f"  {f['name']:<72} {value_text(f):>9}  target {f['target']}: {f['verdict']}")
        print(f"      {f['detail']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small samples: a ~2-minute run, noisy ratios")
    sizes.add_argument(
        "--smoke",
        action="store_true",
        help="the least work each bench accepts, benches side by side: does every bench run? (no figures)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="benches run at the same time (default: all with --smoke, else 1: measurements need the machine)",
    )
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)} (default: all)")
    parser.add_argument(
        "--auth-delay-ms",
        type=float,
        default=0.0,
        help="bench_prd: delay the auth-service double (default 0)",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="the report (default benchmarks/RESULTS.md)"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds one bench may take (default 1800)"
    )
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    if args.auth_delay_ms < 0:
        parser.error("--auth-delay-ms must not be negative")
    if args.jobs is None:
        args.jobs = len(names) if args.smoke else 1
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {info['kernel']}")
    started = time.monotonic()
    printing = threading.Lock()

    def one(index: int, name: str) -> Outcome:
        bench = BENCHES[name]
        with printing:
            print(f"[{index}/{len(names)}] {name}: {bench.title} ...", flush=True)
        outcome = run_bench(name, bench, args)
        with printing:  # a bench's lines together, also when benches run side by side
            done = f"[{index}/{len(names)}] {name} done " if args.jobs > 1 else "  "
            print(
                f"{done}({outcome.seconds:.0f} s; other processes used {outcome.others_cores:.2f} cores meanwhile)"
            )
            print_figures(outcome)
            sys.stdout.flush()
        return outcome

    if args.jobs == 1:  # in this thread: Ctrl-C reaches run_bench, which stops the bench
        outcomes = [one(index, name) for index, name in enumerate(names, start=1)]
    else:
        outcomes = run_side_by_side(one, names, args.jobs)
    total = time.monotonic() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(outcomes, args, info, total))
    failed = [o.name for o in outcomes if o.report is None]
    misses = sum(f["verdict"] == "MISS" for o in outcomes if o.report for f in o.report["figures"])
    print(f"\nreport: {args.output}; {total:.0f} s in all; {misses} target(s) missed", end="")
    print(f"; FAILED to run: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
