"""Detection latency: from the moment a spot notice appears in IMDS to the moment the hook starts.

Each trial starts a fresh daemon (a notice is latched once per instance), waits for READY, waits a
random fraction of the poll interval, triggers the notice and reads the hook's start time. The same
run also measures the agent at the polling intervals of its peers (aws-node-termination-handler: 2 s;
AWS's suggestion: 5 s) so the comparison is on this machine, as ratios. Then one daemon idles for
``--idle`` seconds to measure RSS, CPU and the IMDS request rate.

    python -m bench.detection --trials 50 --idle 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import psutil

from agent.sim.imds_server import IMDSSimulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(tmp: str, imds: str, poll: float, slow: float) -> str:
    hook = os.path.join(tmp, "hook.sh")
    with open(hook, "w") as fh:
        # The first thing the hook does is record the time: that is "the hook starting".
        fh.write(f'#!/bin/sh\nexec {sys.executable} -c "import time; open(\'{tmp}/started\', \'w\').write(repr(time.time()))"\n')
    os.chmod(hook, 0o755)
    path = os.path.join(tmp, "agent.toml")
    with open(path, "w") as fh:
        fh.write(f'''
[agent]
state_dir = "{tmp}/state"
socket = "{tmp}/state/agent.sock"
[imds]
endpoint = "{imds}"
poll_interval = {poll}
slow_poll_interval = {slow}
[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:9"
[metrics]
enabled = false
[[hooks]]
on = ["spot-interruption"]
command = ["{hook}"]
''')
    os.chmod(path, 0o644)
    return path


def start_agent(config: str, tmp: str) -> subprocess.Popen:
    log = open(os.path.join(tmp, "agent.log"), "a")
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", config], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, AWS_EC2_METADATA_DISABLED="true"))


def wait_ready(tmp: str, timeout: float = 30) -> None:
    status = os.path.join(tmp, "state", "status.json")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if json.load(open(status)).get("ready"):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise RuntimeError("agent not ready")


def trial(sim: IMDSSimulator, poll: float, slow: float, rng: random.Random) -> float:
    with tempfile.TemporaryDirectory(prefix="spot-agent-bench-") as tmp:
        config = write_config(tmp, sim.url, poll, slow)
        proc = start_agent(config, tmp)
        try:
            wait_ready(tmp)
            time.sleep(rng.uniform(0, poll))  # a random moment relative to the poll schedule
            appeared = time.time()
            sim.control("spot", {"action": "terminate", "in": 120})
            started_file = os.path.join(tmp, "started")
            end = time.monotonic() + poll + 10
            while not os.path.exists(started_file) and time.monotonic() < end:
                time.sleep(0.002)
            time.sleep(0.01)
            started = float(open(started_file).read())
            return started - appeared
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            sim.control("clear", {"what": "spot"})


def idle(sim: IMDSSimulator, seconds: float) -> Dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="spot-agent-idle-") as tmp:
        config = write_config(tmp, sim.url, 1.0, 5.0)
        proc = start_agent(config, tmp)
        try:
            wait_ready(tmp)
            time.sleep(2)  # let startup settle
            p = psutil.Process(proc.pid)
            before_cpu = sum(p.cpu_times()[:2])
            before_req = sim.state.requests
            t0 = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - t0
            cpu = sum(p.cpu_times()[:2]) - before_cpu
            return {
                "seconds": elapsed,
                "rss_mib": p.memory_info().rss / 2**20,
                "cpu_percent_of_one_core": 100 * cpu / elapsed,
                "imds_requests_per_second": (sim.state.requests - before_req) / elapsed,
            }
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q * (len(ordered) - 1)))))
    return ordered[k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--peer-trials", type=int, default=20, help="trials at the peers' intervals")
    ap.add_argument("--peer-intervals", default="2,5",
                    help="the peers' poll intervals, NTH's then AWS's suggestion (the smoke test uses shorter ones)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sim = IMDSSimulator("127.0.0.1", 0).start()
    results: Dict[str, Dict[str, float]] = {}
    try:
        nth, aws = (float(v) for v in args.peer_intervals.split(","))
        configs = [("spot-agent (poll 1 s)", 1.0, 5.0, args.trials),
                   (f"at NTH's interval ({nth:g} s)", nth, nth, args.peer_trials),
                   (f"at AWS's suggestion ({aws:g} s)", aws, aws, args.peer_trials)]
        for name, poll, slow, n in configs:
            lat = [trial(sim, poll, slow, rng) for _ in range(n)]
            results[name] = {"n": n, "p50": statistics.median(lat), "p99": pct(lat, 0.99), "max": max(lat)}
        results["idle"] = idle(sim, args.idle)
    finally:
        sim.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    base = results["spot-agent (poll 1 s)"]
    print("| configuration | trials | p50 (s) | p99 (s) | max (s) | p99 vs spot-agent |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "idle":
            continue
        print(f"| {name} | {r['n']:.0f} | {r['p50']:.3f} | {r['p99']:.3f} | {r['max']:.3f} | {r['p99'] / base['p99']:.2f}x |")
    i = results["idle"]
    print()
    print(f"Idle over {i['seconds']:.0f} s: RSS {i['rss_mib']:.1f} MiB, CPU {i['cpu_percent_of_one_core']:.2f}% of one core, "
          f"{i['imds_requests_per_second']:.2f} IMDS requests/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
