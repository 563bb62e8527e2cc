"""Every benchmark, at the size bench/RESULTS.md records it (``make bench``), or at a smoke size.

    python -m bench.all                 # each benchmark at its documented size, one after the other
    python -m bench.all --quick         # each at the tiny size CI's smoke tests run (tests/bench/)
    python -m bench.all --only ready,detection
    python -m bench.all --list          # the commands, without running them

The final numbers need a quiet machine (see docs/benchmarks.md); ``--quick`` only shows that every
benchmark still runs. The registry below is the one place that names each benchmark's commands:
tests/bench/ runs the ``quick`` ones and checks that every script in bench/ is listed here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Bench:
    name: str
    module: str  # run as python -m MODULE
    full: Tuple[Tuple[str, ...], ...]  # the documented runs (bench/RESULTS.md)
    quick: Tuple[Tuple[str, ...], ...]  # the smoke runs
    root: bool = False  # loop devices, mount, fsfreeze


BENCHES: List[Bench] = [
    Bench("volumes", "bench.volumes_bench",
          full=(("--runs", "7"), ("--runs", "5", "--size-gib", "8")),
          quick=(("--runs", "1", "--size-gib", "1"),), root=True),
    Bench("drain", "bench.drain_bench",
          full=(("--trials", "5", "--size-mib", "1024"),),
          quick=(("--trials", "1", "--size-mib", "8", "--json"),), root=True),
    Bench("detection", "bench.detection",
          full=(("--trials", "50", "--peer-trials", "20", "--idle", "60"),),
          quick=(("--trials", "1", "--peer-trials", "1", "--idle", "0.5", "--peer-intervals", "0.3,0.5"),)),
    Bench("fleet", "bench.fleet_drain",
          full=(("--agents", "20", "--window", "60", "--intensive", "5/2", "--describe", "10/5", "--autoscaling", "5/2"),
                ("--agents", "20", "--window", "20", "--intensive", "2/0.5", "--describe", "10/5", "--autoscaling", "5/2")),
          quick=(("--agents", "2", "--window", "20", "--json"),)),
    Bench("transfer", "bench.transfer_bench",
          full=(("peers", "--a-files", "10000", "--b-mib", "256", "--d-gib", "1"),
                ("peers", "--server", "s3rver", "--only", "A,C", "--timeout", "180"),
                ("engines", "--a-files", "3000", "--b-mib", "64", "--timeout", "300")),
          quick=(("peers", "--a-files", "30", "--b-mib", "2", "--d-gib", "0.03125", "--timeout", "60"),
                 ("engines", "--a-files", "30", "--b-mib", "2"))),
    Bench("planner", "bench.transfer_bench",
          full=(("planner", "--keys", "1000000"),),
          quick=(("planner", "--keys", "2000"),)),
]

# Scripts in bench/ that are not run directly: each is a child of a benchmark above.
HELPERS = {"bench.transfer.planner_bench": "the planner benchmark's child process (transfer_bench planner)",
           "bench.all": "this runner"}


def by_name(name: str) -> Bench:
    for b in BENCHES:
        if b.name == name:
            return b
    raise KeyError(name)


def command(bench: Bench, args: Tuple[str, ...]) -> List[str]:
    return [sys.executable, "-m", bench.module, *args]


def main(argv: List[str] = None) -> int:  # type: ignore[assignment]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the smoke sizes (seconds each), not the documented ones")
    p.add_argument("--only", default="", help="comma-separated names: " + ",".join(b.name for b in BENCHES))
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    wanted = [n for n in args.only.split(",") if n]
    unknown = [n for n in wanted if n not in {b.name for b in BENCHES}]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for bench in BENCHES:
        if wanted and bench.name not in wanted:
            continue
        for run in (bench.quick if args.quick else bench.full):
            cmd = command(bench, run)
            shown = " ".join(["python", "-m", bench.module, *run])
            print(f"## {bench.name}: {shown}" + ("  (needs root)" if bench.root else ""), flush=True)
            if args.list:
                continue
            if bench.root and os.geteuid() != 0:
                print(f"{bench.name}: needs root; not run", file=sys.stderr)
                failed.append(bench.name)
                continue
            if subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT)).returncode != 0:
                failed.append(bench.name)
    if failed:
        print(f"bench.all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
