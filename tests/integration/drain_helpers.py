"""Shared set-up for the drain's integration tests: an instance launched by an Auto Scaling group with a
terminating lifecycle hook (moto over HTTP), a real EBS-like volume (loop device, mkfs, mount) brought
up by the VolumeManager, the toy workload as a real process, and the IMDS simulator for subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import pytest

from tests.blockdev_fixtures import Host, volume

GROUP = "train-asg"
HOOK = "drain-hook"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def asg_identity(aws, group: str = GROUP, hook: str = HOOK, transition: str = "autoscaling:EC2_INSTANCE_TERMINATING"):
    """An instance launched by a group with a lifecycle hook (terminating, unless ``transition`` says)."""
    from agent.identity import InstanceIdentity

    aws.ec2.create_launch_template(LaunchTemplateName=f"{group}-template",
                                   LaunchTemplateData={"ImageId": "ami-12345678", "InstanceType": "m5.large"})
    aws.autoscaling.create_auto_scaling_group(AutoScalingGroupName=group, LaunchTemplate={"LaunchTemplateName": f"{group}-template"},
                                              MinSize=1, MaxSize=1, DesiredCapacity=1, AvailabilityZones=["us-east-1a"])
    aws.autoscaling.put_lifecycle_hook(AutoScalingGroupName=group, LifecycleHookName=hook,
                                       LifecycleTransition=transition,
                                       HeartbeatTimeout=300, DefaultResult="ABANDON")
    found = aws.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"][0]
    iid = found["Instances"][0]["InstanceId"]
    return InstanceIdentity(instance_id=iid, instance_type="m5.large", availability_zone="us-east-1a", region="us-east-1")


@dataclass
class DrainEnv:
    host: Host
    root: str
    mnt: str
    volume_id: str
    ckpt_dir: str
    marker: str
    pidfile: str
    procs: List[subprocess.Popen] = field(default_factory=list)

    @property
    def aws(self):
        return self.host.aws

    @property
    def identity(self):
        return self.host.identity

    @property
    def state_path(self) -> str:
        return os.path.join(self.root, "state.json")

    def config_text(self, extra: str = "", workload: str = "", imds: str = "") -> str:
        wl = workload if workload else (f'pidfile = "{self.pidfile}"\nmarker = "{self.marker}"\n')
        return (
            f'[agent]\nstate_dir = "{self.root}"\nsocket = "{self.root}/agent.sock"\n'
            f'[imds]\nendpoint = "{imds or "http://127.0.0.1:9"}"\n'
            f'[aws]\nendpoint_url = "{self.aws.url}"\nregion = "us-east-1"\n'
            f'[host]\ndev_root = "{self.host.sim.dev_root}"\nsys_root = "{self.host.sim.sys_root}"\n'
            f'fstab = "{self.root}/fstab"\nunit_dir = "{self.root}/units"\n'
            f'[[volumes]]\nname = "ckpt"\nmount = "{self.mnt}"\nfs = "ext4"\nvolume_id = "{self.volume_id}"\nformat_existing = "if-never-written"\n'
            f"{extra}\n"
            f"[drain.workload]\n{wl}"
        )

    def config(self, **kw: Any):
        from agent.config import parse

        return parse(self.config_text(**kw))

    def write_config(self, **kw: Any) -> str:
        path = os.path.join(self.root, "agent.toml")
        with open(path, "w") as fh:
            fh.write(self.config_text(**kw))
        os.chmod(path, 0o600)
        return path

    def drainer(self, config, stores: Optional[List[Any]] = None, state=None, runner=None):
        from agent.clock import Clock
        from agent.drain.executor import Drainer
        from agent.runner import Runner
        from agent.state import StateStore

        state = state or StateStore(self.state_path)
        from agent.volumes.manager import VolumeManager

        vm = VolumeManager(config.volumes, config.host, self.aws, self.identity, state, runner or Runner())
        return Drainer(config, self.aws, self.identity, state, runner or Runner(), Clock(), vm.mounted, stores or [])

    def start_workload(self, *extra: str, every: int = 3, step_seconds: float = 0.05) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "agent.sim.toy_workload", "--dir", self.ckpt_dir,
                                 "--every", str(every), "--step-seconds", str(step_seconds),
                                 "--marker", self.marker, "--pidfile", self.pidfile, *extra],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        deadline = time.time() + 20
        while not os.path.exists(self.pidfile) and time.time() < deadline:
            time.sleep(0.02)
        assert os.path.exists(self.pidfile), "toy workload did not start"
        return proc

    def snapshots(self) -> List[Dict[str, Any]]:
        resp = self.aws.ec2.describe_snapshots(OwnerIds=["self"], Filters=[
            {"Name": "tag:spot-agent:managed", "Values": ["true"]}, {"Name": "volume-id", "Values": [self.volume_id]}])
        return resp["Snapshots"]

    def frozen_records(self) -> Dict[str, Any]:
        import json

        try:
            with open(self.state_path) as fh:
                return (json.load(fh).get("drain") or {}).get("frozen") or {}
        except FileNotFoundError:
            return {}


def writable(path: str, timeout: float = 3.0) -> bool:
    """Can a write on ``path``'s filesystem finish within ``timeout``? If not, it is frozen: thaw it so
    the blocked writer (unkillable until then) finishes, and say False."""
    done = threading.Event()

    def write() -> None:
        with open(os.path.join(path, f".probe-{threading.get_ident()}"), "w") as fh:
            fh.write("x")
            fh.flush()
            os.fsync(fh.fileno())
        done.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    ok = done.wait(timeout)
    if not ok:
        subprocess.run(["fsfreeze", "-u", path], capture_output=True)
        done.wait(10)
    return ok


@pytest.fixture
def drain_env(aws, blockdevs, scratch_dir):
    ident = asg_identity(aws)
    host = Host(aws, blockdevs, ident, scratch_dir)
    vid = aws.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1, VolumeType="gp3")["VolumeId"]
    from agent.clock import SYSTEM_CLOCK
    from agent.volumes.attach import wait_available

    wait_available(aws.ec2, vid, SYSTEM_CLOCK, 30)  # the strict local AWS: creating, NotFound for a moment
    mnt = host.mnt("ckpt")
    mgr = host.manager([volume("ckpt", mnt, fs="ext4", volume_id=vid, format_existing="if-never-written")],
                       state_name="state.json")
    [res] = mgr.up()
    assert res.ok, res.error
    ckpt = os.path.join(mnt, "run")
    os.makedirs(ckpt, exist_ok=True)
    env = DrainEnv(host, scratch_dir, mnt, vid, ckpt, os.path.join(mnt, "run", "DONE"), os.path.join(scratch_dir, "toy.pid"))
    try:
        yield env
    finally:
        for p in env.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)  # never leave it frozen
