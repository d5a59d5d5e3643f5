"""How long does issuing an environment's certificates take: our CLI against the seed's openssl recipe?

Why: the PRD's `scripts/generate_mtls_certs.sh` (seed 001) makes RSA-4096 keys with six
`openssl` processes; `hokusai-mtls certs issue` makes ECDSA P-256 keys in one Python
process and verifies the whole set before writing it. The claim to check is that ours is
at least 20x faster *as a user runs it*, Python start-up included. So each case runs as
a fresh process in a fresh directory:

  ours        `hokusai-mtls certs issue --env development --out DIR` (CA, server, api, worker)
  in-process  `CertificateSet.issue("development")` alone: the crypto without start-up or I/O
  seed        the seed's bash script, verbatim (CA, server, one client)
  seed+worker the same plus the worker client certificate, so it issues what our set issues

Cases run round-robin (after one untimed warm-up round) so drift hits all of them alike.
The script reports median and min wall time and PASS/MISS against the target; it exits
non-zero only when something fails to run, never because the target is missed.

    python3 benchmarks/bench_issuance.py [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import figure, machine  # noqa: E402  (after the path set-up)
from runtime.certificates.certset import CertificateSet  # noqa: E402

TARGET = 20.0
"""The seed's recipe divided by ours must be at least this."""

# Seed 001, "1. Certificate Generation (Development)", reproduced exactly.
SEED_SCRIPT = """\
#!/bin/bash
# Generate CA, server, and client certificates for mTLS

# Generate CA
openssl req -x509 -newkey rsa:4096 -days 365 \\
  -keyout ca-key.pem -out ca-cert.pem \\
  -subj "/CN=Hokusai MLflow CA" -nodes

# Generate server certificate
openssl req -newkey rsa:4096 -keyout server-key.pem \\
  -out server-req.pem -subj "/CN=mlflow.hokusai-development.local" -nodes
openssl x509 -req -in server-req.pem -days 365 \\
  -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \\
  -out server-cert.pem

# Generate client certificate
openssl req -newkey rsa:4096 -keyout client-key.pem \\
  -out client-req.pem -subj "/CN=hokusai-api-client" -nodes
openssl x509 -req -in client-req.pem -days 365 \\
  -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \\
  -out client-cert.pem
"""

# The same recipe for the worker identity our set also issues.
WORKER_BLOCK = """
# Generate worker client certificate (added for a like-for-like comparison)
openssl req -newkey rsa:4096 -keyout worker-key.pem \\
  -out worker-req.pem -subj "/CN=hokusai-worker-client" -nodes
openssl x509 -req -in worker-req.pem -days 365 \\
  -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \\
  -out worker-cert.pem
"""

OUR_FILES = [f"{n}.{e}" for n in ("ca", "server", "api", "worker") for e in ("crt", "key")]
SEED_FILES = ["ca-cert.pem", "server-cert.pem", "client-cert.pem"]


def cli_command() -> list[str]:
    """The installed entry point if the venv has one, else the module (same code)."""
    script = ROOT / ".venv" / "bin" / "hokusai-mtls"
    return [str(script)] if script.exists() else [sys.executable, "-m", "runtime.cli"]


def run(argv: list[str], cwd: Path, expect: list[str]) -> None:
    """Run one process to completion; a failure or a missing output file is an error.

    PYTHONPATH holds the checkout, so `python -m runtime.cli` works from any directory.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    missing = [name for name in expect if not (cwd / name).is_file()]
    if done.returncode != 0 or missing:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{argv[0]} exited {done.returncode}, missing {missing}: {' | '.join(tail)}")


def make_cases(workdir: Path) -> dict[str, tuple[str, Callable[[Path], None]]]:
    bash = shutil.which("bash")
    if bash is None or shutil.which("openssl") is None:
        raise RuntimeError("bash and openssl must be on PATH")
    (workdir / "seed.sh").write_text(SEED_SCRIPT)
    (workdir / "seed_worker.sh").write_text(SEED_SCRIPT + WORKER_BLOCK)
    cli = cli_command()
    return {
        "ours_cli": (
            "ours: hokusai-mtls certs issue (process)",
            lambda d: run(
                [*cli, "certs", "issue", "--env", "development", "--out", "set"],
                d,
                [f"set/{f}" for f in OUR_FILES],
            ),
        ),
        "ours_in_process": (
            "ours: CertificateSet.issue() in-process",
            lambda d: CertificateSet.issue("development"),
        ),
        "seed": (
            "seed: openssl script (CA+server+client)",
            lambda d: run([bash, str(workdir / "seed.sh")], d, SEED_FILES),
        ),
        "seed_worker": (
            "seed + worker client (CA+3 leaves)",
            lambda d: run([bash, str(workdir / "seed_worker.sh")], d, [*SEED_FILES, "worker-cert.pem"]),
        ),
    }


def measure(repeat: int) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="bench-issuance-") as tmp:
        workdir = Path(tmp)
        cases = make_cases(workdir)
        times: dict[str, list[float]] = {key: [] for key in cases}
        for round_ in range(repeat + 1):  # round 0 warms caches up and is not counted
            for key, (_, action) in cases.items():
                directory = Path(tempfile.mkdtemp(dir=workdir))
                start = time.perf_counter()
                action(directory)
                elapsed = time.perf_counter() - start
                shutil.rmtree(directory)
                if round_:
                    times[key].append(elapsed)
        return {
            key: {
                "label": label,
                "median_s": statistics.median(times[key]),
                "min_s": min(times[key]),
                "runs_s": times[key],
            }
            for key, (label, _) in cases.items()
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    try:
        results = measure(args.repeat)
        info = machine()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        sys.stderr.write(f"bench_issuance: error: {exc}\n")
        return 1
    ours = results["ours_cli"]["median_s"]
    ratios = {
        key: {"ratio": results[key]["median_s"] / ours, "pass": results[key]["median_s"] / ours >= TARGET}
        for key in ("seed", "seed_worker")
    }
    report = {
        "date": dt.date.today().isoformat(),
        "machine": info,
        "repeat": args.repeat,
        "cli": " ".join(cli_command()),
        "results": results,
        "target_ratio": TARGET,
        "ratios_vs_ours_cli": ratios,
        "figures": [
            figure(
                f"issuance, {results[key]['label']} / ours (CLI process)",
                ratios[key]["ratio"],
                f"{results[key]['median_s']:.3f}s vs {ours:.3f}s median, {args.repeat} runs each",
                at_least=TARGET,
            )
            for key in ratios
        ],
    }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    out = [
        f"hokusai-mtls issuance benchmark, {report['date']}: {args.repeat} timed runs per case (+1 warm-up)",
        f"machine: {info['cpu']}, {info['cores']} cores; {info['os']}",
        f"         Python {info['python']} ({info['python_ssl']}); openssl CLI: {info['openssl_cli']}",
        f"         cryptography {info['cryptography']}",
        f"ours via: {report['cli']}",
        "",
        f"{'case':<42} {'median':>9} {'min':>9}",
    ]
    out += [f"{r['label']:<42} {r['median_s']:>8.3f}s {r['min_s']:>8.3f}s" for r in results.values()]
    out.append("")
    for key, r in ratios.items():
        verdict = "PASS" if r["pass"] else "MISS"
        out.append(f"{key + ' / ours_cli':<26} {r['ratio']:>6.1f}x   target >= {TARGET:.0f}x: {verdict}")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
