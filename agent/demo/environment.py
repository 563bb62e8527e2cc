"""The embedded cloud the demo's instances live in, and everything needed to take it down again.

One process hosts: moto's S3/EC2/Auto Scaling server on 127.0.0.1 (with the lifecycle calls moto
lacks, from :mod:`agent.sim.localaws`), and, as root, :mod:`agent.sim.blockdevs` so EBS volumes are
real loop devices with the device tree a Nitro instance shows. Not root, there are no block devices:
the checkpoint "volume" is a plain directory, nothing is snapshotted, and the second instance gets its
checkpoint back from S3 only. :meth:`DemoEnvironment.simulated` says which, in one line per component.

Teardown (:meth:`DemoEnvironment.close`) must work after any failure and after Ctrl-C: it thaws and
unmounts everything under the work directory, detaches every loop device backed by a file there, and
stops the servers. Processes are stopped by their owners (:mod:`agent.demo.instance`) first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

MiB = 1024 * 1024

BUCKET = "spot-agent-demo"
DATASET_PREFIX = "datasets/tiny-corpus/"
CHECKPOINT_PREFIX = "checkpoints/demo-run/"
GROUP = "demo-train-asg"
HOOK = "drain-before-terminate"
TEMPLATE = "demo-train-template"
REGION = "us-east-1"
AZ = "us-east-1a"
INSTANCE_TYPE = "g5.xlarge"
RUN = "demo-run"

# A few MB of "training data": deterministic, so a second run and the tests see the same bytes.
DATASET_FILES: Tuple[Tuple[str, int], ...] = (
    ("train/shard-00000.bin", 1 * MiB), ("train/shard-00001.bin", 1 * MiB), ("train/shard-00002.bin", 1 * MiB),
    ("val/shard-00000.bin", 512 * 1024), ("vocab.txt", 64 * 1024), ("README.txt", 300),
)


def demo_env_vars() -> Dict[str, str]:
    """What every client in the demo needs: dummy credentials, and never the real IMDS or a proxy."""
    return {
        "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }


def apply_env() -> None:
    for key, value in demo_env_vars().items():
        os.environ[key] = value
    os.environ.pop("AWS_PROFILE", None)
    for key in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        os.environ.pop(key, None)


def block_devices_unavailable() -> str:
    """Why loop devices cannot be used here ("" when they can)."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount", "fsfreeze", "blkid"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop devices unavailable in this container)"
    return ""


def dataset_bytes(rel: str, size: int) -> bytes:
    """The content of one dataset file: a SHA-256 counter stream seeded by its name."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{rel}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(root: str, skip_hidden: bool = True) -> Dict[str, str]:
    """relative path -> sha256 of every regular file under ``root`` (hidden names and lost+found skipped)."""
    out: Dict[str, str] = {}
    if not os.path.isdir(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "lost+found" and not (skip_hidden and d.startswith(".")))
        for name in sorted(filenames):
            if skip_hidden and name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out[os.path.relpath(path, root)] = sha256_file(path)
    return out


def mounts_under(root: str) -> List[str]:
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(root.rstrip("/") + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def loops_backed_by(root: str) -> List[str]:
    if shutil.which("losetup") is None:
        return []
    res = subprocess.run(["losetup", "-a", "-n", "-l", "-O", "NAME,BACK-FILE"], capture_output=True, text=True)
    out = []
    for line in res.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(root.rstrip("/") + "/"):
            out.append(parts[0])
    return out


def release_host_resources(root: str) -> List[str]:
    """Thaw and unmount everything mounted under ``root``, detach loops backed by files under it.

    Returns what was done, for the demo's last lines. Safe to call twice and after any failure.
    """
    done = []
    if os.geteuid() != 0:
        return done
    for mp in mounts_under(root):
        subprocess.run(["fsfreeze", "--unfreeze", mp], capture_output=True)  # a frozen fs blocks umount
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)
        done.append(f"unmounted {mp}")
    for loop in loops_backed_by(root):
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        done.append(f"detached {loop}")
    return done


@dataclass
class DemoEnvironment:
    """The cloud side of the demo. ``block_devices`` None: loop devices when possible."""

    workdir: str = ""
    block_devices: Optional[bool] = None
    volume_mib: int = 256
    aws: Any = None  # an already running agent.sim.localaws.LocalAWS (the tests share one); None: start one
    aws_mode: str = "strict"  # the LocalAWS started here: "strict" (agent.sim.strict, fast time scale) or "instant"
    keep: bool = False
    mode_reason: str = ""
    _own_workdir: bool = False
    _own_aws: bool = False
    blockdevs: Any = None
    clients: Any = None
    dataset_hashes: Dict[str, str] = field(default_factory=dict)
    cleanup_log: List[str] = field(default_factory=list)
    _closed: bool = False

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "DemoEnvironment":
        apply_env()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        if not self.workdir:
            self.workdir = tempfile.mkdtemp(prefix="spot-agent-demo-")
            self._own_workdir = True
        else:
            os.makedirs(self.workdir, exist_ok=True)
        self.workdir = os.path.realpath(self.workdir)
        why_not = block_devices_unavailable()
        if self.block_devices is None:
            self.block_devices = not why_not
            self.mode_reason = why_not
        elif self.block_devices and why_not:
            raise RuntimeError(f"loop-device volumes need root and util-linux/e2fsprogs: {why_not}")
        if self.aws is None:
            from agent.sim.localaws import LocalAWS
            from agent.sim.strict import StrictSettings

            strict = self.aws_mode == "strict"
            self.aws = LocalAWS(strict=strict, settings=StrictSettings.fast() if strict else None).start()
            self._own_aws = True
        if self.block_devices:
            from agent.sim.blockdevs import LocalBlockDevices

            self.blockdevs = LocalBlockDevices(os.path.join(self.workdir, "ebs"), self.dev_root, self.sys_root,
                                               size_cap=self.volume_mib * MiB, bytes_per_gib=self.volume_mib * MiB)
            self.blockdevs.install()
        from agent.aws import make_clients
        from agent.config import AWSSection

        from agent.sim.localaws import ORACLE_KEY

        # the environment's own view: the truth, past the strict model (the agents see the strict one)
        self.clients = make_clients(AWSSection(endpoint_url=self.aws.url), REGION, credentials=(ORACLE_KEY, "demo"))
        return self

    @property
    def strict(self) -> bool:
        return getattr(self.aws, "strict", None) is not None

    def begin_termination(self, instance_id: str) -> List[str]:
        """Auto Scaling starts terminating ``instance_id`` (it got the spot interruption, or scales in):
        on the strict local AWS the instance now waits in Terminating:Wait for the lifecycle hook."""
        begin = getattr(self.aws, "begin_termination", None)
        return begin(instance_id) if begin is not None else []

    def refused_calls(self, code: str) -> List[Dict[str, Any]]:
        """The agents' calls the strict local AWS refused with ``code`` (none on the instant one)."""
        model = getattr(self.aws, "strict", None)
        return [c for c in model.calls_by() if c["code"] == code] if model is not None else []

    @property
    def dev_root(self) -> str:
        return os.path.join(self.workdir, "host", "dev")

    @property
    def sys_root(self) -> str:
        return os.path.join(self.workdir, "host", "sys")

    @property
    def aws_url(self) -> str:
        return self.aws.url

    def simulated(self, s3_checkpoints: bool = True) -> List[str]:
        """One line per component: what is real here and what is simulated."""
        lines = [
            "IMDS: the project's simulator on 127.0.0.1 (IMDSv2 tokens enforced), one per instance",
            ("S3, EC2, Auto Scaling: moto in-process on " + self.aws_url + ", STRICT (agent.sim.strict, on a "
             "shorter time scale): volumes creating, attachments attaching, snapshots pending, new resources "
             "NotFound and untagged for a moment, token buckets, one snapshot per volume per 15 s, lifecycle "
             "actions only in Terminating:Wait") if self.strict else
            ("S3, EC2, Auto Scaling: moto in-process on " + self.aws_url + ", INSTANT (every call succeeds at once; "
             "plus CompleteLifecycleAction)"),
        ]
        if self.block_devices:
            lines.append(f"EBS volumes: real loop devices ({self.volume_mib} MiB sparse files) with a Nitro-like "
                         "/dev/disk/by-id and sysfs tree; real mkfs.ext4, mount and fsfreeze")
        else:
            then = ("the checkpoint comes back from S3" if s3_checkpoints
                    else "and this build has no S3 checkpoint store, so nothing carries the checkpoint over")
            lines.append(f"EBS volumes: SIMULATED as plain directories ({self.mode_reason or 'asked for'}): no mkfs, "
                         f"mount, fsfreeze or snapshot; {then}")
        lines.append("the agent: the real `spot-agent run`, one process per instance; the workload: a toy trainer")
        return lines

    def close(self) -> None:
        """Release loop devices and mounts, stop the servers, remove the work directory (unless kept)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.blockdevs is not None:
                self.cleanup_log += release_host_resources(self.workdir)
                try:
                    self.blockdevs.cleanup()
                except Exception as exc:  # noqa: BLE001 - keep releasing the rest
                    self.cleanup_log.append(f"block device cleanup: {exc}")
            self.cleanup_log += release_host_resources(self.workdir)
        finally:
            if self._own_aws and self.aws is not None:
                try:
                    self.aws.stop()
                except Exception:  # noqa: BLE001
                    pass
            if self.workdir and not self.keep and self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            elif self.workdir and not self.keep:
                for name in os.listdir(self.workdir) if os.path.isdir(self.workdir) else []:
                    if not mounts_under(os.path.join(self.workdir, name)):
                        shutil.rmtree(os.path.join(self.workdir, name), ignore_errors=True)

    def __enter__(self) -> "DemoEnvironment":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the cloud's contents -------------------------------------------------------------------

    def seed_dataset(self, extra: Optional[Dict[str, bytes]] = None) -> Dict[str, str]:
        """Put the dataset under s3://BUCKET/DATASET_PREFIX; returns relative key -> sha256."""
        s3 = self.clients.s3
        try:
            s3.create_bucket(Bucket=BUCKET)
        except Exception as exc:  # noqa: BLE001 - already there when the tests share moto
            if "BucketAlready" not in str(exc):
                raise
        hashes = {}
        for rel, size in DATASET_FILES:
            body = dataset_bytes(rel, size)
            s3.put_object(Bucket=BUCKET, Key=DATASET_PREFIX + rel, Body=body)
            hashes[rel] = hashlib.sha256(body).hexdigest()
        for key, body in (extra or {}).items():
            s3.put_object(Bucket=BUCKET, Key=DATASET_PREFIX + key, Body=body)
        self.dataset_hashes = hashes
        return hashes

    def dataset_size(self) -> int:
        return sum(size for _, size in DATASET_FILES)

    def create_group(self) -> str:
        """An Auto Scaling group of one spot instance with a terminating lifecycle hook; its instance id."""
        ec2, asg = self.clients.ec2, self.clients.autoscaling
        ec2.create_launch_template(LaunchTemplateName=TEMPLATE,
                                   LaunchTemplateData={"ImageId": "ami-0123456789abcdef0", "InstanceType": INSTANCE_TYPE})
        asg.create_auto_scaling_group(AutoScalingGroupName=GROUP, LaunchTemplate={"LaunchTemplateName": TEMPLATE},
                                      MinSize=1, MaxSize=2, DesiredCapacity=1, AvailabilityZones=[AZ])
        asg.put_lifecycle_hook(AutoScalingGroupName=GROUP, LifecycleHookName=HOOK,
                               LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                               HeartbeatTimeout=300, DefaultResult="ABANDON")
        return self.group_instances()[0]

    def group_instances(self) -> List[str]:
        group = self.clients.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
        return [i["InstanceId"] for i in group["Instances"] if i.get("LifecycleState") == "InService"]

    def terminate(self, instance_id: str) -> str:
        """Terminate the instance through its group (as a spot reclaim does); returns the replacement's id."""
        before = set(self.group_instances())
        self.clients.autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=instance_id,
                                                                           ShouldDecrementDesiredCapacity=False)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            new = [i for i in self.group_instances() if i not in before and i != instance_id]
            if new:
                return new[0]
            time.sleep(0.1)
        raise RuntimeError(f"the Auto Scaling group launched no replacement for {instance_id}")

    def detach_volumes_of(self, instance_id: str) -> List[str]:
        """Detach every volume attached to ``instance_id`` (what EC2 does when it terminates)."""
        ec2 = self.clients.ec2
        vols = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])["Volumes"]
        out = []
        for v in vols:
            ec2.detach_volume(VolumeId=v["VolumeId"], InstanceId=instance_id, Force=True)
            out.append(v["VolumeId"])
        return out

    def snapshots(self, kind: str = "") -> List[Dict[str, Any]]:
        filters = [{"Name": "tag:spot-agent:managed", "Values": ["true"]}]
        if kind:
            filters.append({"Name": "tag:spot-agent:notice-kind", "Values": [kind]})
        return self.clients.ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]

    def s3_keys(self, prefix: str) -> List[str]:
        out: List[str] = []
        pages = self.clients.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            out += [o["Key"] for o in page.get("Contents", [])]
        return out
