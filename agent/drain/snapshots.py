"""EBS snapshots of checkpoint volumes: tags, find-before-create, and retention.

CreateSnapshot has no idempotency token, so a drain that crashed after requesting a snapshot would take
a second one on restart. Each snapshot therefore carries a notice tag (a digest of instance id and
notice key), and the drain looks for a snapshot with that tag before creating one.

Tags (all on every snapshot we create):
  spot-agent:managed = "true"      retention only ever deletes snapshots carrying it
  spot-agent:volume                the [[volumes]] name (retention groups by it; volumes'
                                   latest_snapshot can select by it)
  spot-agent:volume-name           the same, under the key the volumes side and gc use
  spot-agent:purpose = "checkpoint"
  spot-agent:instance-id, spot-agent:run, spot-agent:notice-kind, spot-agent:notice-time,
  spot-agent:notice-key            which notice took it
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

log = logging.getLogger(__name__)

MANAGED = "spot-agent:managed"
TAG_VOLUME = "spot-agent:volume"
TAG_INSTANCE = "spot-agent:instance-id"
TAG_RUN = "spot-agent:run"
TAG_KIND = "spot-agent:notice-kind"
TAG_TIME = "spot-agent:notice-time"
TAG_NOTICE = "spot-agent:notice-key"
TAG_VOLUME_NAME = "spot-agent:volume-name"  # the volumes side's name key (agent.volumes.tags), for gc
TAG_PURPOSE = "spot-agent:purpose"


def notice_tag(instance_id: str, key: str, boot: str = "") -> str:
    """A filter-safe value (no wildcards) naming one notice on one instance in one boot: a stopped
    and started instance sees the same notice key again, and its resumed drain must never adopt the
    previous boot's snapshot."""
    text = f"{instance_id}\0{key}" + (f"\0{boot}" if boot else "")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def snapshot_tags(instance_id: str, volume: str, run: str, kind: str, notice_time: float, key: str,
                  boot: str = "") -> Dict[str, str]:
    return {
        MANAGED: "true",
        TAG_VOLUME: volume,
        TAG_VOLUME_NAME: volume,
        TAG_PURPOSE: "checkpoint",
        TAG_INSTANCE: instance_id,
        TAG_RUN: run or instance_id,
        TAG_KIND: kind,
        TAG_TIME: _dt.datetime.fromtimestamp(notice_time, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        TAG_NOTICE: notice_tag(instance_id, key, boot),
        "Name": f"{run or instance_id}/{volume}",
    }


# EC2 accepts one CreateSnapshot per volume every 15 s (SnapshotCreationPerVolumeRateExceeded otherwise).
SNAPSHOT_SPACING = 15.0
# What a snapshot needs after its wait: sync, freeze, the call, thaw (seconds, generous).
SNAPSHOT_CALL_SECONDS = 2.0
# A restart looks for the snapshot an interrupted attempt may have requested this long at most: EC2 shows
# a new snapshot (and its tags) to describe calls only after a few seconds.
FIND_WAIT = 8.0
SPACING_SLACK = 0.3  # EC2's clock and ours: ask a little after the 15 s, not at the edge


@dataclass(frozen=True)
class Spacing:
    """What the drain does about EC2's per-volume snapshot rate: wait ``wait`` seconds first, or skip
    (``skip``: the snapshot cannot be taken in time; ``reason`` says so)."""

    wait: float
    skip: bool = False
    reason: str = ""


def plan_spacing(volume: str, last_requested: Optional[float], now: float, budget: float, s3_follows: bool,
                 spacing: float = SNAPSHOT_SPACING, call_seconds: float = SNAPSHOT_CALL_SECONDS) -> Spacing:
    """Pure. ``last_requested``: epoch of the last CreateSnapshot of this volume (None: none known).

    Within ``spacing`` of the last one, wait out the rest when that and the call fit in ``budget``; when
    they do not and an S3 upload follows, skip the snapshot (the upload carries the checkpoint); with
    nothing else to persist, try anyway once the wait is over, as far as the budget goes.
    """
    if last_requested is None:
        return Spacing(0.0)
    age = now - last_requested
    if age < 0 or age >= spacing:
        return Spacing(0.0)
    wait = spacing - age + SPACING_SLACK
    if wait + call_seconds <= budget:
        return Spacing(wait, reason=f"waited {wait:.1f} s: EC2 allows one snapshot of a volume per {spacing:g} s "
                                    f"and the last of {volume} was {age:.1f} s before")
    why = (f"the last snapshot of {volume} was {age:.1f} s before and EC2 allows one per {spacing:g} s: "
           f"{wait:.1f} s to wait, {budget:.1f} s of budget")
    if s3_follows:
        return Spacing(0.0, skip=True, reason=f"{volume}: snapshot skipped, {why}; the S3 upload carries the checkpoint")
    return Spacing(max(0.0, budget - call_seconds), reason=f"{volume}: {why}; no S3 checkpoint either, so trying anyway")


def find_existing_waiting(ec2: Any, volume_id: str, notice: str, seconds: float, clock: Any,
                          interval: float = 0.5) -> Optional[str]:
    """:func:`find_existing`, asked again for up to ``seconds``: a snapshot requested just before a crash
    may not be visible (or not tagged yet) to describe calls for a moment. None when none shows up."""
    end = clock.monotonic() + max(0.0, seconds)
    while True:
        found = find_existing(ec2, volume_id, notice)
        if found or clock.monotonic() + interval >= end:
            return found
        clock.sleep(interval)


def _tag_spec(tags: Dict[str, str]) -> List[Dict[str, Any]]:
    return [{"ResourceType": "snapshot", "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())]}]


def find_existing(ec2: Any, volume_id: str, notice: str) -> Optional[str]:
    """The snapshot of ``volume_id`` an earlier attempt at this notice already requested, if any."""
    resp = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "volume-id", "Values": [volume_id]},
        {"Name": f"tag:{TAG_NOTICE}", "Values": [notice]},
        {"Name": f"tag:{MANAGED}", "Values": ["true"]},
    ])
    snaps = [s for s in resp.get("Snapshots", []) if s.get("State") != "error"]
    if not snaps:
        return None
    snaps.sort(key=lambda s: str(s.get("StartTime", "")))
    return snaps[-1]["SnapshotId"]


def create_snapshot(ec2: Any, volume_id: str, tags: Dict[str, str], description: str) -> str:
    resp = ec2.create_snapshot(VolumeId=volume_id, Description=description[:255], TagSpecifications=_tag_spec(tags))
    return resp["SnapshotId"]


def create_snapshots(ec2: Any, instance_id: str, volume_ids: List[str], exclude: List[str],
                     tags: Dict[str, str], description: str) -> Dict[str, str]:
    """One crash-consistent CreateSnapshots across ``volume_ids`` (the boot volume and ``exclude`` left
    out). Returns volume id -> snapshot id. Per-volume tags (the volume name) are added after thaw."""
    spec: Dict[str, Any] = {"InstanceId": instance_id, "ExcludeBootVolume": True}
    if exclude:
        spec["ExcludeDataVolumeIds"] = list(exclude)
    resp = ec2.create_snapshots(InstanceSpecification=spec, Description=description[:255],
                                TagSpecifications=_tag_spec(tags))
    out: Dict[str, str] = {}
    for snap in resp.get("Snapshots", []):
        if snap.get("VolumeId") in volume_ids:
            out[snap["VolumeId"]] = snap["SnapshotId"]
    return out


def attached_volume_ids(ec2: Any, instance_id: str) -> List[str]:
    resp = ec2.describe_instances(InstanceIds=[instance_id])
    out: List[str] = []
    for res in resp.get("Reservations", []):
        for inst in res.get("Instances", []):
            for bdm in inst.get("BlockDeviceMappings", []):
                vid = (bdm.get("Ebs") or {}).get("VolumeId")
                if vid:
                    out.append(vid)
    return out


def tag(ec2: Any, snapshot_ids: List[str], tags: Dict[str, str]) -> None:
    if snapshot_ids:
        ec2.create_tags(Resources=list(snapshot_ids), Tags=[{"Key": k, "Value": v} for k, v in sorted(tags.items())])


def choose_deletions(snapshots: List[Dict[str, Any]], keep: int) -> List[str]:
    """Which of one volume name's snapshots retention deletes. Pure.

    Keeps the newest ``keep`` by start time, and always the newest *completed* one (if the newest are
    all still pending or failed, the last good one must survive). Only snapshots tagged
    ``spot-agent:managed = true`` are ever candidates; pending ones are left for next time.
    """
    ours = [s for s in snapshots if _tags(s).get(MANAGED) == "true"]
    ours.sort(key=lambda s: str(s.get("StartTime", "")), reverse=True)
    kept = {s["SnapshotId"] for s in ours[:max(1, keep)]}
    completed = [s for s in ours if s.get("State") == "completed"]
    if completed:
        kept.add(completed[0]["SnapshotId"])
    return [s["SnapshotId"] for s in ours
            if s["SnapshotId"] not in kept and s.get("State") in ("completed", "error")]


def apply_retention(ec2: Any, volume: str, keep: int, run: str = "") -> List[str]:
    """Delete our snapshots of ``volume`` beyond the newest ``keep``; returns the deleted ids.

    ``run``: only that run's (``spot-agent:run``). A fleet shares one config, so every instance names its
    volume the same: without the run, each instance's retention would age out the others' snapshots."""
    filters = [{"Name": f"tag:{MANAGED}", "Values": ["true"]}, {"Name": f"tag:{TAG_VOLUME}", "Values": [volume]}]
    if run:
        filters.append({"Name": f"tag:{TAG_RUN}", "Values": [run]})
    resp = ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)
    snaps = [s for s in resp.get("Snapshots", []) if _tags(s).get(TAG_VOLUME) == volume
             and (not run or _tags(s).get(TAG_RUN) == run)]
    deleted = []
    for snap_id in choose_deletions(snaps, keep):
        try:
            ec2.delete_snapshot(SnapshotId=snap_id)
            deleted.append(snap_id)
        except Exception as exc:  # noqa: BLE001 - e.g. in use by an AMI: keep going, report it
            log.warning("retention: could not delete %s of %s: %s", snap_id, volume, exc)
    return deleted


def _tags(snap: Dict[str, Any]) -> Dict[str, str]:
    return {t["Key"]: t["Value"] for t in snap.get("Tags", []) or []}
