"""`spot-agent gc` as a separate process against moto over HTTP: dry run first, then --delete."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

from agent.volumes import tags as T


def _config(root: str, url: str, extra: str = "") -> str:
    path = os.path.join(root, "agent.toml")
    with open(path, "w") as fh:
        fh.write(f'[agent]\nstate_dir = "{root}/state"\n[aws]\nregion = "us-east-1"\nendpoint_url = "{url}"\n'
                 f'[drain]\nkeep_snapshots = 2\n{extra}')
    os.chmod(path, 0o600)
    return path


def _gc(config: str, *args: str):
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true")
    res = subprocess.run([sys.executable, "-m", "agent", "gc", "--config", config, *args], capture_output=True,
                         text=True, env=env, timeout=120)
    return res


def _spec(kind, tags):
    return [{"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def test_gc_reports_then_deletes_only_ours_and_keeps_the_newest_snapshot(aws, scratch_dir, blockdevs):
    ec2 = aws.ec2
    az = "us-east-1a"
    live = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    untagged_vol = ec2.create_volume(AvailabilityZone=az, Size=1)["VolumeId"]
    foreign_vol = ec2.create_volume(AvailabilityZone=az, Size=1, TagSpecifications=_spec("volume", {"Name": "x"}))["VolumeId"]
    orphan = ec2.create_volume(AvailabilityZone=az, Size=1,
                               TagSpecifications=_spec("volume", T.ownership("i-0deadbeef0000000", "scratch")))["VolumeId"]
    alive = ec2.create_volume(AvailabilityZone=az, Size=1, TagSpecifications=_spec("volume", T.ownership(live, "scratch")))["VolumeId"]
    persistent = ec2.create_volume(AvailabilityZone=az, Size=1, TagSpecifications=_spec(
        "volume", dict(T.ownership("i-0deadbeef0000000", "data", "persistent"), Name="train")))["VolumeId"]
    src = ec2.create_volume(AvailabilityZone=az, Size=1)["VolumeId"]
    untagged_snap = ec2.create_snapshot(VolumeId=src)["SnapshotId"]
    base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    ckpts = []
    for i in range(4):  # the drain's tags: spot-agent:volume names the [[volumes]] entry
        sid = ec2.create_snapshot(VolumeId=src, TagSpecifications=_spec("snapshot", {
            T.MANAGED: "true", T.DRAIN_VOLUME: "ckpt", T.INSTANCE_ID: "i-0deadbeef0000000"}))["SnapshotId"]
        blockdevs.set_snapshot(sid, start_time=base + dt.timedelta(days=i))
        ckpts.append(sid)
    blockdevs.set_snapshot(ckpts[3], state="pending")  # the newest is still in flight
    blockdevs.set_snapshot(untagged_snap, start_time=base - dt.timedelta(days=900))

    config = _config(scratch_dir, aws.url)
    dry = _gc(config, "--json", "--max-age-days", "1")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] and doc["deleted"] == []
    plan = {i["id"]: i["action"] for i in doc["items"]}
    assert plan == {orphan: "delete", alive: "keep", persistent: "keep",
                    ckpts[3]: "keep", ckpts[2]: "keep", ckpts[1]: "delete", ckpts[0]: "delete"}
    assert untagged_vol not in plan and foreign_vol not in plan and untagged_snap not in plan
    vols_before = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    assert orphan in vols_before  # a dry run deletes nothing

    text = _gc(config)
    assert text.returncode == 0 and "would delete volume " + orphan in text.stdout and "dry run" in text.stdout

    wet = _gc(config, "--delete", "--json", "--max-age-days", "1")
    assert wet.returncode == 0, wet.stderr
    assert sorted(d["id"] for d in json.loads(wet.stdout)["deleted"] if d["deleted"]) == sorted([orphan, ckpts[0], ckpts[1]])
    vols = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    snaps = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert vols == vols_before - {orphan}
    assert {untagged_snap, ckpts[2], ckpts[3]} <= snaps and not {ckpts[0], ckpts[1]} & snaps

    # Again with everything old: the newest completed snapshot of "ckpt" still stays.
    again = json.loads(_gc(config, "--delete", "--json", "--keep", "1", "--max-age-days", "0.001").stdout)
    assert [d["id"] for d in again["deleted"]] == []
    assert {i["id"]: i["action"] for i in again["items"] if i["kind"] == "snapshot"} == {ckpts[2]: "keep", ckpts[3]: "keep"}


def test_gc_keeps_volumes_the_config_still_uses(aws, scratch_dir):
    ec2 = aws.ec2
    named = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1, TagSpecifications=_spec(
        "volume", T.ownership("i-0deadbeef0000000", "data")))["VolumeId"]
    config = _config(scratch_dir, aws.url, f'[[volumes]]\nname = "data"\nmount = "/mnt/data"\nvolume_id = "{named}"\n')
    doc = json.loads(_gc(config, "--json").stdout)
    assert [(i["id"], i["action"]) for i in doc["items"]] == [(named, "keep")]
    assert "volume_id in the config" in doc["items"][0]["reason"]
