"""Volume waits (agent.volumes.attach) against the strict local AWS, over HTTP, on one fake clock shared
by the server and the waits: a wait's sleep moves EC2's time too, so the whole state machine runs in
milliseconds and deterministically."""

from __future__ import annotations

import time

import boto3
import pytest
from botocore.config import Config as BotoConfig

from agent.clock import FakeClock
from agent.sim.localaws import LocalAWS
from agent.sim.strict import StrictSettings
from agent.volumes import attach as A


@pytest.fixture(scope="module")
def server():
    clock = FakeClock(start=time.time())
    s = LocalAWS(strict=True, settings=StrictSettings(), clock=clock).start()
    s.clock = clock  # type: ignore[attr-defined]
    yield s
    s.stop()


@pytest.fixture
def ec2(server):
    server.reset()
    server.strict.settings = StrictSettings()
    return boto3.client("ec2", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="waits",
                        aws_secret_access_key="x", config=BotoConfig(retries={"total_max_attempts": 1}))


def instance(ec2) -> str:
    return ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                             Placement={"AvailabilityZone": "us-east-1a"})["Instances"][0]["InstanceId"]


def codes(server, action):
    return [c["code"] for c in server.strict.calls_by("waits") if c["action"] == action]


def test_create_attach_detach_each_wait_follows_the_states(server, ec2):
    clock = server.clock
    iid = instance(ec2)
    vid = A.create_volume(ec2, "us-east-1a", A.client_token("i", "v"), {"k": "v"}, size_gib=1)
    vol = A.wait_available(ec2, vid, clock, timeout=60)
    assert vol["State"] == "available"
    assert "InvalidVolume.NotFound" in codes(server, "DescribeVolumes")  # "not yet", not "gone"
    A.attach(ec2, vid, iid, "/dev/sdf", clock=clock)
    assert A.wait_attached(ec2, vid, iid, clock, timeout=60) == "/dev/sdf"
    assert A.detach(ec2, vid, iid, clock, timeout=60) is True
    assert ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["State"] == "available"


def test_attach_right_after_create_is_retried_through_incorrect_state(server, ec2):
    clock = server.clock
    iid = instance(ec2)
    vid = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    A.attach(ec2, vid, iid, "/dev/sdf", clock=clock, timeout=30)
    assert codes(server, "AttachVolume")[0] == "IncorrectState" and codes(server, "AttachVolume")[-1] == ""


def test_a_final_refusal_is_not_retried(server, ec2):
    clock = server.clock
    iid = instance(ec2)
    vid = ec2.create_volume(AvailabilityZone="us-east-1b", Size=1)["VolumeId"]
    clock.advance(10)
    with pytest.raises(Exception, match="ZoneMismatch"):
        A.attach(ec2, vid, iid, "/dev/sdf", clock=clock)
    assert codes(server, "AttachVolume") == ["InvalidVolume.ZoneMismatch"]


def test_a_timeout_names_the_state_last_seen(server, ec2):
    server.strict.settings.volume_create_seconds = 1000.0
    vid = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    with pytest.raises(A.AttachError, match=r"timed out after 20s waiting for volume .* available; last seen 'creating'"):
        A.wait_available(ec2, vid, server.clock, timeout=20)


def test_notfound_for_longer_than_the_grace_is_gone(server, ec2):
    server.strict.settings.visible_after_seconds = 1000.0
    vid = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    t0 = server.clock.monotonic()
    with pytest.raises(A.NotVisible, match="does not exist"):
        A.wait_available(ec2, vid, server.clock, timeout=60)
    assert A.NOT_FOUND_GRACE <= server.clock.monotonic() - t0 < 60
