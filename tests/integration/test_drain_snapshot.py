"""The snapshot step on a real filesystem: frozen exactly while CreateSnapshot is in flight, thawed on
every path, tagged, found again instead of taken twice, and retention that deletes only ours.

Real loop devices with ext4, real fsfreeze, moto over HTTP (its EBS backend runs in this process, so
a callback inside CreateSnapshot can probe the filesystem while the call is in flight).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from agent.drain import snapshots as snaps
from agent.drain.freeze import boot_id
from agent.events import Event
from agent.volumes.model import MountedVolume
from tests.integration.drain_helpers import drain_env, writable  # noqa: F401

pytestmark = pytest.mark.root

NO_WORKLOAD = 'wait = "none"\n'


def spot(seconds: float = 120.0, key: str = "spot:1") -> Event:
    now = time.time()
    return Event("spot-interruption", "terminate", now + seconds, key, now)


class WriteProbe:
    """Inside CreateSnapshot: start a write on the volume and see whether it finishes in 0.5 s."""

    def __init__(self, mnt: str) -> None:
        self.mnt = mnt
        self.blocked_during_call = None
        self.finished = threading.Event()

    def __call__(self, snapshot_id: str, volume_id: str) -> None:
        def write() -> None:
            with open(os.path.join(self.mnt, "written-during-snapshot"), "w") as fh:
                fh.write("hello")
                fh.flush()
                os.fsync(fh.fileno())
            self.finished.set()

        threading.Thread(target=write, daemon=True).start()
        self.blocked_during_call = not self.finished.wait(0.5)


def test_frozen_during_the_call_and_thawed_after(drain_env):
    probe = WriteProbe(drain_env.mnt)
    drain_env.host.sim.on_snapshot.append(probe)
    try:
        report = drain_env.drainer(drain_env.config(workload=NO_WORKLOAD)).run(spot())
    finally:
        drain_env.host.sim.on_snapshot.remove(probe)
    assert probe.blocked_during_call is True, "a writer was not blocked while CreateSnapshot was in flight"
    assert probe.finished.wait(5), "the writer never finished: the filesystem stayed frozen"
    assert writable(drain_env.mnt)
    assert report.step("snapshot").state == "ok", report.steps
    [snap] = drain_env.snapshots()
    assert report.snapshots == {"ckpt": snap["SnapshotId"]}
    tags = {t["Key"]: t["Value"] for t in snap["Tags"]}
    assert tags["spot-agent:managed"] == "true"
    assert tags["spot-agent:volume"] == "ckpt"
    assert tags["spot-agent:instance-id"] == drain_env.identity.instance_id
    assert tags["spot-agent:notice-kind"] == "spot-interruption"
    assert tags["spot-agent:notice-key"] == snaps.notice_tag(drain_env.identity.instance_id, "spot:1", boot_id())
    assert drain_env.frozen_records() == {}


def test_a_slow_call_is_thawed_at_freeze_timeout(drain_env):
    probe = WriteProbe(drain_env.mnt)
    drain_env.host.sim.on_snapshot.append(probe)
    drain_env.host.sim.snapshot_delay = 3.0
    try:
        cfg = drain_env.config(workload=NO_WORKLOAD, extra="[drain]\nfreeze_timeout = 1.0\n")
        report = drain_env.drainer(cfg).run(spot())
    finally:
        drain_env.host.sim.snapshot_delay = 0.0
        drain_env.host.sim.on_snapshot.remove(probe)
    assert probe.blocked_during_call is True
    # the write finished while CreateSnapshot was still sleeping: thawed at 1 s, the call took 3 s
    assert report.step("snapshot").state == "ok"
    assert "crash-consistent" in report.step("snapshot").reason
    assert len(drain_env.snapshots()) == 1
    assert writable(drain_env.mnt)


def test_a_failing_call_still_thaws(drain_env):
    cfg = drain_env.config(workload=NO_WORKLOAD)
    drainer = drain_env.drainer(cfg)
    # a volume id EC2 does not know: CreateSnapshot fails inside the frozen window
    drainer.mounted = lambda: {"ckpt": MountedVolume("ckpt", "vol-0000000000000dead", "/dev/null", drain_env.mnt, "ext4")}
    report = drainer.run(spot())
    assert report.step("snapshot").state == "failed"
    assert "NotFound" in report.step("snapshot").reason or "not exist" in report.step("snapshot").reason
    assert not report.ok
    assert writable(drain_env.mnt)
    assert drain_env.frozen_records() == {}


def test_a_snapshot_requested_before_a_crash_is_found_not_retaken(drain_env):
    cfg = drain_env.config(workload=NO_WORKLOAD)
    ev = spot(key="spot:found")
    tags = snaps.snapshot_tags(drain_env.identity.instance_id, "ckpt", "", ev.kind, ev.detected_at, ev.key, boot_id())
    earlier = snaps.create_snapshot(drain_env.aws.ec2, drain_env.volume_id, tags, "before the crash")
    drainer = drain_env.drainer(cfg)
    # the state file says the snapshot step was running when the agent died
    rec = drainer._new_record(ev, early=False)
    rec["steps"]["snapshot"] = {"state": "running"}
    rec["snapshot_requested"]["ckpt"] = True
    drainer._save("run", rec)
    report = drainer.run(ev)
    assert report.snapshots == {"ckpt": earlier}
    assert [s["SnapshotId"] for s in drain_env.snapshots()] == [earlier]


def test_crash_consistent_uses_one_create_snapshots_call(drain_env):
    cfg = drain_env.config(workload=NO_WORKLOAD, extra="[drain]\ncrash_consistent = true\n")
    drainer = drain_env.drainer(cfg)
    real = drainer.mounted()["ckpt"]
    # a second volume on the same instance; both are frozen for the one CreateSnapshots call
    vid2 = drain_env.aws.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    drain_env.aws.ec2.attach_volume(VolumeId=vid2, InstanceId=drain_env.identity.instance_id, Device="/dev/sdg")
    other = MountedVolume("ckpt2", vid2, real.device, drain_env.mnt, "ext4")
    cfg.volumes.append(type(cfg.volumes[0])(name="ckpt2", mount=drain_env.mnt + "2", fs="ext4", volume_id=vid2))
    drainer.mounted = lambda: {"ckpt": real, "ckpt2": other}
    probe = WriteProbe(drain_env.mnt)
    drain_env.host.sim.on_snapshot.append(probe)
    try:
        report = drainer.run(spot())
    finally:
        drain_env.host.sim.on_snapshot.remove(probe)
    assert report.step("snapshot").state == "ok", report.steps
    assert set(report.snapshots) == {"ckpt", "ckpt2"}
    assert probe.blocked_during_call is True
    for name, sid in report.snapshots.items():
        [snap] = drain_env.aws.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"]
        tags = {t["Key"]: t["Value"] for t in snap["Tags"]}
        assert tags["spot-agent:volume"] == name and tags["spot-agent:managed"] == "true"
    assert writable(drain_env.mnt)


def test_retention_deletes_only_ours_and_never_the_newest(drain_env):
    from agent.sim.blockdevs import LocalBlockDevices

    ec2 = drain_env.aws.ec2
    vid = drain_env.volume_id
    ours = []
    for i in range(4):
        tags = snaps.snapshot_tags("i-old", "ckpt", "", "spot-interruption", 0.0, f"old:{i}")
        sid = snaps.create_snapshot(ec2, vid, tags, f"old {i}")
        LocalBlockDevices.set_snapshot(sid, start_time=f"2026-01-0{i + 1}T00:00:00.000Z")
        ours.append(sid)
    foreign = ec2.create_snapshot(VolumeId=vid, TagSpecifications=[{"ResourceType": "snapshot", "Tags": [
        {"Key": "spot-agent:volume", "Value": "ckpt"}]}])["SnapshotId"]  # same name, not managed by us
    LocalBlockDevices.set_snapshot(foreign, start_time="2025-01-01T00:00:00.000Z")
    # the newest of ours is pending: the newest *completed* one must survive
    LocalBlockDevices.set_snapshot(ours[3], state="pending")
    deleted = snaps.apply_retention(ec2, "ckpt", keep=1)
    left = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert foreign in left
    assert ours[3] in left and ours[2] in left  # newest, and newest completed
    assert set(deleted) == {ours[0], ours[1]}


def test_retention_runs_in_the_drain(drain_env):
    cfg = drain_env.config(workload=NO_WORKLOAD, extra="[drain]\nkeep_snapshots = 2\nsnapshot_spacing = 0\n")
    for i in range(3):
        report = drain_env.drainer(cfg).run(spot(key=f"spot:{i}"))
        assert report.ok, report.steps
    assert len(drain_env.snapshots()) == 2
    assert report.step("retention").state == "ok"


def test_a_drain_left_by_an_earlier_boot_is_closed_not_resumed(drain_env):
    from agent.sim.localaws import lifecycle_calls

    drainer = drain_env.drainer(drain_env.config(workload=NO_WORKLOAD))
    ev = spot(key="spot:old-boot")
    rec = drainer._new_record(ev, early=False)
    rec["boot_id"] = "an-earlier-boot"
    rec["steps"]["notify"] = {"state": "ok", "seconds": 0.0, "reason": ""}
    drainer._save("run", rec)
    assert drainer.pending_event() is None
    assert drainer.resume_if_pending() is None
    old = drainer.state.get("drain")["run"]
    assert old["finished"] and not old["report"]["ok"]
    assert drain_env.snapshots() == [] and not lifecycle_calls()
    # a new notice on this boot drains normally
    assert drainer.run(spot(key="spot:new")).ok


def test_retention_ages_out_only_this_runs_snapshots(aws):
    """A fleet shares one config, so every instance's volume is called "ckpt": one instance's retention
    must not delete another's snapshots."""
    from agent.sim.blockdevs import LocalBlockDevices

    vid = aws.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    made = {}
    for run in ("i-aaa", "i-bbb"):
        for i in range(3):
            tags = snaps.snapshot_tags(run, "ckpt", run, "spot-interruption", 0.0, f"{run}:{i}")
            sid = snaps.create_snapshot(aws.ec2, vid, tags, f"{run} {i}")
            LocalBlockDevices.set_snapshot(sid, start_time=f"2026-01-0{i + 1}T00:00:0{run[-1] == 'b' and 1 or 0}.000Z")
            made.setdefault(run, []).append(sid)
    deleted = snaps.apply_retention(aws.ec2, "ckpt", keep=1, run="i-aaa")
    assert set(deleted) == set(made["i-aaa"][:2])
    left = {s["SnapshotId"] for s in aws.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert set(made["i-bbb"]) <= left and made["i-aaa"][2] in left
