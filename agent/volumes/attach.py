"""EC2 side of a volume: find or create it, attach it to this instance, wait, detach.

Choosing (which tagged volume, which snapshot, which device name) is pure and tested without AWS; the
calls are thin. Idempotency across restarts: CreateVolume gets a ClientToken derived from what is
being created, and before creating anything we look for a volume we already made (ownership tags).

Waits follow EC2's state machine: a volume is ``creating`` then ``available``, an attachment
``attaching`` then ``attached``, a detach ``detaching`` then gone. A resource just created may be
``NotFound`` to describe calls for a few seconds (eventual consistency): within
:data:`NOT_FOUND_GRACE` of the wait's start that is "not yet", after it the resource is gone. Calls
refused for throttling or a passing state (``IncorrectState``) are retried until the wait's deadline.
A timeout says which state the resource was last seen in.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from agent.clock import SYSTEM_CLOCK, Clock
from agent.volumes import tags as T

DEVICE_LETTERS = string.ascii_lowercase[5:16]  # f..p, the range AWS recommends for EBS


class AttachError(RuntimeError):
    pass


class NotVisible(AttachError):
    """Describe said NotFound: gone, or too new for EC2 to show yet."""


# How long a resource just created (or attached) may be NotFound to describe calls before we believe it.
NOT_FOUND_GRACE = 15.0


def delays(initial: float = 0.2, factor: float = 2.0, cap: float = 5.0) -> Iterable[float]:
    d = initial
    while True:
        yield d
        d = min(cap, d * factor)


def wait_until(check: Callable[[], Optional[Any]], what: str, timeout: float, clock: Clock = SYSTEM_CLOCK,
               initial: float = 0.2, cap: float = 5.0, not_found_grace: float = 0.0,
               seen: Optional[Callable[[], str]] = None) -> Any:
    """Poll ``check`` with exponential backoff until it returns something truthy, or raise.

    :class:`NotVisible` from ``check`` is retried for ``not_found_grace`` seconds (eventual consistency),
    other :class:`AttachError` ends the wait at once. ``seen()`` describes the last state observed, for
    the timeout's message."""
    started = clock.monotonic()
    deadline = started + timeout
    last_error = ""
    for d in delays(initial, cap=cap):
        try:
            value = check()
            if value:
                return value
        except NotVisible as exc:
            if clock.monotonic() - started >= not_found_grace:
                raise
            last_error = f" (last error: {exc})"
        except AttachError:
            raise
        except Exception as exc:  # noqa: BLE001 - transient API errors are retried until the deadline
            last_error = f" (last error: {exc})"
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            state = seen() if seen is not None else ""
            raise AttachError(f"timed out after {timeout:g}s waiting for {what}"
                              + (f"; last seen {state}" if state else "") + last_error)
        clock.sleep(min(d, remaining))
    raise AssertionError("unreachable")


def call_retrying(fn: Callable[[], Any], what: str, timeout: float, clock: Clock = SYSTEM_CLOCK,
                  idempotent: bool = True) -> Any:
    """``fn`` retried through throttling and passing states (IncorrectState) for up to ``timeout``;
    ``idempotent`` False: ambiguous failures (5xx, connection) are not retried."""
    from agent.aws import retry_after
    from agent.backoff import OutOfTime, retry_until

    try:
        return retry_until(fn, deadline=clock.monotonic() + timeout, retry_after=lambda e: retry_after(e, idempotent),
                           what=what, clock=clock)
    except OutOfTime as exc:
        raise AttachError(str(exc)) from None


def client_token(*parts: str) -> str:
    """Deterministic per (instance, volume name, source): a retry after a crash creates nothing new."""
    return "spot-agent-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:48]


def pick_device_name(used: Iterable[str], preferred: str = "") -> str:
    """First free /dev/sd[f-p]; a name counts as used in its sdX and xvdX spellings."""
    taken = set()
    for name in used:
        base = name.rsplit("/", 1)[-1]
        for prefix in ("xvd", "sd"):
            if base.startswith(prefix):
                taken.add(base[len(prefix):])
                break
        else:
            taken.add(base)
    if preferred:
        letter = preferred.rsplit("/", 1)[-1]
        for prefix in ("xvd", "sd"):
            if letter.startswith(prefix):
                letter = letter[len(prefix):]
                break
        if letter not in taken:
            return preferred
    for letter in DEVICE_LETTERS:
        if letter not in taken:
            return f"/dev/sd{letter}"
    raise AttachError("no free device name in /dev/sdf../dev/sdp on this instance")


def attachment_to(volume: Dict[str, Any], instance_id: str) -> Optional[Dict[str, Any]]:
    for att in volume.get("Attachments") or []:
        if att.get("InstanceId") == instance_id and att.get("State") in ("attaching", "attached"):
            return att
    return None


def others_attached(volume: Dict[str, Any], instance_id: str) -> List[str]:
    return [a["InstanceId"] for a in volume.get("Attachments") or []
            if a.get("InstanceId") != instance_id and a.get("State") in ("attaching", "attached", "busy")]


@dataclass(frozen=True)
class TagChoice:
    volume: Optional[Dict[str, Any]]
    other_az: Optional[Dict[str, Any]]  # a match outside our AZ, when nothing here matched
    ignored: Tuple[str, ...] = ()  # "vol-1 (in-use by i-2)", for the error message


def choose_tagged_volume(volumes: List[Dict[str, Any]], az: str, instance_id: str, multi_attach: bool = False) -> TagChoice:
    """Ours already (attached to this instance) first, then the oldest available one in our AZ."""
    ignored = []
    mine = [v for v in volumes if attachment_to(v, instance_id)]
    if mine:
        return TagChoice(sorted(mine, key=lambda v: v["VolumeId"])[0], None)
    usable = []
    for v in volumes:
        state = v.get("State")
        if state == "available":
            usable.append(v)
        elif state == "in-use" and multi_attach and v.get("MultiAttachEnabled"):
            usable.append(v)
        else:
            who = ", ".join(others_attached(v, instance_id)) or state
            ignored.append(f"{v['VolumeId']} ({state} by {who})" if state == "in-use" else f"{v['VolumeId']} ({state})")
    key = lambda v: (str(v.get("CreateTime", "")), v["VolumeId"])  # noqa: E731
    here = sorted((v for v in usable if v.get("AvailabilityZone") == az), key=key)
    if here:
        return TagChoice(here[0], None, tuple(ignored))
    there = sorted(usable, key=key)
    return TagChoice(None, there[0] if there else None, tuple(ignored))


def choose_latest_snapshot(snapshots: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The newest *completed* snapshot; a pending one may never finish."""
    done = [s for s in snapshots if s.get("State") == "completed"]
    if not done:
        return None
    return max(done, key=lambda s: (s.get("StartTime"), s["SnapshotId"]))


def newer_pending_snapshot(snapshots: List[Dict[str, Any]], completed: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The newest *pending* snapshot if it is newer than ``completed``: usually the last drain's, still
    being copied when the replacement boots. Taking the older completed one instead would silently
    restore an older checkpoint."""
    pending = [s for s in snapshots if s.get("State") == "pending"]
    if not pending:
        return None
    newest = max(pending, key=lambda s: (s.get("StartTime"), s["SnapshotId"]))
    if completed is not None and (newest.get("StartTime"), newest["SnapshotId"]) <= (completed.get("StartTime"), completed["SnapshotId"]):
        return None
    return newest


def wait_snapshot_completed(ec2: Any, snapshot_id: str, clock: Clock, timeout: float) -> Optional[Dict[str, Any]]:
    """Wait for ``snapshot_id`` to complete; None when it is still pending after ``timeout`` or failed."""
    def check() -> Optional[Dict[str, Any]]:
        snap = describe_snapshot(ec2, snapshot_id)
        if snap["State"] == "error":
            raise AttachError(f"snapshot {snapshot_id} failed")
        return snap if snap["State"] == "completed" else None

    try:
        return wait_until(check, f"snapshot {snapshot_id} to complete", timeout, clock,
                          not_found_grace=min(NOT_FOUND_GRACE, timeout))
    except AttachError:
        return None


# ---- calls --------------------------------------------------------------------------------------


def describe_volume(ec2: Any, volume_id: str) -> Dict[str, Any]:
    try:
        vols = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    except Exception as exc:  # noqa: BLE001
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("InvalidVolume.NotFound", "InvalidVolumeID.NotFound"):
            raise NotVisible(f"volume {volume_id} does not exist") from None
        raise
    if not vols:
        raise NotVisible(f"volume {volume_id} does not exist")
    return vols[0]


def find_tagged(ec2: Any, wanted: Dict[str, str]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    kwargs: Dict[str, Any] = {"Filters": T.filters(wanted)}
    while True:
        page = ec2.describe_volumes(**kwargs)
        out.extend(v for v in page["Volumes"] if v.get("State") not in ("deleting", "deleted", "error"))
        token = page.get("NextToken")
        if not token:
            return out
        kwargs["NextToken"] = token


def find_snapshots(ec2: Any, wanted: Dict[str, str]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    kwargs: Dict[str, Any] = {"Filters": T.filters(wanted), "OwnerIds": ["self"]}
    while True:
        page = ec2.describe_snapshots(**kwargs)
        out.extend(page["Snapshots"])
        token = page.get("NextToken")
        if not token:
            return out
        kwargs["NextToken"] = token


def describe_snapshot(ec2: Any, snapshot_id: str) -> Dict[str, Any]:
    try:
        snaps = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    except Exception as exc:  # noqa: BLE001
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code.startswith("InvalidSnapshot"):
            raise NotVisible(f"snapshot {snapshot_id} does not exist") from None
        raise
    if not snaps:
        raise NotVisible(f"snapshot {snapshot_id} does not exist")
    return snaps[0]


def create_volume(ec2: Any, az: str, token: str, tags: Dict[str, str], size_gib: int = 0, volume_type: str = "gp3",
                  iops: int = 0, throughput: int = 0, encrypted: bool = True, kms_key_id: str = "",
                  snapshot_id: str = "", multi_attach: bool = False) -> str:
    kwargs: Dict[str, Any] = {
        "AvailabilityZone": az,
        "VolumeType": volume_type,
        "ClientToken": token,
        "TagSpecifications": T.tag_specs("volume", tags),
    }
    if size_gib:
        kwargs["Size"] = int(size_gib)
    if snapshot_id:
        kwargs["SnapshotId"] = snapshot_id
    if iops:
        kwargs["Iops"] = int(iops)
    if throughput and volume_type == "gp3":
        kwargs["Throughput"] = int(throughput)
    if encrypted:
        kwargs["Encrypted"] = True
        if kms_key_id:
            kwargs["KmsKeyId"] = kms_key_id
    if multi_attach:
        kwargs["MultiAttachEnabled"] = True
    # the ClientToken makes a repeat safe: throttled or refused for a moment, ask again
    return call_retrying(lambda: ec2.create_volume(**kwargs), "CreateVolume", 60.0)["VolumeId"]


def wait_available(ec2: Any, volume_id: str, clock: Clock, timeout: float) -> Dict[str, Any]:
    """``creating`` -> ``available`` (or already ``in-use``)."""
    last = {"state": ""}

    def check() -> Optional[Dict[str, Any]]:
        vol = describe_volume(ec2, volume_id)
        last["state"] = f"'{vol['State']}'"
        if vol["State"] == "error":
            raise AttachError(f"volume {volume_id} went into state error")
        if vol["State"] in ("deleting", "deleted"):
            raise AttachError(f"volume {volume_id} is {vol['State']}")
        return vol if vol["State"] in ("available", "in-use") else None

    return wait_until(check, f"volume {volume_id} to become available", timeout, clock,
                      not_found_grace=min(NOT_FOUND_GRACE, timeout), seen=lambda: last["state"] or "nothing (NotFound)")


def used_device_names(ec2: Any, instance_id: str) -> List[str]:
    res = ec2.describe_instances(InstanceIds=[instance_id])
    names: List[str] = []
    for r in res.get("Reservations", []):
        for inst in r.get("Instances", []):
            if inst.get("RootDeviceName"):
                names.append(inst["RootDeviceName"])
            names.extend(m["DeviceName"] for m in inst.get("BlockDeviceMappings", []))
    return names


def attach(ec2: Any, volume_id: str, instance_id: str, device_name: str, clock: Clock = SYSTEM_CLOCK,
           timeout: float = 30.0) -> None:
    """AttachVolume, retried while EC2 throttles or the volume is between states (IncorrectState: still
    ``creating``, or ``detaching`` from an earlier owner). VolumeInUse, a device name in use and a zone
    mismatch are final."""
    call_retrying(lambda: ec2.attach_volume(VolumeId=volume_id, InstanceId=instance_id, Device=device_name),
                  f"AttachVolume {volume_id} as {device_name}", timeout, clock)


def wait_attached(ec2: Any, volume_id: str, instance_id: str, clock: Clock, timeout: float) -> str:
    """``attaching`` -> ``attached``; returns the attach device name."""
    last = {"state": ""}

    def check() -> Optional[str]:
        vol = describe_volume(ec2, volume_id)
        att = attachment_to(vol, instance_id)
        if att is None:
            last["state"] = f"volume '{vol.get('State')}' with no attachment to {instance_id}"
            return None
        last["state"] = f"attachment '{att.get('State')}'"
        return att["Device"] if att.get("State") == "attached" else None

    return wait_until(check, f"volume {volume_id} to attach to {instance_id}", timeout, clock,
                      not_found_grace=min(NOT_FOUND_GRACE, timeout), seen=lambda: last["state"])


def set_delete_on_termination(ec2: Any, instance_id: str, device_name: str, value: bool) -> None:
    ec2.modify_instance_attribute(InstanceId=instance_id, BlockDeviceMappings=[
        {"DeviceName": device_name, "Ebs": {"DeleteOnTermination": bool(value)}}])


def detach(ec2: Any, volume_id: str, instance_id: str, clock: Clock, timeout: float) -> bool:
    """Detach from this instance and wait; False when it was not attached here."""
    vol = describe_volume(ec2, volume_id)
    if attachment_to(vol, instance_id) is None and not _detaching(vol, instance_id):
        return False
    if attachment_to(vol, instance_id) is not None:
        call_retrying(lambda: ec2.detach_volume(VolumeId=volume_id, InstanceId=instance_id),
                      f"DetachVolume {volume_id}", timeout, clock)
    last = {"state": ""}

    def check() -> bool:
        v = describe_volume(ec2, volume_id)
        last["state"] = f"volume '{v.get('State')}'" + (", attachment 'detaching'" if _detaching(v, instance_id) else "")
        return attachment_to(v, instance_id) is None and not _detaching(v, instance_id)

    wait_until(check, f"volume {volume_id} to detach from {instance_id}", timeout, clock, seen=lambda: last["state"])
    return True


def _detaching(volume: Dict[str, Any], instance_id: str) -> bool:
    return any(a.get("InstanceId") == instance_id and a.get("State") == "detaching"
               for a in volume.get("Attachments") or [])


def snapshot_for_copy(ec2: Any, volume_id: str, tags: Dict[str, str], clock: Clock, timeout: float) -> str:
    """Snapshot a volume in another AZ (to re-create it here) and wait for it to complete.

    CreateSnapshot takes no ClientToken: a snapshot we already started for this copy is found by tag.
    """
    existing = [s for s in find_snapshots(ec2, dict(tags, **{T.PURPOSE: "copy-across-az"}))
                if s.get("VolumeId") == volume_id and s.get("State") in ("pending", "completed")]
    if existing:
        snap_id = sorted(existing, key=lambda s: s["SnapshotId"])[0]["SnapshotId"]
    else:
        # definite refusals only (throttling, the per-volume rate): an ambiguous failure is not retried
        snap_id = call_retrying(lambda: ec2.create_snapshot(
            VolumeId=volume_id, Description=f"spot-agent copy of {volume_id} across AZs",
            TagSpecifications=T.tag_specs("snapshot", dict(tags, **{T.PURPOSE: "copy-across-az"}))),
            f"CreateSnapshot of {volume_id}", min(60.0, timeout), clock, idempotent=False)["SnapshotId"]

    def check() -> Optional[str]:
        snap = describe_snapshot(ec2, snap_id)
        if snap["State"] == "error":
            raise AttachError(f"snapshot {snap_id} of {volume_id} failed")
        return snap_id if snap["State"] == "completed" else None

    return wait_until(check, f"snapshot {snap_id} of {volume_id} to complete", timeout, clock,
                      not_found_grace=min(NOT_FOUND_GRACE, timeout))
