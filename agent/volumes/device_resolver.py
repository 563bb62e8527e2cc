"""Which block device is this EBS volume? A pure decision over a snapshot of the device tree.

Why pure: the rules (by-id symlink, cross-checked serial, Xen names, /dev/NAME only) are where a
wrong answer formats somebody else's disk, so they are tested without I/O. ``scan_tree`` is the one
edge that reads ``dev_root`` and ``sys_root``; ``resolve`` decides from what it read.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

EBS_MODEL = "Amazon Elastic Block Store"
INSTANCE_STORE_MODEL = "Amazon EC2 NVMe Instance Storage"
BY_ID_PREFIX = "nvme-Amazon_Elastic_Block_Store_"


@dataclass(frozen=True)
class DeviceTree:
    """What the host shows, read once. Names are kernel block names (``nvme1n1``, ``xvdf``, ``loop3``)."""

    dev_root: str = "/dev"
    by_id: Dict[str, str] = field(default_factory=dict)  # link name under disk/by-id -> resolved target path
    serials: Dict[str, str] = field(default_factory=dict)  # block name -> serial (stripped)
    models: Dict[str, str] = field(default_factory=dict)  # block name -> model (stripped)
    nodes: Dict[str, str] = field(default_factory=dict)  # block name -> resolved path of dev_root/NAME (block devices only)
    block_paths: Tuple[str, ...] = ()  # resolved paths that are block devices (by-id targets included)


@dataclass(frozen=True)
class Resolution:
    device: str = ""  # resolved /dev/NAME, empty when not found or refused
    how: str = ""  # "by-id symlink", "sysfs serial", "xen name"
    refused: str = ""  # a reason never to use what was found (stale symlink, serial mismatch)
    looked: str = ""  # what was looked at, for the "not found" error

    @property
    def found(self) -> bool:
        return bool(self.device) and not self.refused


def nvme_serial(volume_id: str) -> str:
    """The NVMe serial EBS reports: the volume id without its dash."""
    return volume_id.replace("-", "", 1)


def by_id_names(volume_id: str) -> List[str]:
    serial = nvme_serial(volume_id)
    base = BY_ID_PREFIX + serial
    return [base, base + "_1", base + "-ns-1"]


def xen_name(attach_device: str) -> str:
    """``/dev/sdf`` (or ``/dev/xvdf``, ``sdf``) -> ``xvdf``; empty if the name is not of that shape."""
    name = os.path.basename(attach_device or "")
    if name.startswith("xvd"):
        return name
    if name.startswith("sd") and len(name) > 2:
        return "xvd" + name[2:]
    return ""


def acceptable_path(path: str, dev_root: str) -> bool:
    """A resolved device path is acceptable only as ``/dev/NAME`` (or ``<dev_root>/NAME``): no deeper path."""
    parent = os.path.dirname(path)
    name = os.path.basename(path)
    if not name or name in (".", ".."):
        return False
    roots = {"/dev", os.path.normpath(dev_root)}
    return parent in roots


def resolve(volume_id: str, tree: DeviceTree, attach_device: str = "") -> Resolution:
    """Find the block device of ``volume_id`` in ``tree``.

    Order: the NVMe by-id symlink (its target's serial must match: stale symlinks happen), then any
    block device whose sysfs serial matches (no udev), then the Xen name of the attach device (Xen
    shows no volume id, so only when that device reports no NVMe serial at all).

    Serials are always read under the *kernel* name of what a path resolves to: ``/dev/xvdf`` may be
    a symlink (amazon-ec2-utils makes ``xvdf -> nvme2n1`` on Nitro), and sysfs only knows ``nvme2n1``.
    """
    serial = nvme_serial(volume_id)
    looked = [f"{tree.dev_root}/disk/by-id/{by_id_names(volume_id)[0]}", f"serial {serial} under block/*/device/serial"]
    stale: Optional[str] = None
    for link in by_id_names(volume_id):
        target = tree.by_id.get(link)
        if target is None:
            continue
        if not acceptable_path(target, tree.dev_root):
            stale = f"by-id symlink {link} points to {target}, which is not of the form /dev/NAME"
            continue
        if target not in tree.block_paths:
            stale = f"by-id symlink {link} points to {target}, which is not a block device (stale symlink)"
            continue
        name = os.path.basename(target)
        have = tree.serials.get(name, "")
        if have != serial:
            stale = (f"by-id symlink {link} points to {target}, whose serial is {have or '(none)'!s}, "
                     f"not {serial} (stale symlink)")
            continue
        return Resolution(device=target, how="by-id symlink")
    matches = sorted(name for name, s in tree.serials.items() if s == serial)
    for name in matches:
        node = tree.nodes.get(name)
        if node and acceptable_path(node, tree.dev_root):
            return Resolution(device=node, how="sysfs serial")
    if stale:
        return Resolution(device="", refused=stale, looked="; ".join(looked))
    xen = xen_name(attach_device)
    if xen:
        looked.append(f"{tree.dev_root}/{xen}")
        node = tree.nodes.get(xen)
        if node and acceptable_path(node, tree.dev_root):
            kernel = os.path.basename(node)
            have = tree.serials.get(kernel, "")
            if have and have != serial:
                return Resolution(device=node, refused=f"{tree.dev_root}/{xen} is {node}, whose serial is {have}, not {serial}",
                                  looked="; ".join(looked))
            if not have and not kernel.startswith("xvd"):
                # Only a Xen disk shows no serial; anything else without one is not known to be ours.
                return Resolution(device=node, refused=f"{tree.dev_root}/{xen} is {node}, which is not a Xen disk and "
                                                       f"reports no serial to match {serial}", looked="; ".join(looked))
            return Resolution(device=node, how="xen name")
    return Resolution(looked="; ".join(looked))


def instance_store_disks(tree: DeviceTree) -> List[str]:
    """Resolved paths of NVMe instance-store disks, in name order."""
    out = []
    for name in sorted(tree.models):
        if tree.models[name] == INSTANCE_STORE_MODEL and name in tree.nodes:
            node = tree.nodes[name]
            if acceptable_path(node, tree.dev_root):
                out.append(node)
    return out


# ---- the I/O edge -------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, "r", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def scan_tree(dev_root: str = "/dev", sys_root: str = "/sys") -> DeviceTree:
    """Read by-id symlinks under ``dev_root`` and serial/model under ``sys_root/block``."""
    by_id: Dict[str, str] = {}
    blocks = set()
    by_id_dir = os.path.join(dev_root, "disk", "by-id")
    try:
        links = os.listdir(by_id_dir)
    except OSError:
        links = []
    for link in links:
        target = os.path.realpath(os.path.join(by_id_dir, link))
        by_id[link] = target
        if is_block_device(target):
            blocks.add(target)
    serials: Dict[str, str] = {}
    models: Dict[str, str] = {}
    nodes: Dict[str, str] = {}
    sys_block = os.path.join(sys_root, "block")
    try:
        names = os.listdir(sys_block)
    except OSError:
        names = []
    for name in names:
        dev_dir = os.path.join(sys_block, name, "device")
        serial = _read(os.path.join(dev_dir, "serial"))
        model = _read(os.path.join(dev_dir, "model"))
        if serial:
            serials[name] = serial
        if model:
            models[name] = model
    candidates = set(names)
    try:
        candidates.update(n for n in os.listdir(dev_root) if n.startswith(("xvd", "nvme", "sd")))
    except OSError:
        pass
    for name in candidates:
        path = os.path.realpath(os.path.join(dev_root, name))
        if is_block_device(path):
            nodes[name] = path
            blocks.add(path)
    return DeviceTree(dev_root=os.path.normpath(dev_root), by_id=by_id, serials=serials, models=models,
                      nodes=nodes, block_paths=tuple(sorted(blocks)))
