"""Bring the configured volumes up at boot (and down on request), recording each step in state.

Order per EBS volume: find or create it (idempotently), attach it, wait for its block device, wait for
it to settle, probe, format only what :mod:`agent.volumes.format_rule` allows (checked again under an
O_EXCL hold), grow ext4 offline, mount by UUID, grow XFS online, write fstab / mount unit, read every
block if asked. Each volume's outcome is a :class:`VolumeResult`; the
daemon holds READY until every required one is ``ok``.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from agent import metrics
from agent.clock import SYSTEM_CLOCK, Clock
from agent.config import HostSection, VolumeSection
from agent.identity import InstanceIdentity
from agent.runner import Runner
from agent.state import StateStore
from agent.volumes import attach as A
from agent.volumes import filesystem as F
from agent.volumes import format_rule as FR
from agent.volumes import instance_store as IS
from agent.volumes import tags as T
from agent.volumes.device_resolver import instance_store_disks, resolve, scan_tree
from agent.volumes.initialize import initialize
from agent.volumes.model import MountedVolume
from agent.volumes.probe import ProbeError, held_exclusively, probe, scan_written, wait_settled

log = logging.getLogger(__name__)
SECTION = "volumes"


class VolumeError(RuntimeError):
    pass


@dataclass
class VolumeResult:
    name: str
    ok: bool
    required: bool
    volume_id: str = ""
    device: str = ""
    mountpoint: str = ""
    error: str = ""
    seconds: float = 0.0
    actions: List[str] = field(default_factory=list)  # what was done: "created", "attached", "formatted", ...
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


Progress = Callable[[str], None]


@dataclass(frozen=True)
class _Prepared:
    device: str
    volume_id: str
    from_snapshot: bool
    read_only: bool
    multi: bool


class VolumeManager:
    def __init__(self, volumes: List[VolumeSection], host: HostSection, clients: Any, identity: InstanceIdentity,
                 state: StateStore, runner: Runner, clock: Clock = SYSTEM_CLOCK,
                 mountinfo: str = "/proc/self/mountinfo", settle_timeout: float = 10.0,
                 snapshot_timeout: float = 1800.0) -> None:
        self.volumes = list(volumes)
        self.host = host
        self.clients = clients
        self.identity = identity
        self.state = state
        self.runner = runner
        self.clock = clock
        self.mountinfo = mountinfo
        self.settle_timeout = settle_timeout
        self.snapshot_timeout = snapshot_timeout
        self._lock = threading.Lock()
        self._attach_lock = threading.Lock()

    # ---- public ---------------------------------------------------------------------------------

    def mounted(self) -> Dict[str, MountedVolume]:
        """What we mounted (from state, so it survives restarts), confirmed against the live mount
        table: after a reboot a stale record must not send the drain to freeze whatever filesystem now
        holds that directory (the root filesystem)."""
        try:
            mounts = F.read_mounts(self.mountinfo)
        except OSError:
            mounts = None
        out = {}
        for name, rec in (self.state.get(SECTION, {}) or {}).items():
            if not rec.get("mounted"):
                continue
            if mounts is not None:
                here = F.mount_at(mounts, rec.get("mountpoint", ""))
                try:
                    live = here is not None and here.major_minor == F.major_minor(rec.get("device", ""))
                except OSError:
                    live = False
                if not live:
                    continue
            out[name] = MountedVolume.from_dict(rec)
        return out

    def records(self) -> Dict[str, Dict[str, Any]]:
        return self.state.get(SECTION, {}) or {}

    def up(self, names: Optional[List[str]] = None, progress: Progress = lambda msg: None) -> List[VolumeResult]:
        """Bring the volumes up. Finding, creating, attaching and waiting for devices (API-bound, seconds
        each on AWS) run for all volumes at once; formatting and mounting then run one at a time,
        parents before nested mount points. Results come back in config order."""
        vols = self._select(names)
        results = {v.name: VolumeResult(name=v.name, ok=False, required=v.required, mountpoint=v.mount) for v in vols}
        started = {v.name: self.clock.monotonic() for v in vols}
        prepared: Dict[str, Optional[_Prepared]] = {}

        def prepare(vol: VolumeSection) -> None:
            try:
                progress(f"volume {vol.name}: starting")
                prepared[vol.name] = self._prepare(vol, results[vol.name], progress)
            except Exception as exc:  # noqa: BLE001 - every failure becomes this volume's error line
                self._failed(vol, results[vol.name], exc, progress)
                prepared[vol.name] = None

        if len(vols) > 1:
            with ThreadPoolExecutor(max_workers=min(8, len(vols)), thread_name_prefix="volume") as pool:
                list(pool.map(prepare, vols))
        else:
            for vol in vols:
                prepare(vol)
        for vol in sorted(vols, key=lambda v: len(os.path.normpath(v.mount).split("/"))):
            prep = prepared.get(vol.name)
            result = results[vol.name]
            if prep is not None:
                try:
                    self._format_and_mount(vol, prep.device, prep.volume_id, self.records().get(vol.name, {}), result,
                                           progress, from_snapshot=prep.from_snapshot, read_only=prep.read_only,
                                           multi=prep.multi)
                    result.ok = True
                    progress(f"volume {vol.name}: mounted at {vol.mount}")
                except Exception as exc:  # noqa: BLE001
                    self._failed(vol, result, exc, progress)
            result.seconds = self.clock.monotonic() - started[vol.name]
        return [results[v.name] for v in vols]

    def _failed(self, vol: VolumeSection, result: VolumeResult, exc: BaseException, progress: Progress) -> None:
        expected = (VolumeError, A.AttachError, F.FilesystemError, ProbeError, IS.InstanceStoreError)
        if not isinstance(exc, expected):
            log.error("volume %s", vol.name, exc_info=exc)
        result.error = str(exc) if isinstance(exc, expected) else f"{type(exc).__name__}: {exc}"
        metrics.VOLUME_FAILURES.labels(volume=vol.name).inc()
        progress(f"volume {vol.name}: FAILED: {result.error}")

    def down(self, names: Optional[List[str]] = None) -> List[VolumeResult]:
        results = []
        for vol in self._select(names):
            started = self.clock.monotonic()
            rec = self.records().get(vol.name, {})
            result = VolumeResult(name=vol.name, ok=False, required=vol.required, mountpoint=vol.mount,
                                  volume_id=rec.get("volume_id", ""), device=rec.get("device", ""))
            try:
                if F.unmount(vol.mount, self.runner, self.mountinfo):
                    result.actions.append("unmounted")
                metrics.MOUNTED_VOLUMES.unset(vol.name)
                self._save(vol.name, mounted=False)
                vid = rec.get("volume_id", "")
                if vid and self.clients is not None:
                    if A.detach(self.clients.ec2, vid, self.identity.instance_id, self.clock, vol.attach_timeout):
                        result.actions.append("detached")
                    self._save(vol.name, attached=False)
                result.ok = True
            except Exception as exc:  # noqa: BLE001
                result.error = str(exc)
            result.seconds = self.clock.monotonic() - started
            results.append(result)
        return results

    # ---- one volume -----------------------------------------------------------------------------

    def _select(self, names: Optional[List[str]]) -> List[VolumeSection]:
        if not names:
            return list(self.volumes)
        known = {v.name: v for v in self.volumes}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise VolumeError(f"no [[volumes]] named {', '.join(unknown)} (configured: {', '.join(known) or 'none'})")
        return [known[n] for n in names]

    def _save(self, key: str, **fields: Any) -> Dict[str, Any]:
        with self._lock:  # read-modify-write of one entry in our section
            rec = (self.state.get(SECTION, {}) or {}).get(key, {})
            rec.update(fields)
            self.state.update(SECTION, **{key: rec})
            return rec

    def _prepare(self, vol: VolumeSection, result: VolumeResult, progress: Progress) -> "_Prepared":
        """Everything before the filesystem: the volume found or created, attached, its device present."""
        rec = self.records().get(vol.name, {})
        if vol.instance_store:
            device = self._instance_store_device(vol, result, progress)
            return _Prepared(device, "", from_snapshot=False, read_only=vol.read_only, multi=False)
        if self.clients is None:
            raise VolumeError("needs AWS clients (EC2) for an EBS volume")
        volume = self._find_or_create(vol, rec, result, progress)
        vid = volume["VolumeId"]
        result.volume_id = vid
        multi = vol.multi_attach or bool(volume.get("MultiAttachEnabled"))
        read_only = vol.read_only or multi
        if multi and not vol.multi_attach:
            result.warnings.append(f"{vid} is multi-attach enabled: mounting it read-only, never formatting it")
        attach_device = self._attach(vol, volume, result, progress)
        device = self._wait_for_device(vol, vid, attach_device, progress)
        result.device = device
        self._save(vol.name, device=device)
        return _Prepared(device, vid, from_snapshot=bool(volume.get("SnapshotId")), read_only=read_only, multi=multi)

    def _find_or_create(self, vol: VolumeSection, rec: Dict[str, Any], result: VolumeResult,
                        progress: Progress) -> Dict[str, Any]:
        ec2 = self.clients.ec2
        iid, az = self.identity.instance_id, self.identity.availability_zone
        source = _source_key(vol)
        if rec.get("volume_id") and rec.get("source") == source:
            try:
                known = A.describe_volume(ec2, rec["volume_id"])
                if known.get("State") in ("available", "in-use", "creating"):
                    volume = A.wait_available(ec2, known["VolumeId"], self.clock, vol.attach_timeout)
                    self._claim_pending_create(vol, volume)
                    return volume
            except A.AttachError:
                pass  # deleted since: find the source again
        if vol.volume_id:
            volume = A.describe_volume(ec2, vol.volume_id)
            if volume.get("AvailabilityZone") != az:
                ours = self._ours(vol)
                if ours is not None:
                    return self._remember(vol, ours, created=True)
                return self._other_az(vol, volume, result, progress)
            return self._remember(vol, volume, created=False)
        ours = self._ours(vol)
        if ours is not None:
            return self._remember(vol, ours, created=bool(rec.get("created", True)))
        if vol.tags:
            found = A.find_tagged(ec2, vol.tags)
            choice = A.choose_tagged_volume(found, az, iid, vol.multi_attach)
            if choice.volume is not None:
                return self._remember(vol, choice.volume, created=False)
            if choice.other_az is not None:
                return self._other_az(vol, choice.other_az, result, progress)
            if vol.create is None:
                ignored = f" (ignored: {', '.join(choice.ignored)})" if choice.ignored else ""
                raise VolumeError(f"no available volume with tags {_fmt_tags(vol.tags)} in {az}{ignored}; "
                                  f"add create = {{ size_gib = ... }} to create one when none matches")
            progress(f"volume {vol.name}: no volume with tags {_fmt_tags(vol.tags)}: creating {vol.create.size_gib} GiB {vol.create.type}")
            return self._create(vol, result, extra_tags=dict(vol.tags), purpose="persistent", token_source="tags")
        snapshot_id = vol.snapshot_id
        if vol.latest_snapshot:
            found = A.find_snapshots(ec2, vol.latest_snapshot)
            snap = A.choose_latest_snapshot(found)
            newer = A.newer_pending_snapshot(found, snap)
            if newer is not None and vol.pending_snapshot_wait > 0:
                progress(f"volume {vol.name}: the newest snapshot {newer['SnapshotId']} is still pending: "
                         f"waiting up to {vol.pending_snapshot_wait:g}s for it")
                done = A.wait_snapshot_completed(ec2, newer["SnapshotId"], self.clock, vol.pending_snapshot_wait)
                if done is not None:
                    snap = done
                else:
                    older = snap["SnapshotId"] if snap is not None else "none"
                    progress(f"volume {vol.name}: snapshot {newer['SnapshotId']} did not complete in "
                             f"{vol.pending_snapshot_wait:g}s: using the newest completed one ({older})")
                    result.actions.append(f"skipped pending {newer['SnapshotId']}")
            if snap is None:
                if vol.create is None:
                    raise VolumeError(f"no completed snapshot with tags {_fmt_tags(vol.latest_snapshot)}; "
                                      f"add create = {{ size_gib = ... }} to start from an empty volume instead")
                progress(f"volume {vol.name}: no snapshot with tags {_fmt_tags(vol.latest_snapshot)}: creating an empty one")
                return self._create(vol, result, token_source="latest_snapshot:none")
            snapshot_id = snap["SnapshotId"]
            result.actions.append(f"chose {snapshot_id}")
        if snapshot_id:
            snap = A.describe_snapshot(ec2, snapshot_id)
            if snap.get("State") == "pending" and vol.pending_snapshot_wait > 0:
                progress(f"volume {vol.name}: snapshot {snapshot_id} is pending: waiting up to {vol.pending_snapshot_wait:g}s")
                snap = A.wait_snapshot_completed(ec2, snapshot_id, self.clock, vol.pending_snapshot_wait) or snap
            if snap.get("State") != "completed":
                raise VolumeError(f"snapshot {snapshot_id} is {snap.get('State')}, not completed")
            progress(f"volume {vol.name}: creating a volume from {snapshot_id}")
            return self._create(vol, result, snapshot=snap, token_source=snapshot_id)
        return self._create(vol, result, token_source="create")

    def _ours(self, vol: VolumeSection) -> Optional[Dict[str, Any]]:
        """A volume we created for this name on this instance before a crash or restart."""
        wanted = dict(T.ownership(self.identity.instance_id, vol.name), **{T.SOURCE: _source_key(vol)})
        mine = A.find_tagged(self.clients.ec2, wanted)
        mine = [v for v in mine if v.get("AvailabilityZone") == self.identity.availability_zone]
        if not mine:
            return None
        choice = A.choose_tagged_volume(mine, self.identity.availability_zone, self.identity.instance_id, vol.multi_attach)
        return choice.volume

    def _claim_pending_create(self, vol: VolumeSection, volume: Dict[str, Any]) -> bool:
        """Record ``volume`` as created empty by us if our unfinished CreateVolume made it (a crash
        came between the call and recording its answer, or this is the answer)."""
        if not _made_by_pending_create(self.records().get(vol.name, {}), volume):
            return False
        self._save(vol.name, created_empty=volume["VolumeId"], creating=False, create_nonce="")
        return True

    def _remember(self, vol: VolumeSection, volume: Dict[str, Any], created: bool) -> Dict[str, Any]:
        self._claim_pending_create(vol, volume)
        self._save(vol.name, name=vol.name, volume_id=volume["VolumeId"], created=created, source=_source_key(vol),
                   az=volume.get("AvailabilityZone", ""), snapshot_id=volume.get("SnapshotId") or "")
        if volume.get("State") == "creating":
            return A.wait_available(self.clients.ec2, volume["VolumeId"], self.clock, vol.attach_timeout)
        return volume

    def _create(self, vol: VolumeSection, result: VolumeResult, snapshot: Optional[Dict[str, Any]] = None,
                extra_tags: Optional[Dict[str, str]] = None, purpose: str = "volume", token_source: str = "") -> Dict[str, Any]:
        iid, az = self.identity.instance_id, self.identity.availability_zone
        spec = vol.create
        tags = dict(extra_tags or {})
        tags.update(T.ownership(iid, vol.name, purpose))
        tags[T.SOURCE] = _source_key(vol)
        if "Name" not in tags:
            tags["Name"] = f"spot-agent {vol.name}"
        size = spec.size_gib if spec else 0
        if snapshot is not None:
            size = max(size, int(snapshot.get("VolumeSize") or 0))
        elif not size:
            raise VolumeError("needs create = { size_gib = ... } to create a volume")
        token = A.client_token(iid, vol.name, token_source)
        # The licence to format is bound to this call: a random nonce, recorded before the call and tagged
        # at creation. An idempotent replay of the token returns an older volume without it, and a crash
        # after the call is recognised on restart by the tag (see _made_by_pending_create).
        nonce = os.urandom(12).hex() if snapshot is None else ""
        if nonce:
            tags[T.CREATE_NONCE] = nonce
        self._save(vol.name, name=vol.name, client_token=token, creating=True, create_nonce=nonce)
        vid = A.create_volume(
            self.clients.ec2, az, token, tags, size_gib=size,
            volume_type=spec.type if spec else "gp3", iops=spec.iops if spec else 0,
            throughput=spec.throughput if spec else 0, encrypted=spec.encrypted if spec else bool(snapshot and snapshot.get("Encrypted")),
            kms_key_id=spec.kms_key_id if spec else "", snapshot_id=snapshot["SnapshotId"] if snapshot else "")
        result.actions.append("created")
        self._save(vol.name, volume_id=vid, created=True, az=az, source=_source_key(vol),
                   snapshot_id=snapshot["SnapshotId"] if snapshot else "")
        volume = A.wait_available(self.clients.ec2, vid, self.clock, vol.attach_timeout)
        volume = self._with_creation_tags(volume, vol.attach_timeout)
        if not self._claim_pending_create(vol, volume):
            # A from-snapshot volume, or the token's replay returned an older volume: no licence.
            self._save(vol.name, creating=False, create_nonce="")
        return volume

    def _with_creation_tags(self, volume: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        """EC2 shows a new volume's tags a moment after the volume itself. The licence check reads the
        creation nonce from those tags, so their absence must be waited out, not read as "an older
        volume". Every CreateVolume of ours tags SOURCE (a replay's older volume too), so its presence
        says the tags are visible."""
        if T.SOURCE in T.as_dict(volume.get("Tags")):
            return volume
        vid = volume["VolumeId"]

        def check() -> Optional[Dict[str, Any]]:
            seen = A.describe_volume(self.clients.ec2, vid)
            return seen if T.SOURCE in T.as_dict(seen.get("Tags")) else None

        return A.wait_until(check, f"the creation tags of volume {vid} to show", timeout, self.clock)

    def _other_az(self, vol: VolumeSection, volume: Dict[str, Any], result: VolumeResult, progress: Progress) -> Dict[str, Any]:
        vid, there, here = volume["VolumeId"], volume.get("AvailabilityZone"), self.identity.availability_zone
        if not vol.copy_across_az:
            raise VolumeError(f"volume {vid} is in {there} but this instance is in {here}; "
                              f"set copy_across_az = true to snapshot it and create a copy here")
        progress(f"volume {vol.name}: copying {vid} from {there} to {here} (snapshot, then create)")
        own = T.ownership(self.identity.instance_id, vol.name)
        snap_id = A.snapshot_for_copy(self.clients.ec2, vid, own, self.clock, self.snapshot_timeout)
        result.actions.append(f"snapshotted {vid} as {snap_id}")
        keep = {k: v for k, v in T.as_dict(volume.get("Tags")).items() if not k.startswith(("aws:", "spot-agent:"))}
        keep["spot-agent:copied-from"] = vid
        snap = A.describe_snapshot(self.clients.ec2, snap_id)
        return self._create(vol, result, snapshot=snap, extra_tags=keep,
                            purpose="persistent" if vol.tags else "volume", token_source=f"copy:{vid}")

    def _attach(self, vol: VolumeSection, volume: Dict[str, Any], result: VolumeResult, progress: Progress) -> str:
        ec2, iid = self.clients.ec2, self.identity.instance_id
        vid = volume["VolumeId"]
        att = A.attachment_to(volume, iid)
        if att is not None:
            name = att["Device"] if att.get("State") == "attached" else A.wait_attached(ec2, vid, iid, self.clock, vol.attach_timeout)
            self._save(vol.name, attach_device=name, attached=True)
            return name
        others = A.others_attached(volume, iid)
        if others and not (volume.get("MultiAttachEnabled") and vol.multi_attach):
            raise VolumeError(f"volume {vid} is attached to {', '.join(others)}; refusing to take it")
        with self._attach_lock:  # two volumes must not pick the same free device name
            name = A.pick_device_name(A.used_device_names(ec2, iid), vol.device_name)
            progress(f"volume {vol.name}: attaching {vid} as {name}")
            self._save(vol.name, attach_device=name)
            A.attach(ec2, vid, iid, name)
        name = A.wait_attached(ec2, vid, iid, self.clock, vol.attach_timeout)
        result.actions.append("attached")
        self._save(vol.name, attach_device=name, attached=True)
        if vol.delete_on_termination:
            A.set_delete_on_termination(ec2, iid, name, True)
        return name

    def _wait_for_device(self, vol: VolumeSection, vid: str, attach_device: str, progress: Progress) -> str:
        progress(f"volume {vol.name}: waiting for the block device of {vid}")
        last = {}

        def check() -> Optional[str]:
            # A refusal (a stale by-id link, a device with another serial) is not final: udev may still
            # be moving the link to the device that is about to appear, so keep looking until the timeout.
            res = resolve(vid, scan_tree(self.host.dev_root, self.host.sys_root), attach_device)
            last["res"] = res
            if res.refused and "refused" not in last:
                progress(f"volume {vol.name}: not using what was found yet: {res.refused}; waiting for the right device")
            if res.refused:
                last["refused"] = res.refused
            return res.device if res.found else None

        try:
            return A.wait_until(check, "x", vol.attach_timeout, self.clock, initial=0.05, cap=1.0)
        except A.AttachError:
            res = last.get("res")
            if res is not None and res.refused:
                raise VolumeError(f"refusing the device found for {vid}: {res.refused} "
                                  f"(still so after waiting {vol.attach_timeout:g}s for the right device)") from None
            looked = res.looked if res is not None else ""
            raise VolumeError(f"volume {vid} is attached as {attach_device} but no block device for it appeared "
                              f"within {vol.attach_timeout:g}s (looked for {looked})") from None

    def _instance_store_device(self, vol: VolumeSection, result: VolumeResult, progress: Progress) -> str:
        disks = instance_store_disks(scan_tree(self.host.dev_root, self.host.sys_root))
        md = os.path.exists(IS.md_device(vol.name))
        probes = [] if md else [probe(d, self.runner) for d in disks]
        plan = IS.plan(vol.name, disks, probes, IS.md_available())
        if plan.warning:
            result.warnings.append(plan.warning)
            progress(f"volume {vol.name}: {plan.warning}")
        if plan.kind != "single":
            progress(f"volume {vol.name}: RAID0 over {len(plan.disks)} instance-store disks")
        device = IS.build(plan, self.runner)
        if plan.kind == "raid0":
            result.actions.append("raid0 created")
        result.device = device
        self._save(vol.name, name=vol.name, volume_id="", device=device, disks=plan.disks)
        return device

    def _format_and_mount(self, vol: VolumeSection, device: str, vid: str, rec: Dict[str, Any], result: VolumeResult,
                          progress: Progress, from_snapshot: bool, read_only: bool, multi: bool) -> None:
        runner = self.runner
        mounts = F.read_mounts(self.mountinfo)
        dev = F.major_minor(device)
        here = F.mount_at(mounts, vol.mount)
        already = here is not None and here.major_minor == dev
        if not already:
            wait_settled(device, runner, self.clock, self.settle_timeout)
        size = _size(device)
        found = probe(device, runner)
        if found.pt_type:
            raise VolumeError(f"{device} ({vid or 'instance store'}) holds {found.describe()}; refusing to format or mount it")
        licensed = bool(vid) and rec.get("created_empty") == vid and rec.get("formatted") != vid
        if found.blank:
            if already:
                raise VolumeError(f"{vol.mount} has {device} mounted but the device probes blank")
            facts = FR.FormatFacts(name=vol.name, device=device, volume_id=vid, blank=True, instance_store=vol.instance_store,
                                   read_only=read_only, multi_attach=multi, from_snapshot=from_snapshot,
                                   created_empty=licensed, policy=vol.format_existing)
            decision = FR.decide(facts)
            if not decision.format and not decision.needs_scan:
                raise VolumeError(decision.reason)
            with held_exclusively(device, dev) as fd:
                again = probe(device, runner)
                if not again.blank:
                    raise VolumeError(f"volume {vol.name} ({vid or 'instance store'}) on {device} now holds {again.describe()}; "
                                      f"refusing to format it")
                if decision.needs_scan:
                    decision = FR.decide(facts, scan_written(fd, size))
                    if not decision.format:
                        raise VolumeError(decision.reason)
            progress(f"volume {vol.name}: formatting {device} as {vol.fs} ({decision.reason})")
            F.mkfs(device, vol.fs, again, runner, label=vol.name)
            result.actions.append("formatted")
            if vid:
                self._save(vol.name, formatted=vid)
            found = probe(device, runner)
        elif licensed:
            self._save(vol.name, formatted=vid)  # formatted before a crash: the licence is spent
        if found.blank:
            raise VolumeError(f"{device} shows no filesystem after mkfs.{vol.fs}")
        if found.fs_type != vol.fs:
            raise VolumeError(f"{device} ({vid or 'instance store'}) holds {found.describe()}, not {vol.fs} as configured; "
                              f"refusing to format or mount it")
        uuid = found.uuid
        if not uuid:
            raise VolumeError(f"{device} has a {found.fs_type} filesystem without a UUID")
        if not already and not read_only and vol.fs == "ext4":
            grown = F.grow_ext4_offline(device, size, runner)
            if grown:
                result.actions.append(f"grew ext4 {grown[0]} -> {grown[1]} bytes (offline)")
        holders = F.uuid_holders(uuid, runner)
        clone = len([h for h in holders if os.path.realpath(h) != os.path.realpath(device)]) > 0
        options = F.mount_options(vol.fs, vol.mount_options, read_only, multi, xfs_clone=clone or (from_snapshot and vol.fs == "xfs"))
        if multi and not already:
            runner.run(["blockdev", "--setro", device], timeout=30, check=False)
        outcome = F.mount(device, uuid, vol.mount, vol.fs, options, runner, by_uuid=not clone, mountinfo=self.mountinfo)
        if outcome == "mounted":
            result.actions.append("mounted")
        if not read_only:
            try:
                if vol.fs == "xfs":
                    grown = F.grow_xfs_online(vol.mount, size, runner)
                    if grown:
                        result.actions.append(f"grew xfs {grown[0]} -> {grown[1]} bytes (online)")
                elif already:
                    grown = F.grow_ext4_online(device, vol.mount, size, runner)
                    if grown:
                        result.actions.append(f"grew ext4 {grown[0]} -> {grown[1]} bytes (online)")
            except F.FilesystemError as exc:
                result.warnings.append(str(exc))
                progress(f"volume {vol.name}: {exc}")
        if vol.fstab:
            line = F.fstab_line(uuid, vol.mount, vol.fs, options, vol.name)
            if F.write_fstab(self.host.fstab, line, vol.mount, vol.name):
                result.actions.append(f"wrote {self.host.fstab}")
        if vol.mount_unit:
            path = F.write_mount_unit(self.host.unit_dir, F.mount_unit_text(uuid, vol.mount, vol.fs, options, vol.name), vol.mount)
            result.actions.append(f"wrote {path}")
        if vol.initialize and not rec.get("initialized"):
            progress(f"volume {vol.name}: reading every block of {device} once")

            def report(done: int, total: int) -> None:
                progress(f"volume {vol.name}: initialized {done * 100 // max(total, 1)}% of {total >> 20} MiB")

            init = initialize(device, report, self.clock)
            mib_s = init.throughput / (1 << 20)
            result.actions.append(f"initialized {init.bytes_read} bytes at {mib_s:.1f} MiB/s")
            progress(f"volume {vol.name}: initialized {init.bytes_read >> 20} MiB in {init.seconds:.1f}s ({mib_s:.1f} MiB/s)")
            self._save(vol.name, initialized=True, init_seconds=round(init.seconds, 3), init_mib_s=round(mib_s, 1))
        mv = MountedVolume(name=vol.name, volume_id=vid, device=device, mountpoint=vol.mount, fs=vol.fs,
                           read_only=read_only, multi_attach=multi, snapshot_on_drain=vol.snapshot_on_drain and not multi)
        self._save(vol.name, mounted=True, uuid=uuid, options=options, **mv.to_dict())
        result.device = device
        metrics.MOUNTED_VOLUMES.set(vol.name, vol.mount, device)


def _made_by_pending_create(rec: Dict[str, Any], volume: Dict[str, Any]) -> bool:
    """Is ``volume`` the empty volume our recorded, unfinished CreateVolume made? Only the nonce
    recorded before the call, found in the volume's own creation tags, says so."""
    nonce = rec.get("create_nonce") or ""
    if not nonce or not rec.get("creating") or volume.get("SnapshotId"):
        return False
    return T.as_dict(volume.get("Tags")).get(T.CREATE_NONCE) == nonce


def _size(device: str) -> int:
    from agent.volumes.probe import device_size

    return device_size(device)


def _source_key(vol: VolumeSection) -> str:
    """A short digest of where the config says this volume comes from: a record or a volume made for
    an earlier config (another snapshot_id, other tags) is not reused after the config changes."""
    import hashlib
    import json

    create = None
    if vol.create is not None:
        create = [vol.create.size_gib, vol.create.type]
    doc = [vol.volume_id, sorted(vol.tags.items()), vol.snapshot_id, sorted(vol.latest_snapshot.items()), create,
           vol.instance_store]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def _fmt_tags(tags: Dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(tags.items())) + "}"
