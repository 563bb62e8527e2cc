"""The strict local AWS's models alone: a fake clock, a backend of plain dicts, no moto, no HTTP.

These are the rules users rehearse against (docs/simulators.md, "Local AWS"), so each one has a test here.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest

from agent.clock import FakeClock
from agent.sim.strict import (AUTOSCALING, EC2, Request, StrictModel, StrictSettings, TokenBucket, settings_from)


class FakeBackend:
    def __init__(self) -> None:
        self.vol_az: Dict[str, str] = {}
        self.atts: Dict[str, List[Tuple[str, str]]] = {}
        self.inst_az: Dict[str, str] = {"i-1": "us-east-1a", "i-2": "us-east-1b"}
        self.devices: Dict[str, Dict[str, str]] = {"i-1": {"/dev/sda1": "vol-root"}, "i-2": {"/dev/sda1": "vol-root2"}}
        self.hooks: Dict[str, List[Tuple[str, str, float, str]]] = {}
        self.written: Dict[str, float] = {}

    def volume_az(self, vid: str) -> Optional[str]:
        return self.vol_az.get(vid)

    def volume_attachments(self, vid: str) -> List[Tuple[str, str]]:
        return self.atts.get(vid, [])

    def instance_az(self, iid: str) -> Optional[str]:
        return self.inst_az.get(iid)

    def instance_devices(self, iid: str) -> Dict[str, str]:
        return dict(self.devices.get(iid, {}))

    def instance_root_device(self, iid: str) -> str:
        return "/dev/sda1"

    def terminating_hooks(self, iid: str) -> List[Tuple[str, str, float, str]]:
        return self.hooks.get(iid, [])

    def written_gib(self, vid: str) -> Optional[float]:
        return self.written.get(vid)

    def hook_transition(self, group: str, hook: str) -> str:
        return {"launch": "autoscaling:EC2_INSTANCE_LAUNCHING", "h": "autoscaling:EC2_INSTANCE_TERMINATING"}.get(hook, "")


NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


def created_volume(vid: str, az: str = "us-east-1a", snapshot: str = "") -> bytes:
    return (f'<CreateVolumeResponse xmlns="{NS}"><volumeId>{vid}</volumeId><size>1</size>'
            f"<snapshotId>{snapshot}</snapshotId><availabilityZone>{az}</availabilityZone>"
            "<status>available</status></CreateVolumeResponse>").encode()


def described_volume(vid: str, status: str = "available", attachment: Optional[Tuple[str, str]] = None,
                     tags: bool = True) -> bytes:
    att = (f"<item><volumeId>{vid}</volumeId><instanceId>{attachment[0]}</instanceId><device>{attachment[1]}</device>"
           "<status>attached</status></item>") if attachment else ""
    tag = "<item><key>k</key><value>v</value></item>" if tags else ""
    return (f'<DescribeVolumesResponse xmlns="{NS}"><volumeSet><item><volumeId>{vid}</volumeId>'
            f"<status>{status}</status><attachmentSet>{att}</attachmentSet><tagSet>{tag}</tagSet></item>"
            "</volumeSet></DescribeVolumesResponse>").encode()


def described_snapshot(sid: str) -> bytes:
    return (f'<DescribeSnapshotsResponse xmlns="{NS}"><snapshotSet><item><snapshotId>{sid}</snapshotId>'
            "<status>completed</status><progress>100%</progress><tagSet><item><key>k</key><value>v</value></item>"
            "</tagSet></item></snapshotSet></DescribeSnapshotsResponse>").encode()


def created_snapshot(sid: str, vid: str, size: int = 1) -> bytes:
    return (f'<CreateSnapshotResponse xmlns="{NS}"><snapshotId>{sid}</snapshotId><volumeId>{vid}</volumeId>'
            f"<volumeSize>{size}</volumeSize><status>completed</status><progress>100%</progress>"
            "</CreateSnapshotResponse>").encode()


@pytest.fixture
def world():
    clock = FakeClock()
    backend = FakeBackend()
    calls: List[dict] = []
    model = StrictModel(backend, StrictSettings(), clock, on_lifecycle=calls.append)
    return clock, backend, model, calls


def ec2(action: str, **params: str) -> Request:
    return Request(EC2, action, dict(params))


def make_volume(model: StrictModel, backend: FakeBackend, vid: str, az: str = "us-east-1a", snapshot: str = "") -> None:
    req = ec2("CreateVolume", AvailabilityZone=az, **({"SnapshotId": snapshot} if snapshot else {}))
    assert model.check(req) is None
    backend.vol_az[vid] = az
    model.learned(req, created_volume(vid, az, snapshot))


def make_snapshot(model: StrictModel, backend: FakeBackend, sid: str = "snap-1", vid: str = "vol-a") -> Request:
    """A volume ``vid``, ten seconds old, and a snapshot ``sid`` of it just taken."""
    make_volume(model, backend, vid)
    model.clock.advance(10)  # type: ignore[attr-defined]
    snap = ec2("CreateSnapshot", VolumeId=vid)
    assert model.check(snap) is None
    model.learned(snap, created_snapshot(sid, vid))
    return snap


def status_of(model: StrictModel, vid: str, **kw) -> str:
    import xml.etree.ElementTree as ET

    body = model.rewrite(ec2("DescribeVolumes", **{"VolumeId.1": vid}), described_volume(vid, **kw))
    root = ET.fromstring(body)
    items = [e for e in root.iter() if e.tag.endswith("volumeSet")][0]
    if not len(items):
        return "hidden"
    vol = items[0]
    status = vol.find(f"{{{NS}}}status").text
    atts = [a.find(f"{{{NS}}}status").text for a in vol.find(f"{{{NS}}}attachmentSet")]
    return status + (f"/{atts[0]}" if atts else "")


def test_a_new_volume_is_creating_then_available_and_longer_from_a_snapshot(world):
    clock, backend, model, _ = world
    make_volume(model, backend, "vol-a")
    make_volume(model, backend, "vol-b", snapshot="snap-1")
    clock.advance(model.settings.visible_after_seconds)
    assert status_of(model, "vol-a") == "creating"
    clock.advance(model.settings.volume_create_seconds - model.settings.visible_after_seconds)
    assert status_of(model, "vol-a") == "available"
    assert status_of(model, "vol-b") == "creating"
    clock.advance(model.settings.volume_from_snapshot_seconds - model.settings.volume_create_seconds)
    assert status_of(model, "vol-b") == "available"


def test_a_new_volume_is_not_found_by_id_then_tags_come_later(world):
    clock, backend, model, _ = world
    make_volume(model, backend, "vol-a")
    err = model.check(ec2("DescribeVolumes", **{"VolumeId.1": "vol-a"}))
    assert err is not None and err.code == "InvalidVolume.NotFound" and "vol-a" in err.message
    # listed without ids: simply missing
    assert status_of(model, "vol-a") == "hidden"
    clock.advance(model.settings.visible_after_seconds)
    assert model.check(ec2("DescribeVolumes", **{"VolumeId.1": "vol-a"})) is None
    body = model.rewrite(ec2("DescribeVolumes"), described_volume("vol-a"))
    assert b"<ns0:key>" not in body and b"<key>" not in body  # tags not there yet
    tagged = ec2("DescribeVolumes", **{"Filter.1.Name": "tag:k", "Filter.1.Value.1": "v"})
    assert b"vol-a" not in model.rewrite(tagged, described_volume("vol-a"))  # a tag filter does not match yet
    clock.advance(model.settings.tags_after_seconds - model.settings.visible_after_seconds)
    assert b"<key>k</key>" in model.rewrite(tagged, described_volume("vol-a"))


def test_attach_goes_through_attaching_and_refuses_the_wrong_states(world):
    clock, backend, model, _ = world
    make_volume(model, backend, "vol-a")
    attach = ec2("AttachVolume", VolumeId="vol-a", InstanceId="i-1", Device="/dev/sdf")
    assert model.check(attach).code == "IncorrectState"  # still creating
    clock.advance(model.settings.volume_create_seconds)
    assert model.check(attach) is None
    model.learned(attach, b"<AttachVolumeResponse/>")
    backend.atts["vol-a"] = [("i-1", "/dev/sdf")]
    backend.devices["i-1"]["/dev/sdf"] = "vol-a"
    assert status_of(model, "vol-a", status="in-use", attachment=("i-1", "/dev/sdf")) == "in-use/attaching"
    assert model.check(ec2("DetachVolume", VolumeId="vol-a")).code == "IncorrectState"
    assert model.check(ec2("AttachVolume", VolumeId="vol-a", InstanceId="i-1", Device="/dev/sdg")).code == "VolumeInUse"
    clock.advance(model.settings.attach_seconds)
    assert status_of(model, "vol-a", status="in-use", attachment=("i-1", "/dev/sdf")) == "in-use/attached"
    assert model.check(ec2("DeleteVolume", VolumeId="vol-a")).code == "VolumeInUse"


def test_detach_shows_detaching_then_available(world):
    clock, backend, model, _ = world
    make_volume(model, backend, "vol-a")
    clock.advance(10)
    backend.atts["vol-a"] = [("i-1", "/dev/sdf")]
    detach = ec2("DetachVolume", VolumeId="vol-a", InstanceId="i-1")
    assert model.check(detach) is None
    backend.atts["vol-a"] = []  # moto detaches at once
    model.learned(detach, f'<DetachVolumeResponse xmlns="{NS}"><instanceId>i-1</instanceId><device>/dev/sdf</device></DetachVolumeResponse>'.encode())
    assert status_of(model, "vol-a") == "in-use/detaching"
    assert model.check(ec2("AttachVolume", VolumeId="vol-a", InstanceId="i-1", Device="/dev/sdf")).code == "IncorrectState"
    clock.advance(model.settings.detach_seconds)
    assert status_of(model, "vol-a") == "available"


def test_zone_mismatch_device_in_use_and_the_attachment_limit(world):
    clock, backend, model, _ = world
    make_volume(model, backend, "vol-a")
    clock.advance(10)
    err = model.check(ec2("AttachVolume", VolumeId="vol-a", InstanceId="i-2", Device="/dev/sdf"))
    assert err.code == "InvalidVolume.ZoneMismatch"
    backend.devices["i-1"]["/dev/xvdf"] = "vol-x"
    err = model.check(ec2("AttachVolume", VolumeId="vol-a", InstanceId="i-1", Device="/dev/sdf"))
    assert err.code == "InvalidParameterValue" and "/dev/sdf" in err.message and "in use" in err.message
    model.settings.attachments_per_instance = 2
    err = model.check(ec2("AttachVolume", VolumeId="vol-a", InstanceId="i-1", Device="/dev/sdg"))
    assert err.code == "AttachmentLimitExceeded"


def test_one_snapshot_per_volume_per_15_s_and_progress_grows_with_the_data(world):
    clock, backend, model, _ = world
    make_volume(model, backend, "vol-a")
    clock.advance(10)
    backend.written["vol-a"] = 2.0
    snap = ec2("CreateSnapshot", VolumeId="vol-a")
    assert model.check(snap) is None
    model.learned(snap, created_snapshot("snap-1", "vol-a"))
    clock.advance(14.0)
    err = model.check(snap)
    assert err.code == "SnapshotCreationPerVolumeRateExceeded"
    describe = ec2("DescribeSnapshots", **{"SnapshotId.1": "snap-1"})
    total = model.settings.snapshot_base_seconds + 2.0 * model.settings.snapshot_seconds_per_gib
    body = model.rewrite(describe, described_snapshot("snap-1"))
    assert b"<status>pending</status>" in body and f"<progress>{int(99 * 14 / total)}%".encode() in body
    clock.advance(1.0)
    assert model.check(snap) is None  # 15 s after the first
    clock.advance(total)
    assert b"<status>completed</status>" in model.rewrite(describe, described_snapshot("snap-1"))


def test_a_new_snapshot_is_not_found_for_a_moment(world):
    clock, backend, model, _ = world
    make_snapshot(model, backend)
    assert model.check(ec2("DescribeSnapshots", **{"SnapshotId.1": "snap-1"})).code == "InvalidSnapshot.NotFound"
    filtered = ec2("DescribeSnapshots", **{"Filter.1.Name": "tag:k", "Filter.1.Value.1": "v"})
    clock.advance(model.settings.visible_after_seconds)
    assert b"snap-1" not in model.rewrite(filtered, described_snapshot("snap-1"))  # tags not yet
    clock.advance(model.settings.tags_after_seconds)
    assert b"snap-1" in model.rewrite(filtered, described_snapshot("snap-1"))


def test_concurrent_pending_snapshots_are_capped_per_volume(world):
    clock, backend, model, _ = world
    model.settings.pending_snapshots_per_volume = 2
    model.settings.snapshot_spacing_seconds = 0.0
    model.settings.snapshot_seconds_per_gib = 1000.0
    make_volume(model, backend, "vol-a")
    clock.advance(10)
    snap = ec2("CreateSnapshot", VolumeId="vol-a")
    for n in range(2):
        assert model.check(snap) is None
        model.learned(snap, created_snapshot(f"snap-{n}", "vol-a"))
    assert model.check(snap).code == "ConcurrentSnapshotLimitExceeded"


def test_create_snapshots_counts_for_each_volume_of_the_instance(world):
    clock, backend, model, _ = world
    backend.devices["i-1"]["/dev/sdf"] = "vol-a"
    make_snapshot(model, backend)
    multi = ec2("CreateSnapshots", **{"InstanceSpecification.InstanceId": "i-1",
                                      "InstanceSpecification.ExcludeBootVolume": "true"})
    assert model.check(multi).code == "SnapshotCreationPerVolumeRateExceeded"


def test_a_volume_from_a_pending_snapshot_is_allowed(world):
    clock, backend, model, _ = world
    make_snapshot(model, backend)
    assert model.check(ec2("CreateVolume", AvailabilityZone="us-east-1a", SnapshotId="snap-1")) is None


def test_token_buckets_refuse_then_refill_and_each_action_has_its_own():
    clock = FakeClock()
    model = StrictModel(FakeBackend(), StrictSettings(ec2_describe_bucket=(3, 1.0), autoscaling_bucket=(1, 0.5)), clock)
    describe = ec2("DescribeVolumes")
    assert [model.check(describe) for _ in range(3)] == [None, None, None]
    err = model.check(describe)
    assert err.code == "RequestLimitExceeded" and err.status == 503
    assert model.check(ec2("DescribeSnapshots")) is None  # another action, another bucket
    clock.advance(1.0)
    assert model.check(describe) is None
    hb = Request(AUTOSCALING, "DescribeAutoScalingInstances", {})
    assert model.check(hb) is None
    err = model.check(hb)
    assert err.code == "Throttling" and err.status == 400
    assert [c["code"] for c in model.calls][-2:] == ["", "Throttling"]


def test_token_bucket_alone():
    b = TokenBucket(2, 0.5, now=0.0)
    assert b.take(0.0) and b.take(0.0) and not b.take(0.0)
    assert not b.take(1.0) and b.take(2.0)


def lifecycle(action: str, iid: str = "i-1", hook: str = "h", **kw: str) -> Request:
    return Request(AUTOSCALING, action, dict({"InstanceId": iid, "LifecycleHookName": hook,
                                              "AutoScalingGroupName": "g"}, **kw))


def test_complete_lifecycle_action_only_in_terminating_wait(world):
    clock, backend, model, calls = world
    backend.hooks["i-1"] = [("g", "h", 60.0, "ABANDON")]
    complete = lifecycle("CompleteLifecycleAction", LifecycleActionResult="CONTINUE")
    err = model.check(complete)
    assert err.code == "ValidationError" and "No active Lifecycle Action" in err.message
    assert model.begin_termination("i-1") == ["g/h"]
    assert model.lifecycle_state("i-1").deadline == clock.time() + 60
    assert model.check(complete) is None
    model.learned(complete, b"<ok/>")
    assert model.lifecycle_state("i-1").result == "CONTINUE"
    assert model.check(complete).code == "ValidationError"  # once only


def test_heartbeats_extend_the_timeout_and_silence_times_out_to_the_default(world):
    clock, backend, model, calls = world
    backend.hooks["i-1"] = [("g", "h", 30.0, "ABANDON")]
    model.begin_termination("i-1")
    beat = lifecycle("RecordLifecycleActionHeartbeat")
    clock.advance(25)
    assert model.check(beat) is None
    model.learned(beat, b"<ok/>")
    clock.advance(25)  # 50 s after the start, 25 s after the heartbeat: still waiting
    model.tick()
    assert model.lifecycle_state("i-1").result == ""
    clock.advance(6)
    model.tick()
    w = model.lifecycle_state("i-1")
    assert (w.result, w.how, w.heartbeats) == ("ABANDON", "timed out", 1)
    assert calls[-1] == {"call": "LifecycleActionTimeout", "group": "g", "hook": "h", "instance_id": "i-1",
                         "result": "ABANDON"}
    assert model.check(lifecycle("CompleteLifecycleAction", LifecycleActionResult="CONTINUE")).code == "ValidationError"


def test_a_launching_hook_is_completed_once_while_pending(world):
    clock, backend, model, _ = world
    complete = lifecycle("CompleteLifecycleAction", hook="launch", LifecycleActionResult="CONTINUE")
    assert model.check(lifecycle("RecordLifecycleActionHeartbeat", hook="launch")) is None
    assert model.check(complete) is None
    model.learned(complete, b"<ok/>")
    assert model.check(complete).code == "ValidationError"
    # the terminating hook still needs Terminating:Wait
    assert model.check(lifecycle("CompleteLifecycleAction", LifecycleActionResult="CONTINUE")).code == "ValidationError"


def test_describe_auto_scaling_instances_shows_terminating_wait(world):
    clock, backend, model, _ = world
    backend.hooks["i-1"] = [("g", "h", 30.0, "CONTINUE")]
    model.begin_termination("i-1")
    body = (b'<DescribeAutoScalingInstancesResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">'
            b"<DescribeAutoScalingInstancesResult><AutoScalingInstances><member><InstanceId>i-1</InstanceId>"
            b"<LifecycleState>InService</LifecycleState></member></AutoScalingInstances>"
            b"</DescribeAutoScalingInstancesResult></DescribeAutoScalingInstancesResponse>")
    out = model.rewrite(Request(AUTOSCALING, "DescribeAutoScalingInstances", {}), body)
    assert b"<LifecycleState>Terminating:Wait</LifecycleState>" in out


def test_settings_from_the_command_line():
    s = settings_from(["attach_seconds=5", "ec2_describe_bucket=10/2", "CreateSnapshot=4/0.5", "lifecycle_wait=false"])
    assert s.attach_seconds == 5.0 and s.ec2_describe_bucket == (10.0, 2.0)
    assert s.buckets["CreateSnapshot"] == (4.0, 0.5) and s.lifecycle_wait is False
    with pytest.raises(ValueError, match="unknown strict setting 'nope'"):
        settings_from(["nope=1"])
    with pytest.raises(ValueError, match="attach_seconds: 'soon' is not a valid value"):
        settings_from(["attach_seconds=soon"])
    for bad in ("attach_seconds=nan", "attach_seconds=-1", "ec2_describe_bucket=10/inf"):
        with pytest.raises(ValueError, match="must be finite and not negative"):
            settings_from([bad])
