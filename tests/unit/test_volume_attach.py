"""Pure choices on the EC2 side: device names, tagged volumes, latest snapshot, tokens."""

import datetime as dt

import pytest

from agent.volumes.attach import AttachError, choose_latest_snapshot, choose_tagged_volume, client_token, pick_device_name

ME = "i-0aaaaaaaaaaaaaaaa"


def test_pick_device_name_skips_both_spellings():
    assert pick_device_name(["/dev/sda1"]) == "/dev/sdf"
    assert pick_device_name(["/dev/xvda", "/dev/sdf", "/dev/xvdg"]) == "/dev/sdh"
    assert pick_device_name([], "/dev/sdk") == "/dev/sdk"
    assert pick_device_name(["/dev/xvdk"], "/dev/sdk") == "/dev/sdf"
    with pytest.raises(AttachError):
        pick_device_name([f"/dev/sd{c}" for c in "fghijklmnop"])


def _vol(vid, state="available", az="us-east-1a", attached_to=None, created="2024-01-01", multi=False):
    v = {"VolumeId": vid, "State": state, "AvailabilityZone": az, "CreateTime": created, "Attachments": [],
         "MultiAttachEnabled": multi}
    if attached_to:
        v["Attachments"] = [{"InstanceId": attached_to, "State": "attached", "Device": "/dev/sdf"}]
    return v


def test_tagged_volume_prefers_ours_then_oldest_available_here_and_ignores_in_use():
    vols = [_vol("vol-3", "in-use", attached_to="i-other"), _vol("vol-2", created="2024-02-01"), _vol("vol-1", created="2024-03-01")]
    c = choose_tagged_volume(vols, "us-east-1a", ME)
    assert c.volume["VolumeId"] == "vol-2" and "vol-3 (in-use by i-other)" in c.ignored
    vols.append(_vol("vol-9", "in-use", attached_to=ME))
    assert choose_tagged_volume(vols, "us-east-1a", ME).volume["VolumeId"] == "vol-9"


def test_tagged_volume_only_in_another_az():
    c = choose_tagged_volume([_vol("vol-1", az="us-east-1b")], "us-east-1a", ME)
    assert c.volume is None and c.other_az["VolumeId"] == "vol-1"


def test_only_in_use_volumes_means_none():
    c = choose_tagged_volume([_vol("vol-3", "in-use", attached_to="i-other")], "us-east-1a", ME)
    assert c.volume is None and c.other_az is None and c.ignored


def test_multi_attach_may_share_an_in_use_volume():
    v = _vol("vol-3", "in-use", attached_to="i-other", multi=True)
    assert choose_tagged_volume([v], "us-east-1a", ME, multi_attach=True).volume["VolumeId"] == "vol-3"
    assert choose_tagged_volume([v], "us-east-1a", ME, multi_attach=False).volume is None


def test_latest_snapshot_is_the_newest_completed():
    t = dt.datetime(2024, 1, 1)
    snaps = [
        {"SnapshotId": "snap-1", "State": "completed", "StartTime": t},
        {"SnapshotId": "snap-2", "State": "completed", "StartTime": t + dt.timedelta(hours=2)},
        {"SnapshotId": "snap-3", "State": "pending", "StartTime": t + dt.timedelta(hours=3)},
        {"SnapshotId": "snap-4", "State": "error", "StartTime": t + dt.timedelta(hours=4)},
    ]
    assert choose_latest_snapshot(snaps)["SnapshotId"] == "snap-2"
    assert choose_latest_snapshot(snaps[2:]) is None


def test_client_token_is_deterministic_and_short_enough():
    a = client_token("i-1", "ckpt", "snap-1")
    assert a == client_token("i-1", "ckpt", "snap-1") and a != client_token("i-1", "ckpt", "snap-2")
    assert len(a) <= 64
