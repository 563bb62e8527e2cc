"""NVMe instance-store disks as scratch: one disk as is, several as one RAID0 when the host has md.

Why RAID0: instance-store disks are ephemeral anyway (gone on stop), so striping costs no durability
and gives the job all their bandwidth as one mount point.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import List, Sequence

from agent.runner import Runner
from agent.volumes.probe import ProbeResult


class InstanceStoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class Plan:
    kind: str  # "single" | "raid0" | "assemble"
    disks: List[str]
    device: str  # what the filesystem goes on
    warning: str = ""


def md_device(name: str) -> str:
    return f"/dev/md/spot-agent-{name}"


def md_available(proc_root: str = "/proc") -> bool:
    return os.path.exists(os.path.join(proc_root, "mdstat")) and shutil.which("mdadm") is not None


def plan(name: str, disks: Sequence[str], probes: Sequence[ProbeResult], have_md: bool) -> Plan:
    """Decide from what the disks hold. Never stripe over a disk that holds anything but our RAID."""
    if not disks:
        raise InstanceStoreError("no NVMe instance-store disks (model 'Amazon EC2 NVMe Instance Storage') found")
    disks = list(disks)
    if len(disks) == 1:
        return Plan("single", disks, disks[0])
    if not have_md:
        return Plan("single", disks[:1], disks[0],
                    warning=f"{len(disks)} instance-store disks but no md RAID here (/proc/mdstat or mdadm missing): using {disks[0]} only")
    members = [p for p in probes if p.fs_type == "linux_raid_member"]
    blank = [p for p in probes if p.blank]
    if len(members) == len(disks):
        return Plan("assemble", disks, md_device(name))
    if len(blank) == len(disks):
        return Plan("raid0", disks, md_device(name))
    busy = [f"{p.device} holds {p.describe()}" for p in probes if not p.blank and p.fs_type != "linux_raid_member"]
    raise InstanceStoreError("refusing to build a RAID0 over instance-store disks that hold data: " + "; ".join(busy or ["mixed RAID members and blank disks"]))


def build(p: Plan, runner: Runner) -> str:
    """Create or assemble the array; returns the device to put the filesystem on."""
    if p.kind == "single":
        return p.device
    if os.path.exists(p.device):
        return os.path.realpath(p.device)
    if p.kind == "assemble":
        argv = ["mdadm", "--assemble", p.device] + p.disks
    else:
        argv = ["mdadm", "--create", p.device, "--run", "--level=0", "--metadata=1.2",
                f"--raid-devices={len(p.disks)}"] + p.disks
    res = runner.run(argv, timeout=120, check=False)
    if not res.ok:
        raise InstanceStoreError(f"{' '.join(argv[:2])} failed: {res.error_line()}")
    return os.path.realpath(p.device)
