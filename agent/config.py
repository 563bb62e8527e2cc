"""The agent's configuration: one TOML file, typed sections, every key documented.

Each section is a dataclass; ``agent.schema`` turns the TOML into them and reports every problem with
its key path. Cross-field rules live in each section's ``validate``. Loading is pure (``parse``); the
file-permission rule (the agent runs hooks as root) is applied by ``load``.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from agent.events import EVENT_KINDS
from agent.schema import ConfigError, ConfigProblem, build
from agent.trust import untrusted_reason

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9 in CI
    import tomli as tomllib

DEFAULT_CONFIG_PATH = "/etc/spot-agent/agent.toml"

Problems = List[Tuple[str, str]]


def _absolute(value: str) -> Optional[str]:
    if value and not os.path.isabs(value):
        return f"must be an absolute path, got {value!r}"
    return None


def _url(value: str) -> Optional[str]:
    if value and not re.match(r"^https?://[^/\s]+", value):
        return f"must be an http:// or https:// URL, got {value!r}"
    return None


def _s3_url(value: str) -> Optional[str]:
    if not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", value):
        return f"must look like s3://bucket/prefix/, got {value!r}"
    return None


def _listen(value: str) -> Optional[str]:
    if not re.match(r"^(\[[0-9a-fA-F:]+\]|[^:\s]*):\d{1,5}$", value) or int(value.rsplit(":", 1)[1]) > 65535:
        return f"must be HOST:PORT (e.g. 0.0.0.0:8947), got {value!r}"
    return None


def _signal_name(value: str) -> Optional[str]:
    import signal

    name = value if value.startswith("SIG") else f"SIG{value}"
    if not hasattr(signal, name):
        return f"unknown signal {value!r}"
    return None


@dataclass
class AgentSection:
    state_dir: str = field(default="/var/lib/spot-agent", metadata={"check": _absolute, "doc": "where state survives restarts; must be root's own (not a symlink, not group/other-writable)"})
    socket: str = field(default="/run/spot-agent/agent.sock", metadata={"check": _absolute, "doc": "status socket (mode 0600); its directory must be root's own"})
    log_level: str = field(default="info", metadata={"choices": ["debug", "info", "warning", "error"], "doc": "log level"})
    run: str = field(default="", metadata={"doc": "run name used in tags; empty: the instance id"})


@dataclass
class IMDSSection:
    endpoint: str = field(default="http://169.254.169.254", metadata={"check": _url, "doc": "IMDS base URL; the simulator in tests"})
    poll_interval: float = field(default=1.0, metadata={"min": 0.05, "max": 60, "doc": "seconds between spot/instance-action polls"})
    slow_poll_interval: float = field(default=5.0, metadata={"min": 0.1, "max": 300, "doc": "seconds between polls of the other notice paths"})
    timeout: float = field(default=1.0, metadata={"min": 0.05, "max": 30, "doc": "total deadline per request (connect, headers, body), seconds"})
    token_ttl: int = field(default=21600, metadata={"min": 1, "max": 21600, "doc": "IMDSv2 session token TTL, seconds"})
    allow_imdsv1: bool = field(default=False, metadata={"doc": "fall back to IMDSv1 if the token PUT is refused (explicit opt-in)"})
    backoff_max: float = field(default=8.0, metadata={"min": 0.1, "max": 120, "doc": "cap of the exponential backoff after errors, seconds"})


@dataclass
class AWSSection:
    region: str = field(default="", metadata={"doc": "empty: take it from IMDS"})
    endpoint_url: str = field(default="", metadata={"check": _url, "doc": "empty: AWS; set for local S3/EC2 emulators"})
    endpoints: Dict[str, str] = field(default_factory=dict, metadata={"doc": "per-service endpoint overrides, e.g. { s3 = \"http://127.0.0.1:9000\" }"})
    max_attempts: int = field(default=5, metadata={"min": 1, "max": 20, "doc": "botocore retry attempts (standard mode) outside the drain; the drain retries within its step budgets"})

    def validate(self) -> Problems:
        out: Problems = []
        for name, url in self.endpoints.items():
            if name not in ("s3", "ec2", "autoscaling"):
                out.append((f"endpoints.{name}", "unknown service; use s3, ec2 or autoscaling"))
            elif _url(url):
                out.append((f"endpoints.{name}", _url(url) or ""))
        return out


@dataclass
class HostSection:
    dev_root: str = field(default="/dev", metadata={"check": _absolute, "doc": "root of the device tree"})
    sys_root: str = field(default="/sys", metadata={"check": _absolute, "doc": "root of sysfs"})
    fstab: str = field(default="/etc/fstab", metadata={"check": _absolute, "doc": "fstab written by volumes with fstab = true"})
    unit_dir: str = field(default="/etc/systemd/system", metadata={"check": _absolute, "doc": "where mount units are written"})
    proc_root: str = field(default="/proc", metadata={"check": _absolute, "doc": "procfs (the boot id: records belong to one boot)"})
    run_root: str = field(default="/run", metadata={"check": _absolute, "doc": "where run_root/systemd/system says systemd is PID 1"})
    systemctl: str = field(default="systemctl", metadata={"doc": "the systemctl asked for the system state (is-system-running)"})


@dataclass
class HookSection:
    on: List[str] = field(metadata={"choices": list(EVENT_KINDS), "doc": "event kinds that run this hook"})
    command: List[str] = field(metadata={"doc": "argv, never a shell string; argv[0] absolute"})
    timeout: float = field(default=60.0, metadata={"min": 0.1, "max": 3600, "doc": "seconds before the process group is killed"})
    user: str = field(default="", metadata={"doc": "run as this user instead of root"})
    env: Dict[str, str] = field(default_factory=dict, metadata={"doc": "extra environment"})

    def validate(self) -> Problems:
        out: Problems = []
        if not self.on:
            out.append(("on", "must name at least one event kind"))
        if not self.command:
            out.append(("command", "must not be empty"))
        elif not os.path.isabs(self.command[0]):
            out.append(("command[0]", f"must be an absolute path, got {self.command[0]!r}"))
        return out


@dataclass
class CreateSpec:
    size_gib: int = field(metadata={"min": 1, "max": 65536, "doc": "size of a new volume, GiB (from a snapshot: at least the snapshot's size)"})
    type: str = field(default="gp3", metadata={"choices": ["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"], "doc": "EBS volume type"})
    iops: int = field(default=0, metadata={"min": 0, "doc": "0: the type's default (io1/io2 need a value)"})
    throughput: int = field(default=0, metadata={"min": 0, "doc": "MiB/s for gp3; 0: default"})
    encrypted: bool = field(default=True, metadata={"doc": "encrypt the new volume"})
    kms_key_id: str = field(default="", metadata={"doc": "KMS key for encryption; empty: the account's EBS default key"})


@dataclass
class VolumeSection:
    name: str = field(metadata={"check": lambda v: None if re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", v) else f"must be 1-63 letters, digits, '.', '_' or '-', got {v!r}",
                                "doc": "name used in state, tags (spot-agent:volume-name), metrics and the CLI"})
    mount: str = field(metadata={"check": lambda v: _absolute(v) or (None if v != "/" else "must not be /"), "doc": "absolute mount point, created if missing"})
    fs: str = field(default="xfs", metadata={"choices": ["ext4", "xfs"], "doc": "filesystem made on a blank volume and expected on one with data"})
    format_existing: str = field(default="never", metadata={"choices": ["never", "if-never-written"],
                                 "doc": "a volume spot-agent did not create empty that shows no filesystem: never = refuse it; if-never-written = format it when its first and last MiB and 128 sampled blocks are all zeros"})
    volume_id: str = field(default="", metadata={"check": lambda v: None if not v or re.match(r"^vol-[0-9a-f]{8,17}$", v) else f"not a volume id: {v!r}", "doc": "source: this volume"})
    tags: Dict[str, str] = field(default_factory=dict, metadata={"doc": "source: an available volume with these tags in this AZ (in-use ones are ignored)"})
    snapshot_id: str = field(default="", metadata={"check": lambda v: None if not v or re.match(r"^snap-[0-9a-f]{8,17}$", v) else f"not a snapshot id: {v!r}", "doc": "source: a new volume made from this snapshot"})
    latest_snapshot: Dict[str, str] = field(default_factory=dict, metadata={"doc": "source: a new volume from the newest completed snapshot with these tags"})
    create: Optional[CreateSpec] = field(default=None, metadata={"doc": "source: a new empty volume; with tags or latest_snapshot, what to create when nothing matches (absent: fail)"})
    instance_store: bool = field(default=False, metadata={"doc": "source: NVMe instance-store disks as scratch (RAID0 when several and md is available)"})
    delete_on_termination: bool = field(default=False, metadata={"doc": "delete the volume when the instance terminates (default: the data outlives it)"})
    read_only: bool = field(default=False, metadata={"doc": "mount read-only; never formatted or grown"})
    multi_attach: bool = field(default=False, metadata={"doc": "io2 multi-attach: mounted read-only, never formatted or frozen"})
    required: bool = field(default=True, metadata={"doc": "a required volume that fails blocks READY; an optional one is only reported"})
    initialize: bool = field(default=False, metadata={"doc": "read every block once before READY (volumes from snapshots load lazily)"})
    mount_options: List[str] = field(default_factory=list, metadata={"doc": "extra mount -o options, e.g. [\"noatime\"]"})
    fstab: bool = field(default=False, metadata={"doc": "write an fstab entry (UUID=, nofail) for reboots"})
    mount_unit: bool = field(default=False, metadata={"doc": "write a systemd .mount unit (nofail) into [host] unit_dir"})
    copy_across_az: bool = field(default=False, metadata={"doc": "a volume found in another AZ: snapshot it and create a copy here (else: an error)"})
    snapshot_on_drain: bool = field(default=True, metadata={"doc": "take a frozen-filesystem snapshot of it in the drain"})
    device_name: str = field(default="", metadata={"check": lambda v: None if not v or re.match(r"^/dev/(sd|xvd)[b-z]$", v) else f"must look like /dev/sdf, got {v!r}",
                                                   "doc": "preferred attach name, e.g. /dev/sdf; empty or taken: the first free of /dev/sdf../dev/sdp"})
    attach_timeout: float = field(default=120.0, metadata={"min": 1, "doc": "seconds to wait for the attachment and again for the block device"})
    pending_snapshot_wait: float = field(default=300.0, metadata={"min": 0, "max": 86400, "doc": "latest_snapshot / snapshot_id: seconds to wait for a newer snapshot still pending (the last drain's) to complete before using the newest completed one; 0: do not wait"})

    def sources(self) -> List[str]:
        named = []
        if self.volume_id:
            named.append("volume_id")
        if self.tags:
            named.append("tags")
        if self.snapshot_id:
            named.append("snapshot_id")
        if self.latest_snapshot:
            named.append("latest_snapshot")
        if self.instance_store:
            named.append("instance_store")
        return named

    def validate(self) -> Problems:
        out: Problems = []
        named = self.sources()
        if len(named) > 1:
            out.append(("", f"exactly one source allowed, got {' and '.join(named)}"))
        if not named and self.create is None:
            out.append(("", "needs a source: volume_id, tags, snapshot_id, latest_snapshot, create or instance_store"))
        if self.create is not None and named and named[0] not in ("tags", "latest_snapshot"):
            out.append(("create", f"can only be a fallback for tags or latest_snapshot, not {named[0]}"))
        if self.multi_attach and not self.read_only:
            out.append(("read_only", "multi_attach volumes must be read_only = true"))
        if self.copy_across_az and named and named[0] not in ("volume_id", "tags"):
            out.append(("copy_across_az", f"only applies to volume_id or tags, not {named[0]}"))
        if self.instance_store and (self.read_only or self.multi_attach):
            out.append(("read_only" if self.read_only else "multi_attach", "instance_store scratch cannot be read-only"))
        if self.format_existing != "never":
            if self.read_only or self.multi_attach:
                out.append(("format_existing", "a read-only or multi-attach volume is never formatted"))
            elif named and named[0] not in ("volume_id", "tags"):
                out.append(("format_existing", f"only applies to volume_id or tags, not {named[0]} "
                                               f"(a volume from a snapshot is never formatted; one spot-agent creates empty always is)"))
            elif not named:
                out.append(("format_existing", "only applies to volume_id or tags (a volume spot-agent creates empty is always formatted)"))
        return out


@dataclass
class DatasetSection:
    source: str = field(metadata={"check": _s3_url})
    dest: str = field(metadata={"check": _absolute})
    include: List[str] = field(default_factory=list, metadata={"doc": "only keys whose relative path (or base name) matches one of these globs"})
    exclude: List[str] = field(default_factory=list, metadata={"doc": "skip keys matching these globs (exclude wins)"})
    delete: bool = field(default=False, metadata={"doc": "remove local files that are not in S3"})
    background: bool = field(default=False, metadata={"doc": "true: don't hold READY for this dataset"})


_SHARD_RE = re.compile(r"^(\d{1,6}|env|env:[A-Za-z_][A-Za-z0-9_]{0,63})$")


@dataclass
class GangSection:
    size: int = field(metadata={"min": 1, "max": 4096, "doc": "number of shards (nodes) that save each step"})
    shard: str = field(default="env", metadata={
        "check": lambda v: None if _SHARD_RE.match(v) else f"must be a shard index, \"env\" or \"env:NAME\", got {v!r}",
        "doc": "this node's shard index: a number, \"env:NAME\", or \"env\" (SLURM_NODEID, GROUP_RANK, NODE_RANK)"})


@dataclass
class CheckpointSection:
    dir: str = field(metadata={"check": _absolute})
    s3: str = field(metadata={"check": _s3_url})
    interval: float = field(default=300.0, metadata={"min": 0, "doc": "seconds between background uploads; 0 = only on drain"})
    settle: float = field(default=10.0, metadata={"min": 0, "doc": "a file counts as complete when unmodified this long"})
    marker: str = field(default="", metadata={"doc": "marker file name: when set, a directory is complete once it holds this file"})
    keep: int = field(default=5, metadata={"min": 1, "doc": "committed checkpoints to keep in S3"})
    restore: bool = field(default=True, metadata={"doc": "at boot, restore the newest committed checkpoint before READY"})
    gang: Optional[GangSection] = field(default=None, metadata={"doc": "a multi-node checkpoint: every shard saves each step; restore takes the newest complete step"})

    def validate(self) -> Problems:
        if self.gang is not None and not self.marker:
            return [("marker", "a gang checkpoint needs marker: the file that commits one shard's step directory")]
        return []


@dataclass
class TransferSection:
    concurrency: int = field(default=16, metadata={"min": 1, "max": 256, "doc": "parallel requests"})
    part_size: int = field(default=8 * 1024 * 1024, metadata={"min": 5 * 1024 * 1024, "doc": "bytes per ranged GET / multipart part"})
    multipart_threshold: int = field(default=16 * 1024 * 1024, metadata={"min": 5 * 1024 * 1024})
    max_bandwidth: int = field(default=0, metadata={"min": 0, "doc": "bytes per second; 0 = unlimited"})
    checksum: str = field(default="sha256", metadata={"choices": ["sha256", "crc32", "crc32c"], "doc": "checksum S3 verifies on upload"})
    engine: str = field(default="auto", metadata={"choices": ["auto", "botocore"], "doc": "GET path: auto = presigned GETs over urllib3 (less CPU), botocore = get_object"})


@dataclass
class WebhookSection:
    url: str = field(metadata={"check": _url, "doc": "POSTed a JSON body (event, instance, deadline, budget)"})
    timeout: float = field(default=5.0, metadata={"min": 0.1, "doc": "per-attempt timeout; attempts repeat until a 2xx or the notify budget ends"})
    headers: Dict[str, str] = field(default_factory=dict, metadata={"doc": "extra request headers"})


@dataclass
class WorkloadSection:
    profile: str = field(default="generic", metadata={"choices": ["generic", "torchrun", "lightning", "huggingface"],
                                                      "doc": "a set of defaults for signal, kill_whom, complete and env (agent/drain/profiles.py)"})
    unit: str = field(default="", metadata={"doc": "systemd unit to signal (systemctl kill --signal=)"})
    pidfile: str = field(default="", metadata={"check": _absolute, "doc": "process to signal, found by pidfile"})
    signal: str = field(default="", metadata={"check": lambda v: _signal_name(v) if v else None, "doc": "signal sent to the unit or pidfile process; empty: the profile's (SIGTERM)"})
    kill_whom: str = field(default="", metadata={"choices": ["", "main", "control", "all"], "doc": "main: the launcher only; all: every process of the unit (pidfile: its process tree) at once; empty: the profile's"})
    webhook: Optional[WebhookSection] = None
    marker: str = field(default="", metadata={"check": _absolute, "doc": "file whose appearance means the checkpoint is written"})
    wait: str = field(default="auto", metadata={"choices": ["auto", "hooks", "process", "marker", "none"], "doc": "what 'checkpoint written' means"})
    complete: List[str] = field(default_factory=list, metadata={"choices": ["hooks", "process", "marker", "commit", "ack"],
                                                                "doc": "completion conditions (overrides wait); empty: the profile's"})
    complete_mode: str = field(default="", metadata={"choices": ["", "all", "any"], "doc": "all conditions must hold, or any one; empty: the profile's"})
    commit_dir: str = field(default="", metadata={"check": _absolute, "doc": "where the job writes step directories; empty: the first [[checkpoints]] dir"})
    commit_file: str = field(default="", metadata={"check": lambda v: None if "/" not in v and v not in (".", "..") else f"must be a file name, got {v!r}",
                                                   "doc": "file that commits a step directory (torchrun: .metadata); empty: the profile's"})
    commit_settle: float = field(default=2.0, metadata={"min": 0, "max": 600, "doc": "a committed step counts once its files are unchanged this long, seconds"})
    notice_file: str = field(default="", metadata={"check": _absolute, "doc": "the notice as JSON for the job; empty: notice.json next to [agent] socket"})
    ack_dir: str = field(default="", metadata={"check": _absolute, "doc": "where the job's helper acknowledges its checkpoint; empty: ack/ next to [agent] socket"})
    env_file: str = field(default="", metadata={"check": _absolute, "doc": "environment for the workload unit (EnvironmentFile=); empty: workload.env next to [agent] socket"})
    env: Dict[str, str] = field(default_factory=dict, metadata={"doc": "entries added to or replacing the profile's env file entries; an empty value drops one"})
    checkpoint_timeout: float = field(default=60.0, metadata={"min": 0, "doc": "longest wait for the workload's checkpoint, seconds"})

    def validate(self) -> Problems:
        return [(f"env.{k}", "must be an environment variable name (letters, digits, _)")
                for k in self.env if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)] + \
               [(f"env.{k}", "must not hold a newline or NUL") for k, v in self.env.items() if "\n" in v or "\0" in v]


@dataclass
class LifecycleSection:
    enabled: bool = field(default=True, metadata={"doc": "complete the Auto Scaling lifecycle action"})
    group: str = field(default="", metadata={"doc": "Auto Scaling group; empty: found via the API"})
    hook: str = field(default="", metadata={"doc": "lifecycle hook name; empty: found via the API"})
    heartbeat_interval: float = field(default=30.0, metadata={"min": 1, "doc": "seconds between RecordLifecycleActionHeartbeat calls while draining"})


@dataclass
class DrainSection:
    margin: float = field(default=10.0, metadata={"min": 0, "doc": "seconds kept free before the deadline"})
    scheduled_window: float = field(default=900.0, metadata={"min": 0, "doc": "a scheduled stop/retirement due within this many seconds drains"})
    shutdown_budget: float = field(default=0.0, metadata={"min": 0, "doc": "SIGTERM budget, seconds; 0: the unit's TimeoutStopSec"})
    on_sigterm: str = field(default="auto", metadata={"choices": ["auto", "drain", "exit"], "doc": "what SIGTERM/SIGINT does: auto drains only when systemd reports the system stopping"})
    rebalance: str = field(default="checkpoint", metadata={"choices": ["checkpoint", "drain", "none"], "doc": "what a rebalance recommendation does"})
    crash_consistent: bool = field(default=False, metadata={"doc": "snapshot all volumes at once with CreateSnapshots"})
    keep_snapshots: int = field(default=5, metadata={"min": 1, "doc": "snapshots kept per volume name and run ([agent] run)"})
    notify_timeout: float = field(default=5.0, metadata={"min": 0, "doc": "budget of the notify step (signal, webhook retries), seconds"})
    snapshot_reserve: float = field(default=5.0, metadata={"min": 0, "doc": "seconds always kept for the snapshot step"})
    upload_reserve: float = field(default=15.0, metadata={"min": 0, "doc": "seconds always kept for the S3 checkpoint upload"})
    lifecycle_reserve: float = field(default=2.0, metadata={"min": 0, "doc": "seconds always kept for CompleteLifecycleAction"})
    freeze_timeout: float = field(default=10.0, metadata={"min": 0.1, "max": 60, "doc": "longest a filesystem stays frozen waiting for CreateSnapshot"})
    snapshot_spacing: float = field(default=15.0, metadata={"min": 0, "max": 300, "doc": "seconds between two snapshots of one volume (EC2 allows one per 15 s); 0: no spacing, for endpoints without the limit"})
    rebalance_budget: float = field(default=120.0, metadata={"min": 1, "doc": "seconds the rebalance plan may take"})
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    lifecycle: LifecycleSection = field(default_factory=LifecycleSection)


_COMMIT_TEMPLATE = re.compile(r"^/[^{}]*(\{(job_id|node)\}[^{}]*)*$")


@dataclass
class SlurmSection:
    enabled: bool = field(default=True, metadata={"doc": "act on Slurm when scontrol is present and knows this node (false: never)"})
    node: str = field(default="", metadata={"check": lambda v: None if not v or re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", v) else f"not a Slurm node name: {v!r}",
                                            "doc": "this node's Slurm name; empty: SLURMD_NODENAME or the short hostname"})
    conf: str = field(default="", metadata={"check": _absolute, "doc": "slurm.conf for the Slurm commands (SLURM_CONF); empty: Slurm's default"})
    bin_dir: str = field(default="", metadata={"check": _absolute, "doc": "directory of scontrol, squeue, scancel; empty: PATH"})
    signal: str = field(default="USR1", metadata={"check": _signal_name, "doc": "signal sent to every job on this node, on all its nodes (scancel --signal --full)"})
    requeue: bool = field(default=False, metadata={"doc": "scontrol requeue each signalled job after the checkpoint (false: the job requeues itself)"})
    commit_file: str = field(default="", metadata={
        "check": lambda v: None if not v or _COMMIT_TEMPLATE.match(v) else f"must be an absolute path with only {{job_id}} and {{node}} placeholders, got {v!r}",
        "doc": "file each node of a job writes when its checkpoint is committed, e.g. /shared/ckpt/{job_id}/{node}.done; the wait step waits for all"})
    command_timeout: float = field(default=5.0, metadata={"min": 0.1, "max": 60, "doc": "seconds per Slurm command"})
    rebalance_drain: bool = field(default=False, metadata={"doc": "on a rebalance recommendation, drain this node in Slurm (no new jobs; running jobs untouched)"})
    rebalance_resume_after: float = field(default=1800.0, metadata={"min": 0, "doc": "resume the node this long after a rebalance drain if no interruption followed; 0: never"})


@dataclass
class RaySection:
    enabled: bool = field(default=False, metadata={"doc": "drain this Ray node (reason PREEMPTION, the seconds left) on a terminal notice"})
    command: List[str] = field(default_factory=lambda: ["ray"], metadata={"doc": "argv of the ray CLI, e.g. [\"/opt/ray/bin/ray\"]"})
    python: str = field(default="", metadata={"check": _absolute, "doc": "Python of the Ray install, for the node-id lookup; empty: python next to command[0]"})
    address: str = field(default="", metadata={"check": lambda v: None if not v or _listen(v) is None else f"must be HOST:PORT of the GCS, got {v!r}",
                                               "doc": "the cluster's GCS address HOST:PORT (required when enabled)"})
    node_id: str = field(default="", metadata={"check": lambda v: None if not v or re.match(r"^[0-9a-f]{56}$", v) else f"not a Ray node id (56 hex digits): {v!r}",
                                               "doc": "this node's Ray node id; empty: looked up by node_name"})
    node_name: str = field(default="", metadata={"doc": "this node's Ray node name (ray start --node-name; Ray's default is the node's IP); used when node_id is empty"})
    on_rebalance: bool = field(default=False, metadata={"doc": "drain the Ray node on a rebalance recommendation too"})
    command_timeout: float = field(default=15.0, metadata={"min": 0.5, "max": 120, "doc": "seconds per ray command"})

    def validate(self) -> Problems:
        out: Problems = []
        if self.enabled and not self.address:
            out.append(("address", "required when [ray] enabled = true"))
        if self.enabled and not (self.node_id or self.node_name):
            out.append(("node_name", "set node_name or node_id so the agent knows which Ray node is this one"))
        if not self.command:
            out.append(("command", "must not be empty"))
        return out


@dataclass
class FleetSection:
    launch_lifecycle: bool = field(default=True, metadata={"doc": "complete a launching lifecycle hook: CONTINUE at READY, ABANDON when startup fails"})
    launch_hook: str = field(default="", metadata={"doc": "the launching hook's name; empty: found via the API"})
    launch_heartbeat_interval: float = field(default=60.0, metadata={"min": 1, "doc": "seconds between heartbeats of the launching hook while startup runs"})
    rebalance_window: float = field(default=3600.0, metadata={"min": 1, "doc": "a rebalance recommendation with no interruption within this long counts as none followed"})


@dataclass
class MetricsSection:
    enabled: bool = True
    listen: str = field(default="0.0.0.0:8947", metadata={"check": _listen, "doc": "HOST:PORT of /metrics, /healthz, /readyz"})
    tls_cert: str = field(default="", metadata={"check": _absolute})
    tls_key: str = field(default="", metadata={"check": _absolute})

    def validate(self) -> Problems:
        if bool(self.tls_cert) != bool(self.tls_key):
            return [("tls_key" if self.tls_cert else "tls_cert", "tls_cert and tls_key go together")]
        return []


@dataclass
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    imds: IMDSSection = field(default_factory=IMDSSection)
    aws: AWSSection = field(default_factory=AWSSection)
    host: HostSection = field(default_factory=HostSection)
    hooks: List[HookSection] = field(default_factory=list)
    volumes: List[VolumeSection] = field(default_factory=list)
    datasets: List[DatasetSection] = field(default_factory=list)
    checkpoints: List[CheckpointSection] = field(default_factory=list)
    transfer: TransferSection = field(default_factory=TransferSection)
    drain: DrainSection = field(default_factory=DrainSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    ray: RaySection = field(default_factory=RaySection)
    fleet: FleetSection = field(default_factory=FleetSection)

    def validate(self) -> Problems:
        out: Problems = []
        seen_names: Dict[str, int] = {}
        seen_mounts: Dict[str, int] = {}
        for i, vol in enumerate(self.volumes):
            if vol.name in seen_names:
                out.append((f"volumes[{i}].name", f"duplicate of volumes[{seen_names[vol.name]}].name"))
            seen_names.setdefault(vol.name, i)
            mount = os.path.normpath(vol.mount)
            if mount in seen_mounts:
                out.append((f"volumes[{i}].mount", f"{vol.mount} is already the mount of volumes[{seen_mounts[mount]}]"))
            seen_mounts.setdefault(mount, i)
        dests: Dict[str, str] = {}
        for i, ds in enumerate(self.datasets):
            d = os.path.normpath(ds.dest)
            if d in dests:
                out.append((f"datasets[{i}].dest", f"already the dest of {dests[d]}"))
            dests.setdefault(d, f"datasets[{i}]")
        for i, ck in enumerate(self.checkpoints):
            d = os.path.normpath(ck.dir)
            if d in dests:
                out.append((f"checkpoints[{i}].dir", f"already the dest of {dests[d]}"))
        return out


def parse(text: str, source: str = "") -> Config:
    """Parse TOML text into a :class:`Config`; raises :class:`ConfigError` with every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("", f"not valid TOML: {exc}")], source) from None
    return build(Config, data, source)


def insecure_reason(path: str) -> Optional[str]:
    """Why ``path`` must not be trusted by a root agent, or None.

    Like sshd's StrictModes, but per component (``agent.trust``): the file, every directory above it
    and every symlink on the way (and in each link's target) must be owned by root, and none of them
    writable by group or others; otherwise a local user could make the agent run code as root.
    """
    return untrusted_reason(os.path.abspath(path), kind="file")


def load(path: str, strict_permissions: Optional[bool] = None) -> Config:
    """Read, parse and permission-check the config file.

    ``strict_permissions`` defaults to "when running as root": the rule protects a root agent, and an
    unprivileged user rehearsing with the simulator owns their own files.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read config: {exc.strerror}")], path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem("", f"not UTF-8 at byte {exc.start}")], path) from None
    config = parse(text, path)
    if strict_permissions is None:
        strict_permissions = os.geteuid() == 0
    if strict_permissions:
        problems = []
        reason = insecure_reason(path)
        if reason:
            problems.append(ConfigProblem("", f"refusing an unsafe config file: {reason}"))
        for i, hook in enumerate(config.hooks):
            reason = insecure_reason(hook.command[0])
            if reason:
                problems.append(ConfigProblem(f"hooks[{i}].command[0]", f"refusing an unsafe hook executable: {reason}"))
        if problems:
            raise ConfigError(problems, path)
    return config


def to_dict(obj: Any) -> Any:
    """Plain data for ``status --json`` and ``check-config --json``."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
