"""Fleet drain: N agents drain at once against one strict local AWS with small token buckets.

A mass spot reclaim hits N instances of one account in the same minute, and they share its EC2 and
Auto Scaling token buckets. This starts one strict endpoint (agent.sim.localaws, in this process),
an Auto Scaling group of N instances each with an attached volume and in Terminating:Wait, and N agent
processes (agent.sim.fleet worker: the real Drainer, one access key each); all drain a spot notice
at the same moment with the same deadline. Reported: drains completed, calls made, throttles met (and
every other refusal by code), calls after a deadline (must be 0), the worst margin left, and the worst
margin between an agent's last call and its deadline.

    python -m bench.fleet_drain --agents 20 --window 60 --intensive 5/2 --describe 10/5 --autoscaling 5/2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--window", type=float, default=60.0, help="seconds from the notice to every agent's deadline")
    p.add_argument("--intensive", default="5/2", help="EC2 resource-intensive bucket per action, SIZE/RATE")
    p.add_argument("--describe", default="10/5", help="EC2 Describe* bucket per action, SIZE/RATE")
    p.add_argument("--mutating", default="20/5", help="other EC2 actions' bucket, SIZE/RATE")
    p.add_argument("--autoscaling", default="5/2", help="Auto Scaling bucket per action, SIZE/RATE")
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from agent.aws import make_clients
    from agent.config import AWSSection
    from agent.sim.fleet import run_fleet, to_json
    from agent.sim.localaws import ORACLE_KEY, LocalAWS
    from agent.sim.strict import StrictSettings, parse_bucket

    settings = StrictSettings.fast(ec2_intensive_bucket=parse_bucket(args.intensive),
                                   ec2_describe_bucket=parse_bucket(args.describe),
                                   ec2_mutating_bucket=parse_bucket(args.mutating),
                                   autoscaling_bucket=parse_bucket(args.autoscaling))
    server = LocalAWS(strict=True, settings=settings).start()
    workdir = tempfile.mkdtemp(prefix="spot-fleet-")
    try:
        oracle = make_clients(AWSSection(endpoint_url=server.url), "us-east-1", credentials=(ORACLE_KEY, "x"))
        result = run_fleet(server, oracle, args.agents, args.window, workdir, args.heartbeat_interval)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    data = to_json(result)
    data["settings"] = {"intensive": args.intensive, "describe": args.describe, "mutating": args.mutating,
                        "autoscaling": args.autoscaling, "heartbeat_interval": args.heartbeat_interval}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        s = data["summary"]
        print(f"agents {s['agents']}, window {s['window_seconds']:g} s, wall {s['wall_seconds']} s")
        print(f"drains ok {s['drains_ok']}, snapshots {s['snapshots']}, lifecycle completed {s['lifecycle_completed']}")
        print(f"calls {s['calls']}, throttled {s['throttled']}, refused by code {s['refused_by_code']}")
        print(f"calls after a deadline {s['late_calls']}, worst margin {s['worst_margin_seconds']} s, "
              f"worst last-call margin {s['worst_last_call_margin_seconds']} s")
    return 0 if result.all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
