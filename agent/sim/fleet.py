"""A fleet drain: N agent processes drain at once against one strict local AWS (its "fleet mode").

A mass spot reclaim hits many instances of one account in the same minute, and they all share the
account's EC2 and Auto Scaling token buckets. :func:`run_fleet` rehearses that: one Auto Scaling group
of N instances with a terminating hook, one EBS volume attached to each, all of them put into
``Terminating:Wait``; then N processes (``python -m agent.sim.fleet worker``), each the real
:class:`agent.drain.executor.Drainer` of one instance with its own access key, are told to drain at
the same moment with the same deadline. Each snapshots its volume and completes its lifecycle action
through the throttling. The strict endpoint's call log (by access key) says how many calls each made,
how many were throttled, and whether any went out after its deadline.

There are no block devices in a fleet: each agent's "volume" is a directory holding its state
directory, so it is snapshotted without fsfreeze (the drain says so), which is all this measures.
Used by ``bench/fleet_drain.py`` and ``tests/integration/test_fleet_drain.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GROUP = "fleet-asg"
HOOK = "fleet-drain-hook"
TEMPLATE = "fleet-template"
AZ = "us-east-1a"


@dataclass
class Member:
    instance_id: str
    volume_id: str
    key: str  # its access key id: the strict endpoint's call log tells the agents apart by it
    root: str


@dataclass
class AgentResult:
    instance_id: str
    ok: bool
    snapshot: str
    lifecycle_completed: bool
    margin: float
    calls: int
    throttled: int
    refused: Dict[str, int]  # "Action: Code" -> calls refused
    by_action: Dict[str, int]  # Action -> calls made
    late_calls: int  # calls the endpoint saw after this agent's deadline
    last_call_margin: float  # seconds between its last call and its deadline
    error: str = ""


@dataclass
class FleetResult:
    agents: int
    window: float
    seconds: float
    results: List[AgentResult] = field(default_factory=list)

    @property
    def all_ok(self) -> bool:
        return len(self.results) == self.agents and all(r.ok and r.snapshot and r.lifecycle_completed
                                                        and r.late_calls == 0 for r in self.results)

    def summary(self) -> Dict[str, Any]:
        rs = self.results
        return {
            "agents": self.agents, "window_seconds": self.window, "wall_seconds": round(self.seconds, 2),
            "drains_ok": sum(1 for r in rs if r.ok), "snapshots": sum(1 for r in rs if r.snapshot),
            "lifecycle_completed": sum(1 for r in rs if r.lifecycle_completed),
            "calls": sum(r.calls for r in rs), "calls_by_action": _merge([r.by_action for r in rs]),
            "throttled": sum(r.throttled for r in rs),
            "refused_by_code": _merge([r.refused for r in rs]),
            "late_calls": sum(r.late_calls for r in rs),
            "worst_margin_seconds": round(min((r.margin for r in rs), default=0.0), 2),
            "worst_last_call_margin_seconds": round(min((r.last_call_margin for r in rs), default=0.0), 2),
        }


def _merge(maps: List[Dict[str, int]]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def prepare(oracle: Any, n: int, workdir: str, heartbeat_timeout: int = 300) -> List[Member]:
    """The group of ``n`` instances, a volume attached to each, all in Terminating:Wait. ``oracle``:
    clients with :data:`agent.sim.localaws.ORACLE_KEY` (the setup is not what is measured)."""
    ec2, asg = oracle.ec2, oracle.autoscaling
    ec2.create_launch_template(LaunchTemplateName=TEMPLATE,
                               LaunchTemplateData={"ImageId": "ami-12345678", "InstanceType": "g5.xlarge"})
    asg.create_auto_scaling_group(AutoScalingGroupName=GROUP, LaunchTemplate={"LaunchTemplateName": TEMPLATE},
                                  MinSize=n, MaxSize=n, DesiredCapacity=n, AvailabilityZones=[AZ])
    asg.put_lifecycle_hook(AutoScalingGroupName=GROUP, LifecycleHookName=HOOK,
                           LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                           HeartbeatTimeout=heartbeat_timeout, DefaultResult="ABANDON")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
    members = []
    for i, inst in enumerate(sorted(group["Instances"], key=lambda x: x["InstanceId"])):
        iid = inst["InstanceId"]
        vid = ec2.create_volume(AvailabilityZone=AZ, Size=1, VolumeType="gp3")["VolumeId"]
        ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
        root = os.path.join(workdir, f"agent-{i:02d}")
        os.makedirs(os.path.join(root, "state"), exist_ok=True)
        members.append(Member(iid, vid, f"fleet-agent-{i:02d}", root))
    return members


def config_text(url: str, root: str, interval: float = 5.0) -> str:
    return "\n".join([
        "[agent]", f"state_dir = {json.dumps(os.path.join(root, 'state'))}",
        f"socket = {json.dumps(os.path.join(root, 'agent.sock'))}",
        "[imds]", 'endpoint = "http://127.0.0.1:9"',
        "[aws]", f"endpoint_url = {json.dumps(url)}", 'region = "us-east-1"',
        "[[volumes]]", 'name = "ckpt"', f"mount = {json.dumps(root)}", 'fs = "ext4"', 'volume_id = "vol-00000000"',
        "[drain]", "margin = 5", "snapshot_reserve = 5", "lifecycle_reserve = 5", "upload_reserve = 0",
        "[drain.workload]", 'wait = "none"',
        "[drain.lifecycle]", f"group = {json.dumps(GROUP)}", f"hook = {json.dumps(HOOK)}",
        f"heartbeat_interval = {interval}", "",
    ])


def worker_main(argv: Optional[List[str]] = None) -> int:
    """One agent of the fleet: build the Drainer (what a booted daemon has), wait for "go" on stdin,
    drain a spot notice whose deadline is given, print the report as JSON."""
    p = argparse.ArgumentParser(prog="python -m agent.sim.fleet worker")
    p.add_argument("--url", required=True)
    p.add_argument("--instance", required=True)
    p.add_argument("--volume", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    args = p.parse_args(argv)
    from agent.aws import Clients, make_clients
    from agent.clock import SYSTEM_CLOCK
    from agent.config import parse
    from agent.drain.executor import Drainer
    from agent.events import Event
    from agent.identity import InstanceIdentity
    from agent.runner import Runner
    from agent.state import StateStore
    from agent.volumes.model import MountedVolume

    cfg = parse(config_text(args.url, args.root, args.heartbeat_interval))
    full = make_clients(cfg.aws, "us-east-1", credentials=(args.key, "fleet"), services=("drain_ec2", "drain_autoscaling"))
    # the drain only uses its one-attempt clients; a fleet of 20 need not build the other three each
    clients = Clients(ec2=full.drain_ec2, s3=None, autoscaling=full.drain_autoscaling, region="us-east-1",
                      drain_ec2=full.drain_ec2, drain_autoscaling=full.drain_autoscaling)
    ident = InstanceIdentity(args.instance, "g5.xlarge", AZ, "us-east-1")
    state = StateStore(os.path.join(args.root, "state", "state.json"))
    mounted = {"ckpt": MountedVolume("ckpt", args.volume, "/dev/null", args.root, "ext4")}
    drainer = Drainer(cfg, clients, ident, state, Runner(), SYSTEM_CLOCK, lambda: mounted, [])
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    if not line or line[0] != "go":
        return 2
    deadline = float(line[1])
    now = time.time()
    report = drainer.run(Event("spot-interruption", "terminate", deadline, f"spot:{args.instance}", now))
    print(json.dumps(report.to_dict()), flush=True)
    return 0 if report.ok else 1


def run_fleet(server: Any, oracle: Any, n: int, window: float, workdir: str, heartbeat_interval: float = 5.0,
              start_timeout: float = 120.0) -> FleetResult:
    """Prepare ``n`` instances on ``server`` (a strict :class:`agent.sim.localaws.LocalAWS`), start ``n``
    agent processes, tell them all to drain now with ``window`` seconds to their deadline."""
    members = prepare(oracle, n, workdir)
    for m in members:
        server.begin_termination(m.instance_id)
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=REPO, NO_PROXY="127.0.0.1,localhost")
    procs = []
    for m in members:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "agent.sim.fleet", "worker", "--url", server.url, "--instance", m.instance_id,
             "--volume", m.volume_id, "--root", m.root, "--key", m.key,
             "--heartbeat-interval", str(heartbeat_interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(os.path.join(m.root, "agent.log"), "wb"),
            text=True, cwd=REPO, env=env))
    try:
        end = time.monotonic() + start_timeout
        for proc, m in zip(procs, members):
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != "ready" or time.monotonic() > end:
                raise RuntimeError(f"fleet agent {m.key} did not start: {line!r}; see {m.root}/agent.log")
        before = len(server.strict.calls_by())
        t0 = time.time()
        deadline = t0 + window
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"go {deadline}\n")
            proc.stdin.flush()
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=window + 60)
            reports.append(out.strip().splitlines()[-1] if out.strip() else "")
        seconds = time.time() - t0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    calls = server.strict.calls_by()[before:]
    result = FleetResult(n, window, seconds)
    for m, raw in zip(members, reports):
        mine = [c for c in calls if c["caller"] == m.key]
        refused: Dict[str, int] = {}
        by_action: Dict[str, int] = {}
        for c in mine:
            by_action[c["action"]] = by_action.get(c["action"], 0) + 1
            if c["code"]:
                what = f"{c['action']}: {c['code']}"
                refused[what] = refused.get(what, 0) + 1
        try:
            rep = json.loads(raw)
            err = ""
        except ValueError:
            rep, err = {}, f"no report: {raw[:200]!r}"
        result.results.append(AgentResult(
            instance_id=m.instance_id, ok=bool(rep.get("ok")), snapshot=(rep.get("snapshots") or {}).get("ckpt", ""),
            lifecycle_completed=bool(rep.get("lifecycle_completed")), margin=float(rep.get("margin_seconds") or 0.0),
            calls=len(mine), throttled=sum(v for k, v in refused.items() if k.endswith((": RequestLimitExceeded", ": Throttling"))),
            refused=refused, by_action=by_action, late_calls=sum(1 for c in mine if c["at"] >= deadline),
            last_call_margin=deadline - max((c["at"] for c in mine), default=t0), error=err))
    return result


def to_json(result: FleetResult) -> Dict[str, Any]:
    return {"summary": result.summary(), "agents": [asdict(r) for r in result.results]}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        raise SystemExit(worker_main(sys.argv[2:]))
    raise SystemExit("usage: python -m agent.sim.fleet worker ... (run by agent.sim.fleet.run_fleet)")
