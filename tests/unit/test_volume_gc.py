"""gc's decisions, pure: ownership tags first, the newest completed snapshot always survives."""

import datetime as dt

from agent.volumes import tags as T
from agent.volumes.gc import Retention, plan

NOW = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)


def _tags(d):
    return [{"Key": k, "Value": v} for k, v in d.items()]


def vol(vid, owner="i-gone", state="available", managed=True, **extra):
    tags = dict(T.ownership(owner, "data")) if managed else {"Name": "someone-elses"}
    tags.update(extra)
    return {"VolumeId": vid, "State": state, "Size": 1, "Tags": _tags(tags), "CreateTime": NOW}


def snap(sid, days_ago, name="ckpt", state="completed", managed=True, owner="i-gone", key=T.VOLUME_NAME, **extra):
    tags = {T.MANAGED: "true", key: name, T.INSTANCE_ID: owner} if managed else {"Name": name}
    tags.update(extra)
    return {"SnapshotId": sid, "State": state, "VolumeId": "vol-x", "VolumeSize": 1, "Tags": _tags(tags),
            "StartTime": NOW - dt.timedelta(days=days_ago)}


def actions(items):
    return {i.id: i.action for i in items}


def test_untagged_resources_are_never_considered():
    items = plan([vol("vol-u", managed=False)], [snap("snap-u", 100, managed=False)], set(), Retention(1, 1), NOW)
    assert items == []


def test_available_volume_of_a_gone_instance_is_an_orphan_and_others_are_kept():
    items = plan([vol("vol-1"), vol("vol-2", owner="i-live"), vol("vol-3", state="in-use"),
                  vol("vol-4", **{T.PURPOSE: "persistent"}), vol("vol-5"), vol("vol-6", Name="train")],
                 [], {"i-live"}, Retention(), NOW, protected_volume_ids={"vol-5"}, protected_tag_sets=[{"Name": "train"}])
    assert actions(items) == {"vol-1": "delete", "vol-2": "keep", "vol-3": "keep", "vol-4": "keep", "vol-5": "keep",
                              "vol-6": "keep"}
    assert "owner i-gone is gone" in items[0].reason


def test_newest_completed_snapshot_is_kept_even_when_old_and_instance_gone():
    items = plan([], [snap("snap-old", 400), snap("snap-pending", 1, state="pending"), snap("snap-err", 0, state="error")],
                 set(), Retention(keep_last=1, max_age_days=30), NOW)
    assert actions(items) == {"snap-old": "keep", "snap-pending": "keep", "snap-err": "delete"}
    assert "newest completed snapshot of ckpt" in next(i.reason for i in items if i.id == "snap-old")


def test_keep_last_and_max_age_per_volume_name():
    snaps = [snap(f"snap-a{i}", i) for i in range(5)] + [snap("snap-b0", 50, name="other"), snap("snap-b1", 60, name="other")]
    items = plan([], snaps, set(), Retention(keep_last=3), NOW)
    assert actions(items) == {"snap-a0": "keep", "snap-a1": "keep", "snap-a2": "keep", "snap-a3": "delete",
                              "snap-a4": "delete", "snap-b0": "keep", "snap-b1": "keep"}
    items = plan([], snaps, set(), Retention(keep_last=10, max_age_days=2.5), NOW)
    assert actions(items) == {"snap-a0": "keep", "snap-a1": "keep", "snap-a2": "keep", "snap-a3": "delete",
                              "snap-a4": "delete", "snap-b0": "keep", "snap-b1": "delete"}


def test_drain_snapshots_group_by_their_volume_tag():
    snaps = [snap("snap-1", 1, key=T.DRAIN_VOLUME), snap("snap-2", 2, key=T.DRAIN_VOLUME)]
    items = plan([], snaps, set(), Retention(keep_last=1), NOW)
    assert actions(items) == {"snap-1": "keep", "snap-2": "delete"}
    assert items[0].volume_name == "ckpt"


def test_across_az_intermediate_snapshot_goes_once_its_instance_is_gone_unless_newest():
    snaps = [snap("snap-c1", 1), snap("snap-copy", 2, **{T.PURPOSE: "copy-across-az"})]
    assert actions(plan([], snaps, set(), Retention(), NOW)) == {"snap-c1": "keep", "snap-copy": "delete"}
    assert actions(plan([], snaps, {"i-gone"}, Retention(), NOW)) == {"snap-c1": "keep", "snap-copy": "keep"}
    assert actions(plan([], snaps[1:], set(), Retention(), NOW)) == {"snap-copy": "keep"}
