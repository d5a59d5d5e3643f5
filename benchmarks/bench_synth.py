#!/usr/bin/env python3
"""How long `cdk synth` takes, and how it grows with the number of environments.

Platform engineers synthesize every environment on each change, so synth time is what
they wait for. Two measurements, in one run:

1. the real main job: `npx cdk synth --quiet '**'` with the pinned CLI (3 environments,
   cdk-nag included), as `make synth` runs it;
2. the same app built in-process with 1, 3 and 10 stages (cycling through the
   development/staging/production settings under distinct stage ids), each in a fresh
   Python process so jsii start-up is counted, split into start-up and synthesis.

Run: `.venv/bin/python benchmarks/bench_synth.py [--repeat 3] [--stages 1,3,10] [--json]`
(after `make synth` has set up the virtualenv and node_modules).

There is no target in the issue for synthesis, only "how it grows"; the figure checked is that
it grows no faster than linearly: synthesis of the largest stage count over one stage must not
exceed that count (10 stages <= 10x one stage). It reports; it never fails on a number (non-zero
only when a synth fails).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
BIN = ROOT / ".venv" / "bin"

from benchmarks.common import figure  # noqa: E402  (after the path set-up)
from benchmarks.common import machine as machine_facts  # noqa: E402

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks
from stacks.settings import CONTEXT_KEY, SERVICES_KEY, load_services, load_settings
from stacks.stage import HokusaiStage
context = json.load(open("cdk.json"))["context"]
app = cdk.App(context=context, outdir=sys.argv[2])
t1 = time.perf_counter()
settings = list(load_settings(context[CONTEXT_KEY], load_services(context.get(SERVICES_KEY))).values())
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


def node_version() -> str:
    return subprocess.run([str(BIN / "node"), "--version"], capture_output=True, text=True).stdout.strip()


def machine() -> str:
    facts = machine_facts()
    return f"{facts['cpu']}, {facts['cores']} cores; Python {facts['python']}; Node {node_version()}"


def figures(median: dict[int, dict[str, float]], cli: list[float]) -> list[dict]:
    """Growth against linear (the check), and the synth times behind it (information)."""
    smallest, largest = min(median), max(median)
    growth = median[largest]["synth"] / median[smallest]["synth"]
    linear = largest / smallest
    per_stage = ", ".join(f"{n}: {m['synth']:.1f}s" for n, m in median.items())
    return [
        figure(
            f"synthesis {largest} stages / {smallest} stage (in-process)",
            growth,
            f"synth {per_stage}; start-up {median[largest]['startup']:.1f}s once; median of {len(cli)} runs",
            at_most=linear,
            target=f"<= {linear:g}x (linear growth)",
        ),
        figure(
            "make synth: npx cdk synth '**' (3 environments, cdk-nag), median seconds",
            statistics.median(cli),
            f"min {min(cli):.1f}s, {len(cli)} runs",
            unit="s",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument("--stages", default="1,3,10", help="stage counts to synthesize (default 1,3,10)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)
    try:
        stages = sorted({int(n) for n in args.stages.split(",")})
    except ValueError:
        parser.error(f"--stages: a comma-separated list of numbers, not {args.stages!r}")
    if args.repeat < 1 or len(stages) < 2 or stages[0] < 1:
        parser.error("--repeat must be at least 1; --stages needs two or more positive counts")

    try:
        cli = [time_cli() for _ in range(args.repeat)]
        runs = {n: [time_in_process(n) for _ in range(args.repeat)] for n in stages}
    except subprocess.CalledProcessError as exc:
        tail = exc.stderr or exc.stdout or b""
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        sys.stderr.write(
            f"bench_synth: error: {exc.cmd[:3]} exited {exc.returncode}: {tail.strip()[-2000:]}\n"
        )
        return 1
    median = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("startup", "synth", "total")}
        for n, rs in runs.items()
    }
    templates = {n: rs[0]["templates"] for n, rs in runs.items()}
    if args.json:
        report = {
            "machine": machine(),
            "repeat": args.repeat,
            "cli_3_envs": cli,
            "in_process": runs,
            "median": median,
            "figures": figures(median, cli),
        }
        print(json.dumps(report, indent=2))
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
    largest = stages[-1]
    growth = median[largest]["synth"] / median[stages[0]]["synth"]
    print(
        f"synthesis {largest} stages / {stages[0]} stage: {growth:.1f}x "
        f"(linear would be {largest / stages[0]:g}x; start-up is paid once)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
