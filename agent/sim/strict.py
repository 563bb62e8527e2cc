"""The strict local AWS: what real EC2 and Auto Scaling do that moto does not.

moto answers every call at once and never says no. Real EC2 takes time (volumes are ``creating``,
attachments ``attaching``, snapshots ``pending``), is eventually consistent (a resource just created is
``NotFound`` to describe for a moment, its tags come later), throttles (token buckets per API, one
CreateSnapshot per volume every 15 s) and refuses calls in the wrong state. Auto Scaling accepts
CompleteLifecycleAction only while the instance waits in ``Terminating:Wait``, and a hook that hears
nothing times out to its default result.

:class:`StrictModel` holds those rules. It sees each request before moto does (:meth:`check` may answer
an error instead), learns the ids moto made (:meth:`learned`) and rewrites describe answers
(:meth:`rewrite`). It never changes moto's state: moto stays instant underneath and the model overlays
time on top, so it can be reasoned about (and tested) alone. Time comes from an injectable clock.
:mod:`agent.sim.localaws` plugs it in front of moto's server as a WSGI middleware.

Users rehearse against it, so every knob is in :class:`StrictSettings` with a realistic default
(docs/simulators.md, "Local AWS").
"""

from __future__ import annotations

import math
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple

from agent.clock import SYSTEM_CLOCK, Clock

EC2 = "ec2"
AUTOSCALING = "autoscaling"

# AWS's "resource-intensive" EC2 actions share a smaller bucket than other mutating ones.
INTENSIVE = ("AttachVolume", "CreateSnapshot", "CreateSnapshots", "CreateVolume", "DetachVolume", "DeleteVolume",
             "CopySnapshot", "DeleteSnapshot", "ModifyVolume")


@dataclass
class StrictSettings:
    """Every behaviour of the strict mode; seconds unless said. Defaults are what EC2 shows on a quiet
    account (state changes) and what AWS documents (limits)."""

    volume_create_seconds: float = field(default=3.0, metadata={"doc": "CreateVolume: creating -> available"})
    volume_from_snapshot_seconds: float = field(default=6.0, metadata={"doc": "the same, for a volume made from a snapshot (pending ones too)"})
    attach_seconds: float = field(default=3.0, metadata={"doc": "AttachVolume: attaching -> attached; the block device appears at the end"})
    detach_seconds: float = field(default=3.0, metadata={"doc": "DetachVolume: detaching -> available (the device goes at once)"})
    snapshot_base_seconds: float = field(default=5.0, metadata={"doc": "CreateSnapshot: pending -> completed, fixed part"})
    snapshot_seconds_per_gib: float = field(default=20.0, metadata={"doc": "... plus this per GiB of data written on the volume; Progress rises linearly"})
    visible_after_seconds: float = field(default=2.0, metadata={"doc": "a new volume or snapshot is NotFound to describe by id (and missing from filtered lists) this long"})
    tags_after_seconds: float = field(default=3.0, metadata={"doc": "its creation tags show (and tag filters match) only after this long"})
    snapshot_spacing_seconds: float = field(default=15.0, metadata={"doc": "one CreateSnapshot per volume per this long (SnapshotCreationPerVolumeRateExceeded)"})
    pending_snapshots_per_volume: int = field(default=5, metadata={"doc": "pending snapshots per volume at once (ConcurrentSnapshotLimitExceeded)"})
    attachments_per_instance: int = field(default=27, metadata={"doc": "EBS attachments per instance, root included (AttachmentLimitExceeded)"})
    ec2_describe_bucket: Tuple[float, float] = field(default=(100.0, 20.0), metadata={"doc": "EC2 Describe* token bucket: (size, refill per second), one bucket per action"})
    ec2_mutating_bucket: Tuple[float, float] = field(default=(200.0, 5.0), metadata={"doc": "other EC2 actions, per action (RequestLimitExceeded)"})
    ec2_intensive_bucket: Tuple[float, float] = field(default=(50.0, 5.0), metadata={"doc": "CreateVolume, AttachVolume, DetachVolume, CreateSnapshot(s), DeleteVolume/Snapshot, CopySnapshot, ModifyVolume, per action"})
    autoscaling_bucket: Tuple[float, float] = field(default=(40.0, 8.0), metadata={"doc": "Auto Scaling, per action (Throttling)"})
    buckets: Dict[str, Tuple[float, float]] = field(default_factory=dict, metadata={"doc": "per-action overrides, e.g. {\"CreateSnapshot\": (5, 1)}"})
    lifecycle_wait: bool = field(default=True, metadata={"doc": "CompleteLifecycleAction/heartbeat only in Terminating:Wait; hooks time out to their DefaultResult"})

    @classmethod
    def fast(cls, **overrides: Any) -> "StrictSettings":
        """The same behaviours on a shorter time scale, for the demo and the e2e suite (everything still
        goes through every state; the 15 s snapshot spacing is EC2's and stays)."""
        base = dict(volume_create_seconds=1.0, volume_from_snapshot_seconds=2.0, attach_seconds=1.0, detach_seconds=1.0,
                    snapshot_base_seconds=2.0, snapshot_seconds_per_gib=8.0, visible_after_seconds=1.0,
                    tags_after_seconds=1.5)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in fields(cls)]


@dataclass
class Request:
    """One API call as the model sees it: the service, the Action and the flat query parameters."""

    service: str
    action: str
    params: Dict[str, str] = field(default_factory=dict)
    caller: str = ""  # the access key id: the fleet mode tells agents apart by it

    def get(self, name: str, default: str = "") -> str:
        return self.params.get(name, default)

    def listed(self, prefix: str) -> List[str]:
        """``VolumeId.1``, ``VolumeId.2``... in order (boto3's query serialisation of a list)."""
        out = []
        n = 1
        while f"{prefix}.{n}" in self.params:
            out.append(self.params[f"{prefix}.{n}"])
            n += 1
        return out

    def filters(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        n = 1
        while f"Filter.{n}.Name" in self.params:
            out[self.params[f"Filter.{n}.Name"]] = self.listed(f"Filter.{n}.Value")
            n += 1
        return out


@dataclass
class AWSError:
    code: str
    message: str
    status: int = 400


class Backend(Protocol):
    """What the model reads from moto (the in-process state) to judge a call."""

    def volume_az(self, volume_id: str) -> Optional[str]: ...
    def volume_attachments(self, volume_id: str) -> List[Tuple[str, str]]: ...  # (instance, device)
    def instance_az(self, instance_id: str) -> Optional[str]: ...
    def instance_devices(self, instance_id: str) -> Dict[str, str]: ...  # device name -> volume id
    def instance_root_device(self, instance_id: str) -> str: ...
    def terminating_hooks(self, instance_id: str) -> List[Tuple[str, str, float, str]]: ...  # group, hook, timeout, default
    def hook_transition(self, group: str, hook: str) -> str: ...  # "" when there is no such hook
    def written_gib(self, volume_id: str) -> Optional[float]: ...


class TokenBucket:
    """``size`` tokens, refilled at ``rate`` per second; a call takes one or is refused. A size below 1
    starts (nearly) empty and holds one token at most: every call waits for the refill."""

    def __init__(self, size: float, rate: float, now: float) -> None:
        self.size = max(1.0, float(size))
        self.rate = float(rate)
        self.tokens = float(size)
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.size, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class _Timed:
    """A resource's overlay: when it was made, when describes may see it and its tags, when it is done."""

    created: float
    done_at: float
    visible_at: float
    tags_at: float
    volume_id: str = ""


@dataclass
class _Attachment:
    instance_id: str
    device: str
    done_at: float


@dataclass
class LifecycleWait:
    group: str
    hook: str
    default_result: str
    timeout: float
    started: float
    deadline: float
    heartbeats: int = 0
    result: str = ""  # CONTINUE/ABANDON once completed or timed out
    how: str = ""  # "completed" | "timed out"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(el: ET.Element, name: str) -> Optional[ET.Element]:
    for c in el:
        if _local(c.tag) == name:
            return c
    return None


def _text(el: ET.Element, name: str) -> str:
    c = _child(el, name)
    return (c.text or "") if c is not None else ""


def _set(el: ET.Element, name: str, value: str) -> None:
    c = _child(el, name)
    if c is not None:
        c.text = value


def _items(root: ET.Element, set_name: str) -> Tuple[Optional[ET.Element], List[ET.Element]]:
    for el in root.iter():
        if _local(el.tag) == set_name:
            return el, [c for c in el if _local(c.tag) == "item"]
    return None, []


class StrictModel:
    """The strict rules over one moto: thread-safe, time from ``clock``."""

    def __init__(self, backend: Backend, settings: Optional[StrictSettings] = None, clock: Clock = SYSTEM_CLOCK,
                 on_lifecycle: Callable[[Dict[str, Any]], None] = lambda call: None) -> None:
        self.backend = backend
        self.settings = settings or StrictSettings()
        self.clock = clock
        self.on_lifecycle = on_lifecycle
        self._lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.volumes: Dict[str, _Timed] = {}
            self.snapshots: Dict[str, _Timed] = {}
            self.attaching: Dict[str, _Attachment] = {}
            self.detaching: Dict[str, _Attachment] = {}
            self.last_snapshot: Dict[str, float] = {}
            self.waits: Dict[str, LifecycleWait] = {}
            self.launched: Dict[str, str] = {}  # instance -> result of its launching hook, once completed
            self._buckets: Dict[Tuple[str, str], TokenBucket] = {}
            self.calls: List[Dict[str, Any]] = []  # every call: caller, service, action, at, code

    # ---- time -------------------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.time()

    def _tick(self, now: float) -> None:
        for vid in [v for v, a in self.attaching.items() if a.done_at <= now]:
            del self.attaching[vid]
        for vid in [v for v, a in self.detaching.items() if a.done_at <= now]:
            del self.detaching[vid]
        for iid, w in self.waits.items():
            if not w.result and now >= w.deadline:
                w.result, w.how = w.default_result, "timed out"
                self.on_lifecycle({"call": "LifecycleActionTimeout", "group": w.group, "hook": w.hook,
                                   "instance_id": iid, "result": w.default_result})

    def tick(self) -> None:
        with self._lock:
            self._tick(self.now())

    # ---- requests ---------------------------------------------------------------------------------

    def bucket_for(self, service: str, action: str) -> Tuple[float, float]:
        s = self.settings
        if action in s.buckets:
            return tuple(s.buckets[action])  # type: ignore[return-value]
        if service == AUTOSCALING:
            return s.autoscaling_bucket
        if action.startswith("Describe"):
            return s.ec2_describe_bucket
        if action in INTENSIVE:
            return s.ec2_intensive_bucket
        return s.ec2_mutating_bucket

    def check(self, req: Request) -> Optional[AWSError]:
        """The error AWS would answer instead of doing ``req``, or None to let moto do it."""
        with self._lock:
            now = self.now()
            self._tick(now)
            err = self._throttle(req, now) or self._judge(req, now)
            self.calls.append({"caller": req.caller, "service": req.service, "action": req.action, "at": now,
                               "code": err.code if err else ""})
            return err

    def _throttle(self, req: Request, now: float) -> Optional[AWSError]:
        key = (req.service, req.action)
        bucket = self._buckets.get(key)
        if bucket is None:
            size, rate = self.bucket_for(req.service, req.action)
            bucket = self._buckets[key] = TokenBucket(size, rate, now)
        if bucket.take(now):
            return None
        if req.service == AUTOSCALING:
            return AWSError("Throttling", "Rate exceeded", 400)
        return AWSError("RequestLimitExceeded", "Request limit exceeded.", 503)

    def _judge(self, req: Request, now: float) -> Optional[AWSError]:
        fn = getattr(self, f"_judge_{req.action}", None)
        return fn(req, now) if fn else None

    def _volume_state(self, vid: str, now: float) -> str:
        rec = self.volumes.get(vid)
        if rec and now < rec.done_at:
            return "creating"
        if vid in self.attaching:
            return "attaching"
        if vid in self.detaching:
            return "detaching"
        return "attached" if self.backend.volume_attachments(vid) else "available"

    @staticmethod
    def _unseen(ids: List[str], recs: Dict[str, _Timed], now: float, code: str, what: str) -> Optional[AWSError]:
        """Describe by id of something too new to be seen: NotFound, as EC2 says for a moment."""
        for rid in ids:
            rec = recs.get(rid)
            if rec and now < rec.visible_at:
                return AWSError(code, f"The {what} '{rid}' does not exist.")
        return None

    def _judge_DescribeVolumes(self, req: Request, now: float) -> Optional[AWSError]:
        return self._unseen(req.listed("VolumeId"), self.volumes, now, "InvalidVolume.NotFound", "volume")

    def _judge_DescribeSnapshots(self, req: Request, now: float) -> Optional[AWSError]:
        return self._unseen(req.listed("SnapshotId"), self.snapshots, now, "InvalidSnapshot.NotFound", "snapshot")

    def _judge_AttachVolume(self, req: Request, now: float) -> Optional[AWSError]:
        vid, iid, device = req.get("VolumeId"), req.get("InstanceId"), req.get("Device")
        state = self._volume_state(vid, now)
        if state == "creating":
            return AWSError("IncorrectState", f"{vid} is not 'available'.")
        if state == "detaching":
            return AWSError("IncorrectState", f"{vid} is in the 'detaching' state; wait until it is 'available'.")
        if state in ("attaching", "attached"):
            return AWSError("VolumeInUse", f"{vid} is already attached to an instance")
        vaz, iaz = self.backend.volume_az(vid), self.backend.instance_az(iid)
        if vaz and iaz and vaz != iaz:
            return AWSError("InvalidVolume.ZoneMismatch",
                            f"The volume '{vid}' is not in the same availability zone as instance '{iid}'")
        used = self._devices_of(iid)
        if _device_key(device) in {_device_key(d) for d in used}:
            return AWSError("InvalidParameterValue",
                            f"Invalid value '{device}' for unixDevice. Attachment point {device} is already in use")
        if vaz is not None and iaz is not None and len(used) >= self.settings.attachments_per_instance:
            return AWSError("AttachmentLimitExceeded",
                            f"Instance '{iid}' already has {len(used)} attachments (limit {self.settings.attachments_per_instance})")
        return None

    def _devices_of(self, iid: str) -> List[str]:
        used = list(self.backend.instance_devices(iid))
        used += [a.device for a in list(self.attaching.values()) + list(self.detaching.values()) if a.instance_id == iid]
        return used

    def _judge_DetachVolume(self, req: Request, now: float) -> Optional[AWSError]:
        vid = req.get("VolumeId")
        state = self._volume_state(vid, now)
        if state in ("attaching", "detaching", "creating"):
            return AWSError("IncorrectState", f"Volume '{vid}' is in the '{state}' state.")
        return None

    def _judge_DeleteVolume(self, req: Request, now: float) -> Optional[AWSError]:
        vid = req.get("VolumeId")
        state = self._volume_state(vid, now)
        if state in ("attaching", "attached", "detaching"):
            who = ", ".join(i for i, _ in self.backend.volume_attachments(vid)) or (
                (self.attaching.get(vid) or self.detaching.get(vid)).instance_id)  # type: ignore[union-attr]
            return AWSError("VolumeInUse", f"Volume {vid} is currently attached to {who}")
        if state == "creating":
            return AWSError("IncorrectState", f"The volume '{vid}' is 'creating'.")
        return None

    def _snapshot_refusal(self, vid: str, now: float) -> Optional[AWSError]:
        s = self.settings
        if self._volume_state(vid, now) == "creating":
            return AWSError("IncorrectState", f"The volume '{vid}' is 'creating'.")
        last = self.last_snapshot.get(vid)
        if last is not None and now - last < s.snapshot_spacing_seconds:
            return AWSError("SnapshotCreationPerVolumeRateExceeded",
                            "The maximum per volume CreateSnapshot request rate has been exceeded. "
                            "Use an increasing or variable sleep interval between requests.")
        pending = sum(1 for r in self.snapshots.values() if r.volume_id == vid and now < r.done_at)
        if pending >= s.pending_snapshots_per_volume:
            return AWSError("ConcurrentSnapshotLimitExceeded",
                            f"Too many pending snapshots of {vid}: {pending} (limit {s.pending_snapshots_per_volume})")
        return None

    def _judge_CreateSnapshot(self, req: Request, now: float) -> Optional[AWSError]:
        return self._snapshot_refusal(req.get("VolumeId"), now)

    def _multi_volumes(self, req: Request) -> List[str]:
        iid = req.get("InstanceSpecification.InstanceId")
        excluded = set(req.listed("InstanceSpecification.ExcludeDataVolumeId"))
        skip_boot = req.get("InstanceSpecification.ExcludeBootVolume").lower() == "true"
        root = self.backend.instance_root_device(iid)
        out = []
        for device, vid in self.backend.instance_devices(iid).items():
            if vid and vid not in excluded and not (skip_boot and device == root):
                out.append(vid)
        return out

    def _judge_CreateSnapshots(self, req: Request, now: float) -> Optional[AWSError]:
        for vid in self._multi_volumes(req):
            err = self._snapshot_refusal(vid, now)
            if err:
                return err
        return None

    def _lifecycle_wait(self, req: Request, now: float) -> Tuple[Optional[LifecycleWait], Optional[AWSError]]:
        iid = req.get("InstanceId")
        w = self.waits.get(iid)
        if not self.settings.lifecycle_wait:
            return w, None
        transition = self.backend.hook_transition(req.get("AutoScalingGroupName"), req.get("LifecycleHookName"))
        if transition.endswith("LAUNCHING"):
            # a new instance of a group with a launching hook waits in Pending:Wait until it is completed once
            if iid in self.launched:
                return None, AWSError("ValidationError", f"No active Lifecycle Action found with instance ID {iid}")
            return None, None
        if w is None or w.result or w.hook != req.get("LifecycleHookName"):
            return None, AWSError("ValidationError", f"No active Lifecycle Action found with instance ID {iid}")
        return w, None

    def _judge_CompleteLifecycleAction(self, req: Request, now: float) -> Optional[AWSError]:
        return self._lifecycle_wait(req, now)[1]

    def _judge_RecordLifecycleActionHeartbeat(self, req: Request, now: float) -> Optional[AWSError]:
        return self._lifecycle_wait(req, now)[1]

    # ---- what moto did --------------------------------------------------------------------------

    def learned(self, req: Request, body: bytes) -> None:
        """moto answered ``req`` with success: start the clocks of what it made."""
        with self._lock:
            now = self.now()
            fn = getattr(self, f"_learn_{req.action}", None)
            if fn is not None:
                fn(req, _parse(body), now)

    def _learn_CreateVolume(self, req: Request, root: Optional[ET.Element], now: float) -> None:
        if root is None:
            return
        vid = _text(root, "volumeId")
        if not vid or vid in self.volumes:
            return  # the same ClientToken again: the volume it made before
        s = self.settings
        took = s.volume_from_snapshot_seconds if req.get("SnapshotId") else s.volume_create_seconds
        self.volumes[vid] = _Timed(now, now + took, now + s.visible_after_seconds, now + s.tags_after_seconds)

    def _new_snapshot(self, sid: str, vid: str, size_gib: float, now: float) -> None:
        s = self.settings
        written = self.backend.written_gib(vid)
        gib = size_gib if written is None else written
        took = s.snapshot_base_seconds + max(0.0, gib) * s.snapshot_seconds_per_gib
        self.snapshots[sid] = _Timed(now, now + took, now + s.visible_after_seconds, now + s.tags_after_seconds, vid)
        self.last_snapshot[vid] = now

    def _learn_CreateSnapshot(self, req: Request, root: Optional[ET.Element], now: float) -> None:
        if root is not None:
            size = _text(root, "volumeSize")
            self._new_snapshot(_text(root, "snapshotId"), req.get("VolumeId"), float(size or 0), now)

    def _learn_CreateSnapshots(self, req: Request, root: Optional[ET.Element], now: float) -> None:
        if root is None:
            return
        for item in _items(root, "snapshotSet")[1]:
            size = _text(item, "volumeSize")
            self._new_snapshot(_text(item, "snapshotId"), _text(item, "volumeId"), float(size or 0), now)

    def _learn_AttachVolume(self, req: Request, root: Optional[ET.Element], now: float) -> None:
        self.attaching[req.get("VolumeId")] = _Attachment(req.get("InstanceId"), req.get("Device"),
                                                          now + self.settings.attach_seconds)

    def _learn_DetachVolume(self, req: Request, root: Optional[ET.Element], now: float) -> None:
        vid = req.get("VolumeId")
        self.attaching.pop(vid, None)
        iid = (_text(root, "instanceId") if root is not None else "") or req.get("InstanceId")
        device = (_text(root, "device") if root is not None else "") or req.get("Device")
        if self.settings.detach_seconds > 0:
            self.detaching[vid] = _Attachment(iid, device, now + self.settings.detach_seconds)

    def _learn_CompleteLifecycleAction(self, req: Request, root: Optional[ET.Element], now: float) -> None:
        if self.backend.hook_transition(req.get("AutoScalingGroupName"), req.get("LifecycleHookName")).endswith("LAUNCHING"):
            self.launched[req.get("InstanceId")] = req.get("LifecycleActionResult")
            return
        w = self.waits.get(req.get("InstanceId"))
        if w is not None and not w.result:
            w.result, w.how = req.get("LifecycleActionResult"), "completed"

    def _learn_RecordLifecycleActionHeartbeat(self, req: Request, root: Optional[ET.Element], now: float) -> None:
        w = self.waits.get(req.get("InstanceId"))
        if w is not None and not w.result:
            w.heartbeats += 1
            # AWS: each heartbeat restarts the timeout, up to 100 timeouts or 48 hours in all
            w.deadline = min(now + w.timeout, w.started + min(100 * w.timeout, 172800.0))

    # ---- rewriting answers ----------------------------------------------------------------------

    def rewrite(self, req: Request, body: bytes) -> bytes:
        """moto's answer to a describe call, as EC2/Auto Scaling would give it at this moment."""
        fn = getattr(self, f"_rewrite_{req.action}", None)
        if fn is None:
            return body
        root = _parse(body)
        if root is None:
            return body
        with self._lock:
            now = self.now()
            self._tick(now)
            if not fn(req, root, now):
                return body
        return _serialise(root)

    def _hide(self, req: Request, container: ET.Element, item: ET.Element, rec: Optional[_Timed], now: float) -> bool:
        """Drop ``item`` while it is not visible (or its tags are not, for a tag filter); strip its tags
        until they show. True when it was dropped."""
        if rec is None:
            return False
        if now < rec.visible_at or (now < rec.tags_at and any(k.startswith("tag") for k in req.filters())):
            container.remove(item)
            return True
        if now < rec.tags_at:
            tags = _child(item, "tagSet")
            if tags is not None:
                for t in list(tags):
                    tags.remove(t)
        return False

    def _rewrite_CreateVolume(self, req: Request, root: ET.Element, now: float) -> bool:
        if self._volume_state(_text(root, "volumeId"), now) != "creating":
            return False
        _set(root, "status", "creating")
        return True

    def _rewrite_AttachVolume(self, req: Request, root: ET.Element, now: float) -> bool:
        _set(root, "status", "attaching")
        return True

    def _rewrite_DetachVolume(self, req: Request, root: ET.Element, now: float) -> bool:
        _set(root, "status", "detaching")
        return True

    def _rewrite_CreateSnapshot(self, req: Request, root: ET.Element, now: float) -> bool:
        _set(root, "status", "pending")
        _set(root, "progress", "0%")
        return True

    def _rewrite_DescribeVolumes(self, req: Request, root: ET.Element, now: float) -> bool:
        container, items = _items(root, "volumeSet")
        if container is None:
            return False
        for item in items:
            vid = _text(item, "volumeId")
            if self._hide(req, container, item, self.volumes.get(vid), now):
                continue
            state = self._volume_state(vid, now)
            atts = _child(item, "attachmentSet")
            if state == "creating":
                _set(item, "status", "creating")
            elif state == "attaching" and atts is not None:
                for a in atts:
                    _set(a, "status", "attaching")
            elif state == "detaching":
                d = self.detaching[vid]
                _set(item, "status", "in-use")
                if atts is None:
                    atts = ET.SubElement(item, _same_ns(item, "attachmentSet"))
                if not len(atts):
                    a = ET.SubElement(atts, _same_ns(item, "item"))
                    for name, value in (("volumeId", vid), ("instanceId", d.instance_id), ("device", d.device),
                                        ("status", "detaching"), ("deleteOnTermination", "false")):
                        ET.SubElement(a, _same_ns(item, name)).text = value
                else:
                    for a in atts:
                        _set(a, "status", "detaching")
        return True

    def _rewrite_DescribeSnapshots(self, req: Request, root: ET.Element, now: float) -> bool:
        container, items = _items(root, "snapshotSet")
        if container is None:
            return False
        for item in items:
            rec = self.snapshots.get(_text(item, "snapshotId"))
            if rec is None or self._hide(req, container, item, rec, now):
                continue
            if now < rec.done_at:
                span = max(1e-9, rec.done_at - rec.created)
                _set(item, "status", "pending")
                _set(item, "progress", f"{int(99 * (now - rec.created) / span)}%")
        return True

    def _rewrite_DescribeInstances(self, req: Request, root: ET.Element, now: float) -> bool:
        changed = False
        for el in root.iter():
            if _local(el.tag) != "blockDeviceMapping":
                continue
            for item in el:
                ebs = _child(item, "ebs")
                if ebs is not None and _text(ebs, "volumeId") in self.attaching:
                    _set(ebs, "status", "attaching")
                    changed = True
        return changed

    def _rewrite_DescribeAutoScalingInstances(self, req: Request, root: ET.Element, now: float) -> bool:
        changed = False
        for el in root.iter():
            if _local(el.tag) != "member":
                continue
            w = self.waits.get(_text(el, "InstanceId"))
            if w is not None:
                _set(el, "LifecycleState", "Terminating:Wait" if not w.result else "Terminating:Proceed")
                changed = True
        return changed

    # ---- Auto Scaling termination -----------------------------------------------------------------

    def begin_termination(self, instance_id: str) -> List[str]:
        """Auto Scaling starts terminating ``instance_id`` (a spot reclaim, a scale-in): it waits in
        ``Terminating:Wait`` for each terminating hook of its group. Returns the hooks waited on."""
        with self._lock:
            now = self.now()
            out = []
            for group, hook, timeout, default in self.backend.terminating_hooks(instance_id):
                if instance_id in self.waits and not self.waits[instance_id].result:
                    break
                self.waits[instance_id] = LifecycleWait(group, hook, default or "ABANDON", timeout, now, now + timeout)
                out.append(f"{group}/{hook}")
                break  # one hook per instance is what the agent completes; more would wait in turn
            return out

    def lifecycle_state(self, instance_id: str) -> Optional[LifecycleWait]:
        with self._lock:
            self._tick(self.now())
            return self.waits.get(instance_id)

    def calls_by(self, caller: str = "") -> List[Dict[str, Any]]:
        with self._lock:
            return [dict(c) for c in self.calls if not caller or c["caller"] == caller]


def _device_key(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    for prefix in ("xvd", "sd", "hd"):
        if base.startswith(prefix):
            return base[len(prefix):]
    return base


def _same_ns(el: ET.Element, name: str) -> str:
    return el.tag[: el.tag.index("}") + 1] + name if el.tag.startswith("{") else name


def _parse(body: bytes) -> Optional[ET.Element]:
    try:
        return ET.fromstring(body)
    except ET.ParseError:
        return None


def _serialise(root: ET.Element) -> bytes:
    if root.tag.startswith("{"):
        ET.register_namespace("", root.tag[1: root.tag.index("}")])
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def ec2_error_body(err: AWSError, request_id: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{err.code}</Code>'
            f"<Message>{_esc(err.message)}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>").encode()


def query_error_body(err: AWSError, request_id: str, namespace: str) -> bytes:
    return (f'<ErrorResponse xmlns="{namespace}"><Error><Type>Sender</Type><Code>{err.code}</Code>'
            f"<Message>{_esc(err.message)}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>").encode()


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def parse_bucket(text: str) -> Tuple[float, float]:
    """``"SIZE/RATE"`` (e.g. ``10/2``) from the command line."""
    size, _, rate = text.partition("/")
    return float(size), float(rate or size)


def settings_from(pairs: Iterable[str], base: Optional[StrictSettings] = None) -> StrictSettings:
    """``name=value`` overrides (``--set``): numbers, ``SIZE/RATE`` buckets, ``Action=SIZE/RATE``."""
    s = base or StrictSettings()
    for pair in pairs:
        name, _, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if name not in StrictSettings.names():
            if value and "/" in value and name[:1].isupper():
                s.buckets[name] = parse_bucket(value)
                continue
            raise ValueError(f"unknown strict setting {name!r} (one of {', '.join(StrictSettings.names())})")
        current = getattr(s, name)
        try:
            if isinstance(current, bool):
                setattr(s, name, value.strip().lower() in ("1", "true", "yes", "on"))
            elif isinstance(current, tuple):
                setattr(s, name, parse_bucket(value))
            elif isinstance(current, int):
                setattr(s, name, int(value))
            else:
                setattr(s, name, float(value))
        except ValueError:
            raise ValueError(f"strict setting {name}: {value!r} is not a valid value") from None
        got = getattr(s, name)
        numbers = got if isinstance(got, tuple) else (got,)
        if not all(isinstance(x, bool) or (math.isfinite(x) and x >= 0) for x in numbers):
            raise ValueError(f"strict setting {name}: {value!r} must be finite and not negative")
    return s
