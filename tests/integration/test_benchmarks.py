"""`make bench` works: the whole suite, at its smoke sizes, writes a report with every section.

`run_all.py --smoke` runs every bench with the least work it accepts (one sample per case), all
benches side by side: it checks that each still starts its servers, runs every case and reports,
not what it measures (`make bench` is the measurement). The figures themselves are not checked:
the suite reports, it does not gate. What is checked is that every bench ran, that each section
has measured numbers with a PASS/MISS verdict, and that the run exits 0 whatever the verdicts.
It writes into a temporary path, never over benchmarks/RESULTS.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SCRIPTS = (
    "bench_prd.py",
    "bench_tls.py",
    "bench_issuance.py",
    "bench_synth.py",
    "bench_proxy.py",
    "bench_sidecar.py",
    "bench_keys.py",
)
FIGURE_ROW = re.compile(
    r"^\| [^|]+ \| -?[0-9][0-9.]*(x| s)? \| [^|]*[0-9][^|]* \| [^|]+ \| \*\*(PASS|MISS)\*\* \|$"
)


def sections(report: str) -> dict[str, str]:
    """Level-2 sections by heading."""
    parts = re.split(r"^## ", report, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0]: part for part in parts}


def test_smoke_suite_reports_every_benchmark(tmp_path):
    output = tmp_path / "RESULTS.md"
    before = RESULTS.stat().st_mtime_ns if RESULTS.exists() else None
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert (RESULTS.stat().st_mtime_ns if RESULTS.exists() else None) == before, "RESULTS.md was overwritten"

    report = output.read_text()
    assert "SMOKE sizes" in report.split("\n## ", 1)[0]
    found = sections(report)
    machine = found["Machine"]
    for row in ("| CPU |", "| cores |", "| memory |", "| kernel |", "| Python |", "| cryptography |"):
        assert row in machine
    for script in SCRIPTS:
        heading = next((h for h in found if f"`benchmarks/{script}`" in h), None)
        assert heading is not None, f"no section for {script}: {list(found)}"
        rows = [line for line in found[heading].splitlines() if FIGURE_ROW.match(line)]
        assert rows, f"{script}: no figure with a number and a PASS/MISS verdict:\n{found[heading]}"
    assert "**ERROR**" not in report
    summary = found["Summary"]
    assert {"prd", "tls", "issuance", "synth", "proxy", "sidecar", "keys"} <= {
        line.split(" | ")[0].lstrip("| ") for line in summary.splitlines()
    }
    assert "## How to reproduce" in report


def test_every_bench_has_smoke_sizes():
    """A bench added without them would run at full size inside `make test`."""
    from benchmarks.run_all import BENCHES

    assert {name for name, bench in BENCHES.items() if not bench.smoke} == set()
    assert {bench.script for bench in BENCHES.values()} == set(SCRIPTS)
