"""Drain timeline: a spot notice with a 1 GiB checkpoint, from notice to lifecycle completed.

Each trial starts the toy workload on a real ext4 filesystem (loop device), sends the drain a spot
notice with two minutes left, and reads the drainer's timeline: notice detected, workload signalled,
checkpoint written (the workload writes 1 GiB and fsyncs it on SIGTERM), snapshot requested, thawed,
upload committed (if the transfer engine's CheckpointStore is present), lifecycle completed.

Reported per trial and as medians:
- agent overhead: notice -> snapshot requested, minus the workload's own time (signal -> checkpoint
  written); target <= 0.5 s;
- frozen window: first fsfreeze -f to last thaw (the CreateSnapshot call inside); target <= 100 ms.

moto (EC2, Auto Scaling with the lifecycle calls, S3) runs in this process on 127.0.0.1. Its
CreateSnapshot records metadata only, like the real API returns before the data is copied, so the
frozen window is the agent's: freeze, one HTTP round trip, thaw. Needs root (losetup, mount, fsfreeze).

    python -m bench.drain_bench --trials 5 --size-mib 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024


def sh(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout.strip()


def setup_aws():
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    from agent.aws import make_clients
    from agent.config import AWSSection
    from agent.sim.localaws import LocalAWS

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = LocalAWS().start()
    clients = make_clients(AWSSection(endpoint_url=server.url), "us-east-1")
    return server, clients


def asg_instance(clients) -> str:
    clients.ec2.create_launch_template(LaunchTemplateName="bench-template",
                                       LaunchTemplateData={"ImageId": "ami-12345678", "InstanceType": "m5.large"})
    clients.autoscaling.create_auto_scaling_group(AutoScalingGroupName="bench", LaunchTemplate={"LaunchTemplateName": "bench-template"},
                                                  MinSize=1, MaxSize=1, DesiredCapacity=1, AvailabilityZones=["us-east-1a"])
    clients.autoscaling.put_lifecycle_hook(AutoScalingGroupName="bench", LifecycleHookName="drain",
                                           LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING")
    group = clients.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["bench"])["AutoScalingGroups"][0]
    return group["Instances"][0]["InstanceId"]


def config_text(tmp: str, mnt: str, url: str, vid: str, bucket: str, with_upload: bool) -> str:
    ck = (f'[[checkpoints]]\ndir = "{mnt}/run"\ns3 = "s3://{bucket}/ckpt/"\nsettle = 0\n') if with_upload else ""
    return f'''
[agent]
state_dir = "{tmp}/state"
[aws]
endpoint_url = "{url}"
region = "us-east-1"
[[volumes]]
name = "ckpt"
mount = "{mnt}"
fs = "ext4"
volume_id = "{vid}"
{ck}
[drain.workload]
pidfile = "{tmp}/toy.pid"
marker = "{mnt}/run/DONE"
checkpoint_timeout = 90
'''


def stores_for(cfg, clients) -> List[Any]:
    if not cfg.checkpoints:
        return []
    from agent.transfer.checkpoints import CheckpointStore

    return [CheckpointStore(clients.s3, ck, cfg.transfer, cfg.agent.state_dir) for ck in cfg.checkpoints]


def trial(i: int, cfg, clients, identity, mnt: str, tmp: str, size: int) -> Dict[str, Any]:
    from agent.clock import Clock
    from agent.drain.executor import Drainer
    from agent.events import Event
    from agent.runner import Runner
    from agent.state import StateStore
    from agent.volumes.model import MountedVolume

    for name in ("toy.pid",):
        if os.path.exists(os.path.join(tmp, name)):
            os.unlink(os.path.join(tmp, name))
    marker = os.path.join(mnt, "run", "DONE")
    if os.path.exists(marker):
        os.unlink(marker)
    dev = sh("findmnt", "-n", "-o", "SOURCE", "--mountpoint", mnt)
    mv = MountedVolume("ckpt", cfg.volumes[0].volume_id, dev, mnt, "ext4")
    state = StateStore(os.path.join(tmp, "state", "state.json"))
    drainer = Drainer(cfg, clients, identity, state, Runner(), Clock(), lambda: {"ckpt": mv}, stores_for(cfg, clients))
    toy = subprocess.Popen([sys.executable, "-m", "agent.sim.toy_workload", "--dir", os.path.join(mnt, "run"),
                            "--every", "1000000", "--step-seconds", "0.01", "--final-size", str(size),
                            "--marker", marker, "--pidfile", os.path.join(tmp, "toy.pid")],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(os.path.join(tmp, "toy.pid")):
        time.sleep(0.01)
    time.sleep(0.3)
    now = time.time()
    event = Event("spot-interruption", "terminate", now + 120, f"bench:{i}:{now}", now)
    report = drainer.run(event)
    toy.wait(30)
    rec = state.get("drain")["run"]
    marks: Dict[str, float] = {"notice": event.detected_at}
    for label, at in drainer.timeline:
        marks.setdefault(label.split(":")[0], at)
    rel = {k: round(v - event.detected_at, 4) for k, v in marks.items()}
    workload = marks.get("checkpoint-written", marks["notify"]) - marks["workload-signalled"]
    overhead = marks["snapshot-requested"] - event.detected_at - workload
    # old checkpoints: keep the volume from filling up across trials
    for name in os.listdir(os.path.join(mnt, "run")):
        if name.endswith(".bin"):
            os.unlink(os.path.join(mnt, "run", name))
    return {"ok": report.ok, "timeline": rel, "workload_seconds": round(workload, 4),
            "overhead_seconds": round(overhead, 4), "frozen_seconds": rec.get("frozen_seconds", {}).get("ckpt"),
            "freeze_breakdown": rec.get("freeze_breakdown", {}).get("ckpt"),
            "steps": {s.name: (s.state, s.seconds) for s in report.steps}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--size-mib", type=int, default=1024, help="size of the workload's final checkpoint")
    p.add_argument("--no-upload", action="store_true", help="skip the S3 checkpoint upload")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("drain_bench: needs root (losetup, mount, fsfreeze)", file=sys.stderr)
        return 2
    from agent.config import parse
    from agent.identity import InstanceIdentity

    with_upload = not args.no_upload
    if with_upload:
        try:
            import agent.transfer.checkpoints  # noqa: F401
        except ImportError:
            print("drain_bench: agent.transfer.checkpoints not available; running without the upload", file=sys.stderr)
            with_upload = False
    tmp = tempfile.mkdtemp(prefix="drain-bench-")
    mnt = os.path.join(tmp, "mnt")
    os.makedirs(mnt)
    img = os.path.join(tmp, "vol.img")
    with open(img, "wb") as fh:
        fh.truncate(max(4 * 1024, 3 * args.size_mib) * MiB)
    loop = sh("losetup", "--find", "--show", img)
    server = None
    results: List[Dict[str, Any]] = []
    try:
        # no lazy inode-table init: its background writes would land in the frozen window
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
        sh("mount", loop, mnt)
        os.makedirs(os.path.join(mnt, "run"))
        server, clients = setup_aws()
        iid = asg_instance(clients)
        vid = clients.ec2.create_volume(AvailabilityZone="us-east-1a", Size=4)["VolumeId"]
        clients.s3.create_bucket(Bucket="bench-ckpt")
        cfg = parse(config_text(tmp, mnt, server.url, vid, "bench-ckpt", with_upload))
        identity = InstanceIdentity(iid, "m5.large", "us-east-1a", "us-east-1")
        for i in range(args.trials):
            results.append(trial(i, cfg, clients, identity, mnt, tmp, args.size_mib * MiB))
            r = results[-1]
            print(f"trial {i}: overhead {r['overhead_seconds'] * 1000:.0f} ms, frozen {r['frozen_seconds'] * 1000:.1f} ms, "
                  f"{r['freeze_breakdown']}, workload {r['workload_seconds']:.2f} s, timeline {r['timeline']}", file=sys.stderr)
    finally:
        subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)
        subprocess.run(["umount", mnt], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        "trials": len(results),
        "size_mib": args.size_mib,
        "upload": with_upload,
        "all_ok": all(r["ok"] for r in results),
        "overhead_ms_median": round(statistics.median(r["overhead_seconds"] for r in results) * 1000, 1),
        "overhead_ms_max": round(max(r["overhead_seconds"] for r in results) * 1000, 1),
        "frozen_ms_median": round(statistics.median(r["frozen_seconds"] for r in results) * 1000, 1),
        "frozen_ms_max": round(max(r["frozen_seconds"] for r in results) * 1000, 1),
        "timeline_median": {k: round(statistics.median(r["timeline"][k] for r in results if k in r["timeline"]), 3)
                            for k in results[0]["timeline"]},
    }
    if args.json:
        print(json.dumps({"summary": summary, "trials": results}, indent=2))
    else:
        print(json.dumps(summary, indent=2))
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
