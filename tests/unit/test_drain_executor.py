"""The executor's bookkeeping without root or AWS: step records, idempotent re-runs, upload results,
lifecycle once, and failures that do not stop the steps after them.

Unit tests may not use root, moto or the network, so small stand-ins play EC2, Auto Scaling, the
transfer engine's CheckpointStore and the host commands (fsfreeze needs root); the same paths run
for real in tests/integration/test_drain_*.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, List

import pytest

from agent.aws import Clients
from agent.clock import Clock
from agent.config import parse
from agent.drain.executor import Drainer
from agent.events import Event
from agent.identity import InstanceIdentity
from agent.runner import Result
from agent.state import StateStore
from agent.volumes.model import MountedVolume

NOW = 1_900_000_000.0


class FakeEC2:
    def __init__(self) -> None:
        self.created: List[Dict[str, Any]] = []
        self.lock = threading.Lock()

    def create_snapshot(self, VolumeId, Description, TagSpecifications):  # noqa: N803 - boto3's names
        with self.lock:
            sid = f"snap-{len(self.created):04d}"
            self.created.append({"SnapshotId": sid, "VolumeId": VolumeId, "State": "completed", "StartTime": str(len(self.created)),
                                 "Tags": TagSpecifications[0]["Tags"]})
        return {"SnapshotId": sid}

    def describe_snapshots(self, OwnerIds=None, Filters=()):  # noqa: N803
        out = []
        for s in self.created:
            tags = {t["Key"]: t["Value"] for t in s["Tags"]}
            ok = True
            for f in Filters:
                if f["Name"] == "volume-id":
                    ok &= s["VolumeId"] in f["Values"]
                elif f["Name"].startswith("tag:"):
                    ok &= tags.get(f["Name"][4:]) in f["Values"]
            if ok:
                out.append(s)
        return {"Snapshots": out}

    def delete_snapshot(self, SnapshotId):  # noqa: N803
        self.created = [s for s in self.created if s["SnapshotId"] != SnapshotId]


class FakeAutoScaling:
    def __init__(self) -> None:
        self.completed: List[Dict[str, Any]] = []
        self.beats = 0

    def describe_auto_scaling_instances(self, InstanceIds):  # noqa: N803
        return {"AutoScalingInstances": [{"InstanceId": InstanceIds[0], "AutoScalingGroupName": "grp"}]}

    def describe_lifecycle_hooks(self, AutoScalingGroupName):  # noqa: N803
        return {"LifecycleHooks": [{"LifecycleHookName": "h", "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"}]}

    def record_lifecycle_action_heartbeat(self, **kw):
        self.beats += 1

    def complete_lifecycle_action(self, **kw):
        self.completed.append(kw)


class Runner:
    def __init__(self) -> None:
        self.calls: List[List[str]] = []

    def run(self, argv, timeout=60.0, check=True, input=None):
        self.calls.append(list(argv))
        return Result(list(argv), 0, "", "", 0.0)


@dataclass
class Commit:
    committed: bool
    checkpoint_id: str = ""
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    manifest_key: str = ""


class FakeStore:
    """Stands in for agent.transfer.checkpoints.CheckpointStore (duck-typed .upload)."""

    def __init__(self, name: str, ok: bool = True) -> None:
        self.name = name
        self.ok = ok
        self.calls: List[Dict[str, Any]] = []

    def upload(self, deadline=None, reason="", settled=False, preempt=False):
        self.calls.append({"deadline": deadline, "reason": reason, "settled": settled, "preempt": preempt})
        if self.ok:
            return Commit(True, f"ck-{len(self.calls)}", 3, 1000)
        return Commit(False, error="S3 said no")


CONFIG = """
[agent]
state_dir = "{state}"
[[volumes]]
name = "ckpt"
mount = "/mnt/ckpt"
volume_id = "vol-0123456789abcdef0"
[drain.workload]
wait = "none"
"""


@pytest.fixture
def parts(tmp_path):
    cfg = parse(CONFIG.format(state=tmp_path))
    ec2, asg = FakeEC2(), FakeAutoScaling()
    clients = Clients(ec2=ec2, s3=None, autoscaling=asg, region="us-east-1")
    state = StateStore(str(tmp_path / "state.json"))
    mounted = {"ckpt": MountedVolume("ckpt", "vol-0123456789abcdef0", "/dev/loop9", "/mnt/ckpt", "ext4")}
    ident = InstanceIdentity("i-0123456789abcdef0", "m5.large", "us-east-1a", "us-east-1")
    return cfg, clients, state, mounted, ident


def make(parts, stores=()):
    cfg, clients, state, mounted, ident = parts
    return Drainer(cfg, clients, ident, state, Runner(), Clock(), lambda: mounted, list(stores))


def spot(key="spot:1", left=120.0):
    import time

    now = time.time()
    return Event("spot-interruption", "terminate", now + left, key, now)


def test_a_drain_records_every_step_and_runs_once(parts):
    store = FakeStore("s3://b/ckpt/")
    d = make(parts, [store])
    report = d.run(spot())
    assert report.ok, report.steps
    assert [(s.name, s.state) for s in report.steps] == [
        ("notify", "skipped"), ("wait", "skipped"), ("snapshot", "ok"), ("upload", "ok"), ("retention", "ok"), ("lifecycle", "ok")]
    assert report.snapshots == {"ckpt": "snap-0000"}
    assert report.checkpoint_ids == {"s3://b/ckpt/": "ck-1"}
    assert store.calls[0]["reason"] == "drain:spot-interruption" and store.calls[0]["deadline"] > 0
    assert store.calls[0]["settled"] is False  # nothing confirmed the checkpoint: settle rules apply
    asg = parts[1].autoscaling
    assert [c["LifecycleActionResult"] for c in asg.completed] == ["CONTINUE"]
    rec = parts[2].get("drain")["run"]
    assert rec["finished"] and set(rec["steps"]) == {"notify", "wait", "snapshot", "upload", "retention", "lifecycle"}
    # the same notice again: the stored report, nothing repeated
    again = make(parts, [store]).run(spot())
    assert again.snapshots == report.snapshots
    assert len(parts[1].ec2.created) == 1 and len(asg.completed) == 1 and len(store.calls) == 1


@pytest.fixture
def boot(tmp_path, monkeypatch):
    """The host's boot id, through the [host] proc_root the agent reads it from."""
    from agent import hostfacts

    proc = tmp_path / "proc"
    (proc / "sys/kernel/random").mkdir(parents=True)
    monkeypatch.setattr(hostfacts, "_DEFAULT", hostfacts.HostFacts(proc_root=str(proc)))

    def set_boot(value: str) -> None:
        (proc / "sys/kernel/random/boot_id").write_text(value + "\n")

    set_boot("boot-1")
    return set_boot


def test_a_finished_drain_of_an_earlier_boot_does_not_block_this_one(parts, boot):
    store = FakeStore("s3://b/ckpt/")
    make(parts, [store]).run(spot(key="shutdown"))
    boot("boot-2")  # the instance was stopped and started
    second = make(parts, [store]).run(spot(key="shutdown"))
    assert second.ok and len(parts[1].ec2.created) == 2 and len(store.calls) == 2


def test_a_resumed_drain_never_adopts_an_earlier_boots_snapshot(parts, boot):
    """The same notice key on the next boot (a spot `stop` notice after a stop and start): the snapshot
    tag names the boot, so the find-before-create of a resumed drain does not take the old snapshot."""
    store = FakeStore("s3://b/ckpt/")
    make(parts, [store]).run(spot(key="spot:stop"))
    assert [s["SnapshotId"] for s in parts[1].ec2.created] == ["snap-0000"]
    boot("boot-2")
    d = make(parts, [store])
    rec = d._new_record(spot(key="spot:stop"), early=False)
    rec["steps"] = {"notify": {"state": "skipped"}, "wait": {"state": "skipped"}, "snapshot": {"state": "running"}}
    rec["snapshot_requested"] = {"ckpt": True}  # killed after the request was recorded, before it was sent
    d._save("run", rec)
    report = d.resume_if_pending()
    assert report is not None and report.ok, report
    assert report.snapshots == {"ckpt": "snap-0001"}
    assert len(parts[1].ec2.created) == 2


def test_a_failed_upload_still_completes_the_lifecycle_but_is_not_ok(parts):
    report = make(parts, [FakeStore("s3://b/ckpt/", ok=False)]).run(spot())
    assert report.step("upload").state == "failed" and "S3 said no" in report.step("upload").reason
    assert report.step("lifecycle").state == "ok"
    assert not report.ok


def test_resume_after_a_crash_in_the_snapshot_step_finds_the_requested_snapshot(parts):
    d = make(parts)
    ev = spot("spot:crash")
    report = d.run(ev)
    sid = report.snapshots["ckpt"]
    # pretend the agent died right after CreateSnapshot returned, before recording it
    rec = parts[2].get("drain")["run"]
    rec.update(finished=False, snapshots={}, lifecycle_completed=False)
    for name in ("snapshot", "upload", "retention", "lifecycle"):
        rec["steps"].pop(name, None)
    rec["steps"]["snapshot"] = {"state": "running"}
    parts[2].update("drain", run=rec)
    assert make(parts).pending_event().key == "spot:crash"
    resumed = make(parts).resume_if_pending()
    assert resumed.resumed and resumed.snapshots == {"ckpt": sid}
    assert len(parts[1].ec2.created) == 1


def test_not_in_a_group_skips_the_lifecycle_step(parts):
    parts[1].autoscaling.describe_auto_scaling_instances = lambda InstanceIds: {"AutoScalingInstances": []}  # noqa: N803
    report = make(parts).run(spot())
    assert report.step("lifecycle").state == "skipped"
    assert report.ok and not report.lifecycle_completed


def test_dry_run_names_the_discovered_hook(parts):
    text = make(parts).dry_run(spot())
    assert "lifecycle target: group grp, hook h" in text
    assert "snapshot" in text and "ckpt" in text


def test_freeze_and_thaw_go_through_the_runner(parts):
    d = make(parts)
    d.run(spot())
    cmds = [c[:2] for c in d.runner.calls]
    assert ["fsfreeze", "-f"] in cmds and ["fsfreeze", "-u"] in cmds
    assert cmds.index(["fsfreeze", "-f"]) < cmds.index(["fsfreeze", "-u"])
    assert parts[2].get("drain")["frozen"] == {}
