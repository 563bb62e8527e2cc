"""Benchmark smoke tests: each benchmark in bench/ runs its real code path at a tiny size.

They check that a benchmark still completes and prints its table, never how fast anything is
(timings belong in bench/RESULTS.md, measured on a quiet machine). CI has no peers
(aws-cli, s5cmd, rclone): the peers' rows run only where the peer is installed, spot-agent's rows
always, so nothing is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A hang guard, not a timing assertion: a benchmark that runs this long at smoke size is broken.
HANG_GUARD = 300.0


def peers() -> List[str]:
    """The peer tools installed on this machine, by the row names transfer_bench uses."""
    from bench import transfer_bench as tb

    return [t for t in tb.installed(["aws s3 sync", "s5cmd sync", "rclone sync"])]


def quick(name: str, run: int = 0) -> str:
    """Run one of bench/all.py's quick (smoke) commands; its stdout."""
    from bench.all import by_name

    bench = by_name(name)
    return run_bench(bench.module, *bench.quick[run])


def run_bench(*argv: str) -> str:
    """Run ``python -m bench.X ARGS`` from the repo root; its stdout, or a failure with its output."""
    env = dict(os.environ, PYTHONPATH=ROOT, AWS_EC2_METADATA_DISABLED="true", MOTO_EC2_LOAD_DEFAULT_AMIS="false")
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                    f"--- stderr\n{proc.stderr[-3000:]}")
    return proc.stdout


def table_rows(out: str, header: str) -> List[List[str]]:
    """The rows of the markdown table whose header line starts with ``header`` (cells stripped)."""
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert starts, f"no table starting {header!r} in:\n{out[-2000:]}"
    rows = []
    for line in lines[starts[0] + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows
