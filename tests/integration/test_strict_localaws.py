"""The strict local AWS over real HTTP: boto3 -> WSGI middleware -> moto, time from a fake clock.

The models are tested alone in tests/unit/test_strict_models.py; here: the middleware parses real
boto3 requests, answers errors botocore understands, rewrites moto's XML, keeps S3 untouched, and
the control API and call log work. Plus the agent's side: the drain's snapshot and lifecycle steps
against it, and a restart right after CreateSnapshot finding the snapshot despite the delays.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from agent.clock import FakeClock
from agent.sim.localaws import LocalAWS
from agent.sim.strict import StrictSettings


@pytest.fixture(scope="module")
def strict():
    clock = FakeClock(start=time.time())
    server = LocalAWS(strict=True, settings=StrictSettings(), clock=clock).start()
    server.clock = clock  # type: ignore[attr-defined]
    yield server
    server.stop()


def client(server, service: str, key: str = "testing"):
    return boto3.client(service, endpoint_url=server.url, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key="x", config=BotoConfig(retries={"total_max_attempts": 1}))


@pytest.fixture
def fresh(strict):
    strict.reset()
    strict.strict.settings = StrictSettings()
    return strict


def instance(ec2, az: str = "us-east-1a") -> str:
    return ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                             Placement={"AvailabilityZone": az})["Instances"][0]["InstanceId"]


def code(exc_info) -> str:
    return exc_info.value.response["Error"]["Code"]


def test_volume_life_through_every_state(fresh):
    ec2, clock, s = client(fresh, "ec2"), fresh.clock, fresh.strict.settings
    iid = instance(ec2)
    vid = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1,
                            TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "k", "Value": "v"}]}])["VolumeId"]
    with pytest.raises(ClientError) as info:
        ec2.describe_volumes(VolumeIds=[vid])
    assert code(info) == "InvalidVolume.NotFound"
    with pytest.raises(ClientError) as info:
        ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    assert code(info) == "IncorrectState"
    clock.advance(s.visible_after_seconds)
    [vol] = ec2.describe_volumes(VolumeIds=[vid])["Volumes"]
    assert vol["State"] == "creating" and not vol.get("Tags")
    assert not ec2.describe_volumes(Filters=[{"Name": "tag:k", "Values": ["v"]}])["Volumes"]
    clock.advance(s.volume_create_seconds)
    [vol] = ec2.describe_volumes(Filters=[{"Name": "tag:k", "Values": ["v"]}])["Volumes"]
    assert vol["State"] == "available" and vol["Tags"] == [{"Key": "k", "Value": "v"}]
    assert ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdf")["State"] == "attaching"
    assert ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["Attachments"][0]["State"] == "attaching"
    clock.advance(s.attach_seconds)
    assert ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["Attachments"][0]["State"] == "attached"
    other = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    clock.advance(s.volume_create_seconds)
    with pytest.raises(ClientError) as info:
        ec2.attach_volume(VolumeId=other, InstanceId=iid, Device="/dev/xvdf")
    assert code(info) == "InvalidParameterValue"
    with pytest.raises(ClientError) as info:
        ec2.delete_volume(VolumeId=vid)
    assert code(info) == "VolumeInUse"
    ec2.detach_volume(VolumeId=vid, InstanceId=iid)
    [vol] = ec2.describe_volumes(VolumeIds=[vid])["Volumes"]
    assert vol["State"] == "in-use" and vol["Attachments"][0]["State"] == "detaching"
    clock.advance(s.detach_seconds)
    [vol] = ec2.describe_volumes(VolumeIds=[vid])["Volumes"]
    assert vol["State"] == "available" and not vol["Attachments"]


def test_zone_mismatch(fresh):
    ec2 = client(fresh, "ec2")
    iid = instance(ec2, "us-east-1b")
    vid = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    fresh.clock.advance(10)
    with pytest.raises(ClientError) as info:
        ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    assert code(info) == "InvalidVolume.ZoneMismatch"


def test_snapshot_pending_with_progress_and_the_per_volume_rate(fresh):
    ec2, clock = client(fresh, "ec2"), fresh.clock
    vid = ec2.create_volume(AvailabilityZone="us-east-1a", Size=2)["VolumeId"]
    clock.advance(10)
    snap = ec2.create_snapshot(VolumeId=vid)
    assert snap["State"] == "pending"
    with pytest.raises(ClientError) as info:
        ec2.create_snapshot(VolumeId=vid)
    assert code(info) == "SnapshotCreationPerVolumeRateExceeded"
    with pytest.raises(ClientError) as info:
        ec2.describe_snapshots(SnapshotIds=[snap["SnapshotId"]])
    assert code(info) == "InvalidSnapshot.NotFound"
    # a volume from the pending snapshot is fine
    ec2.create_volume(AvailabilityZone="us-east-1a", SnapshotId=snap["SnapshotId"])
    clock.advance(20)
    [got] = ec2.describe_snapshots(SnapshotIds=[snap["SnapshotId"]])["Snapshots"]
    assert got["State"] == "pending" and 0 < int(got["Progress"].rstrip("%")) < 100
    ec2.create_snapshot(VolumeId=vid)  # 20 s later: allowed
    clock.advance(100)
    assert ec2.describe_snapshots(SnapshotIds=[snap["SnapshotId"]])["Snapshots"][0]["State"] == "completed"


def test_throttling_codes_botocore_understands_and_s3_is_never_throttled(fresh):
    fresh.strict.settings.ec2_describe_bucket = (2.0, 0.001)
    fresh.strict.settings.autoscaling_bucket = (1.0, 0.001)
    ec2, asg, s3 = client(fresh, "ec2"), client(fresh, "autoscaling"), client(fresh, "s3")
    ec2.describe_volumes()
    ec2.describe_volumes()
    with pytest.raises(ClientError) as info:
        ec2.describe_volumes()
    assert code(info) == "RequestLimitExceeded"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    asg.describe_auto_scaling_instances()
    with pytest.raises(ClientError) as info:
        asg.describe_auto_scaling_instances()
    assert code(info) == "Throttling"
    s3.create_bucket(Bucket="strict-bucket")
    for n in range(5):
        s3.put_object(Bucket="strict-bucket", Key=f"k{n}", Body=b"x")


def group_with_hook(fresh, timeout: int = 60):
    ec2, asg = client(fresh, "ec2"), client(fresh, "autoscaling")
    ec2.create_launch_template(LaunchTemplateName="tpl-strict", LaunchTemplateData={"ImageId": "ami-12345678"})
    asg.create_auto_scaling_group(AutoScalingGroupName="g", LaunchTemplate={"LaunchTemplateName": "tpl-strict"},
                                  MinSize=1, MaxSize=1, DesiredCapacity=1, AvailabilityZones=["us-east-1a"])
    asg.put_lifecycle_hook(AutoScalingGroupName="g", LifecycleHookName="h", HeartbeatTimeout=timeout,
                           LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING", DefaultResult="ABANDON")
    iid = asg.describe_auto_scaling_groups()["AutoScalingGroups"][0]["Instances"][0]["InstanceId"]
    return asg, iid


def test_lifecycle_action_only_while_terminating_wait_through_the_control_api(fresh):
    from agent.sim.localaws import lifecycle_calls

    asg, iid = group_with_hook(fresh)
    args = dict(AutoScalingGroupName="g", LifecycleHookName="h", InstanceId=iid)
    with pytest.raises(ClientError) as info:
        asg.complete_lifecycle_action(LifecycleActionResult="CONTINUE", **args)
    assert "No active Lifecycle Action" in str(info.value)
    with urllib.request.urlopen(f"{fresh.url}/_spot-agent/terminate?instance_id={iid}", data=b"") as resp:
        assert json.load(resp) == {"hooks": ["g/h"]}
    state = asg.describe_auto_scaling_instances(InstanceIds=[iid])["AutoScalingInstances"][0]["LifecycleState"]
    assert state == "Terminating:Wait"
    asg.record_lifecycle_action_heartbeat(**args)
    asg.complete_lifecycle_action(LifecycleActionResult="CONTINUE", **args)
    assert [c["call"] for c in lifecycle_calls()] == ["RecordLifecycleActionHeartbeat", "CompleteLifecycleAction"]
    with urllib.request.urlopen(f"{fresh.url}/_spot-agent/calls?caller=testing") as resp:
        calls = json.load(resp)
    assert [c["action"] for c in calls if c["action"] == "CompleteLifecycleAction"] == ["CompleteLifecycleAction"] * 2
    assert [c["code"] for c in calls if c["action"] == "CompleteLifecycleAction"] == ["ValidationError", ""]


def test_the_hook_times_out_to_its_default_result(fresh):
    from agent.sim.localaws import lifecycle_calls

    asg, iid = group_with_hook(fresh, timeout=30)
    fresh.begin_termination(iid)
    fresh.clock.advance(31)
    fresh.strict.tick()
    assert lifecycle_calls("LifecycleActionTimeout")[-1]["result"] == "ABANDON"
    with pytest.raises(ClientError):
        asg.complete_lifecycle_action(AutoScalingGroupName="g", LifecycleHookName="h", InstanceId=iid,
                                      LifecycleActionResult="CONTINUE")


def test_calls_are_logged_per_access_key(fresh):
    client(fresh, "ec2", key="agent-1").describe_volumes()
    client(fresh, "ec2", key="agent-2").describe_snapshots(OwnerIds=["self"])
    assert [c["action"] for c in fresh.strict.calls_by("agent-1")] == ["DescribeVolumes"]
    assert [c["action"] for c in fresh.strict.calls_by("agent-2")] == ["DescribeSnapshots"]


@pytest.mark.root
def test_the_block_device_appears_only_once_attached(tmp_path):
    """Real loop devices and the real clock (the device shows up on a timer): attach_seconds=1."""
    from agent.sim.blockdevs import LocalBlockDevices

    if os.geteuid() != 0:
        pytest.fail("needs root for loop devices")
    server = LocalAWS(strict=True, settings=StrictSettings.fast(attach_seconds=1.0)).start()
    sim = LocalBlockDevices(str(tmp_path / "ebs"), str(tmp_path / "dev"), str(tmp_path / "sys"), size_cap=64 << 20).install()
    try:
        ec2 = client(server, "ec2")
        iid = instance(ec2)
        vid = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
        end = time.monotonic() + 10
        while True:
            try:
                ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
                break
            except ClientError as exc:
                assert exc.response["Error"]["Code"] in ("IncorrectState", "InvalidVolume.NotFound")
                assert time.monotonic() < end
                time.sleep(0.1)
        assert sim.loop_device(vid) is None  # attaching: no device yet
        end = time.monotonic() + 5
        while sim.loop_device(vid) is None and time.monotonic() < end:
            time.sleep(0.05)
        assert sim.loop_device(vid) is not None
        assert ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["Attachments"][0]["State"] == "attached"
        ec2.detach_volume(VolumeId=vid, InstanceId=iid)
        assert sim.loop_device(vid) is None
    finally:
        sim.cleanup()
        server.stop()


def test_a_launching_hook_is_accepted_once_per_instance(fresh):
    asg, iid = group_with_hook(fresh)
    asg.put_lifecycle_hook(AutoScalingGroupName="g", LifecycleHookName="launch", HeartbeatTimeout=60,
                           LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING", DefaultResult="ABANDON")
    args = dict(AutoScalingGroupName="g", LifecycleHookName="launch", InstanceId=iid)
    asg.record_lifecycle_action_heartbeat(**args)
    asg.complete_lifecycle_action(LifecycleActionResult="CONTINUE", **args)
    with pytest.raises(ClientError) as info:
        asg.complete_lifecycle_action(LifecycleActionResult="CONTINUE", **args)
    assert "No active Lifecycle Action" in str(info.value)
