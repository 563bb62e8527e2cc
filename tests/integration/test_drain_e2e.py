"""End to end through the real daemon: `spot-agent run` mounts the checkpoint volume at boot, a spot
notice appears in the IMDS simulator, and the daemon's drain signals the toy workload, waits for its
final checkpoint, snapshots the frozen filesystem (tagged), uploads the S3 checkpoint with its
manifest (the transfer engine's CheckpointStore) and completes the lifecycle action once.

Real processes (daemon, workload), real loop-device filesystem (agent.sim.blockdevs behind moto's
attach/snapshot), moto over HTTP with the Auto Scaling lifecycle calls, the IMDS simulator.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from agent.sim.imds_server import Identity, IMDSSimulator
from agent.sim.localaws import lifecycle_calls
from agent.sim.toy_workload import newest_step
from tests.daemon_harness import AgentProcess
from tests.integration.drain_helpers import GROUP, HOOK, asg_identity, writable

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def e2e(aws, blockdevs, scratch_dir):
    ident = asg_identity(aws)
    sim = IMDSSimulator(port=0, identity=Identity(instance_id=ident.instance_id, instance_type=ident.instance_type,
                                                  availability_zone=ident.availability_zone, region=ident.region))
    sim.start()
    vid = aws.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1, VolumeType="gp3")["VolumeId"]
    aws.s3.create_bucket(Bucket="ckpt-bucket")
    yield {"aws": aws, "sim": sim, "identity": ident, "vid": vid, "root": scratch_dir, "blockdevs": blockdevs}
    sim.stop()


def _config(env, mnt: str) -> str:
    root, sim, bd = env["root"], env["sim"], env["blockdevs"]
    return f'''
[agent]
state_dir = "{root}/state"
socket = "{root}/state/agent.sock"
[imds]
endpoint = "{sim.url}"
poll_interval = 0.1
slow_poll_interval = 0.5
[aws]
endpoint_url = "{env["aws"].url}"
region = "us-east-1"
[host]
dev_root = "{bd.dev_root}"
sys_root = "{bd.sys_root}"
fstab = "{root}/fstab"
unit_dir = "{root}/units"
[metrics]
enabled = false
[[volumes]]
name = "ckpt"
mount = "{mnt}"
fs = "ext4"
volume_id = "{env["vid"]}"
format_existing = "if-never-written"  # a blank volume made outside the agent
[[checkpoints]]
dir = "{mnt}/run"
s3 = "s3://ckpt-bucket/train/"
marker = "DONE"  # the toy workload touches it after its final checkpoint
interval = 0
restore = false  # a first boot: nothing committed yet to restore
[drain.workload]
pidfile = "{root}/toy.pid"
marker = "{mnt}/run/DONE"
checkpoint_timeout = 30
[drain.lifecycle]
heartbeat_interval = 1
'''


def _wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_spot_notice_end_to_end(e2e, tmp_path):
    import subprocess
    import sys

    mnt = os.path.join(e2e["root"], "mnt", "ckpt")
    agent = AgentProcess(tmp_path, _config(e2e, mnt))
    toy = None
    try:
        agent.wait_ready(60)
        assert os.path.ismount(mnt)
        os.makedirs(os.path.join(mnt, "run"), exist_ok=True)
        toy = subprocess.Popen([sys.executable, "-m", "agent.sim.toy_workload", "--dir", os.path.join(mnt, "run"),
                                "--every", "3", "--step-seconds", "0.05", "--size", "65536",
                                "--marker", os.path.join(mnt, "run", "DONE"), "--pidfile", os.path.join(e2e["root"], "toy.pid")],
                               cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        _wait(lambda: os.path.exists(os.path.join(e2e["root"], "toy.pid")), 20, "the workload")
        time.sleep(0.5)
        e2e["sim"].control("spot", {"action": "terminate", "in": 120})
        _wait(lambda: lifecycle_calls("CompleteLifecycleAction"), 60, f"the lifecycle completion:\n{agent.log()}")
        assert toy.wait(10) == 0
        step = newest_step(os.path.join(mnt, "run"))
        with open(os.path.join(mnt, "run", f"ckpt-{step:08d}.json")) as fh:
            assert json.load(fh)["final"] is True

        ec2, s3 = e2e["aws"].ec2, e2e["aws"].s3
        snaps = ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag:spot-agent:managed", "Values": ["true"]}])["Snapshots"]
        assert len(snaps) == 1
        tags = {t["Key"]: t["Value"] for t in snaps[0]["Tags"]}
        assert tags["spot-agent:volume"] == "ckpt" and tags["spot-agent:notice-kind"] == "spot-interruption"
        assert tags["spot-agent:instance-id"] == e2e["identity"].instance_id

        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt-bucket", Prefix="train/").get("Contents", [])]
        assert any(f"ckpt-{step:08d}.json" in k for k in keys), keys  # the final checkpoint was uploaded
        assert any("manifest" in k for k in keys), keys

        [done] = lifecycle_calls("CompleteLifecycleAction")
        assert (done["group"], done["hook"], done["instance_id"], done["result"]) == (
            GROUP, HOOK, e2e["identity"].instance_id, "CONTINUE")
        assert lifecycle_calls("RecordLifecycleActionHeartbeat")

        with open(os.path.join(e2e["root"], "state", "state.json")) as fh:
            run = json.load(fh)["drain"]["run"]
        assert run["finished"] and run["report"]["ok"], run["report"]
        assert writable(mnt)
        agent.signal(signal.SIGTERM)
        agent.wait_exit(30)
        assert len(lifecycle_calls("CompleteLifecycleAction")) == 1
    finally:
        if toy is not None and toy.poll() is None:
            toy.kill()
            toy.wait(10)
        agent.stop()
