#!/usr/bin/env python3
"""How long `cdk synth` takes, and how it grows with the number of environments.

Platform engineers synthesize every environment on each change, so synth time is what
they wait for. Two measurements, in one run:

1. the real main job: `npx cdk synth --quiet '**'` with the pinned CLI (3 environments,
   cdk-nag included), as `make synth` runs it;
2. the same app built in-process with 1, 3 and 10 stages (cycling through the
   development/staging/production settings under distinct stage ids), each in a fresh
   Python process so jsii start-up is counted, split into start-up and synthesis.

Run: `.venv/bin/python benchmarks/bench_synth.py [--repeat 3] [--json]`
(after `make synth` has set up the virtualenv and node_modules).
It reports; it never fails on a number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks
from stacks.settings import CONTEXT_KEY, load_settings
from stacks.stage import HokusaiStage
context = json.load(open("cdk.json"))["context"]
app = cdk.App(context=context, outdir=sys.argv[2])
t1 = time.perf_counter()
settings = list(load_settings(context[CONTEXT_KEY]).values())
count = int(sys.argv[1])
for index in range(count):
    s = settings[index % len(settings)]
    HokusaiStage(app, settings=s, stage_id=f"Hokusai-{s.environment}" + (f"-{index}" if count > 3 else ""))
cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
assembly = app.synth()
t2 = time.perf_counter()
templates = sum(len(a.nested_assembly.stacks) for a in assembly.nested_assemblies)
print(json.dumps({"startup": t1 - t0, "synth": t2 - t1, "templates": templates}))
"""


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "CDK_DISABLE_CLI_TELEMETRY": "true",
    }


def time_cli() -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run(
            [str(BIN / "npx"), "cdk", "synth", "--quiet", "--output", out, "**"],
            cwd=ROOT,
            env=environment(),
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start


def time_in_process(stages: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = subprocess.run(
            [str(BIN / "python"), "-c", CHILD, str(stages), out],
            cwd=ROOT,
            env={**environment(), "PYTHONPATH": str(ROOT)},
            check=True,
            capture_output=True,
            text=True,
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        return {**measured, "total": time.perf_counter() - start}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    node = subprocess.run([str(BIN / "node"), "--version"], capture_output=True, text=True).stdout.strip()
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; Node {node}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cli = [time_cli() for _ in range(args.repeat)]
    runs = {n: [time_in_process(n) for _ in range(args.repeat)] for n in (1, 3, 10)}
    median = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("startup", "synth", "total")}
        for n, rs in runs.items()
    }
    templates = {n: rs[0]["templates"] for n, rs in runs.items()}
    if args.json:
        print(json.dumps({"machine": machine(), "cli_3_envs": cli, "in_process": runs}, indent=2))
        return 0
    print(f"machine: {machine()}")
    print(
        f"make synth (npx cdk synth '**', 3 environments, cdk-nag): median {statistics.median(cli):.1f}s "
        f"(min {min(cli):.1f}s, {args.repeat} runs)"
    )
    print(f"{'stages':>6} {'stacks':>6} {'start-up':>9} {'synth':>7} {'total':>7} {'synth/stage':>12}")
    for n, m in median.items():
        print(
            f"{n:>6} {templates[n]:>6} {m['startup']:>8.1f}s {m['synth']:>6.1f}s {m['total']:>6.1f}s "
            f"{m['synth'] / n:>11.2f}s"
        )
    growth = median[10]["synth"] / median[1]["synth"]
    print(f"synthesis 10 stages / 1 stage: {growth:.1f}x (linear would be 10x; start-up is paid once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
