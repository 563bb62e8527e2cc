"""Format (only what format_rule allows), mount by UUID (idempotently), persist for reboots, and grow.

The pure parts (mountinfo parsing, mount options, fstab lines, mount-unit text and names, the growth
decision) are functions of their inputs; the commands go through the injected Runner.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from agent.runner import Runner
from agent.state import atomic_write
from agent.volumes.probe import ProbeResult

MKFS = {
    # -K / nodiscard: a fresh EBS volume is already zero; discarding it only costs time.
    # No -f / -F, but that is NOT a guard to rely on: mkfs.xfs refuses a device with a signature it
    # knows, whereas mke2fs only asks "Proceed anyway?" when stdin and stdout are terminals, and the
    # agent's are not, so mkfs.ext4 overwrites whatever is there. What protects data is the rule in
    # agent.volumes.format_rule, checked again under an O_EXCL hold just before this runs.
    "xfs": ["mkfs.xfs", "-q", "-K"],
    "ext4": ["mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"],
}
GROW_MIN_BYTES = 8 * 1024 * 1024  # smaller differences are metadata rounding, not a bigger volume


class FilesystemError(RuntimeError):
    pass


@dataclass(frozen=True)
class MountEntry:
    major_minor: str  # "7:3"
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def parse_mountinfo(text: str) -> List[MountEntry]:
    """Parse /proc/self/mountinfo (see proc(5)); octal escapes in paths are decoded."""
    out: List[MountEntry] = []
    for line in text.splitlines():
        parts = line.split()
        if "-" not in parts:
            continue
        sep = parts.index("-")
        if sep < 6 or len(parts) < sep + 3:
            continue
        out.append(MountEntry(major_minor=parts[2], root=_unescape(parts[3]), mountpoint=_unescape(parts[4]),
                              options=parts[5], fstype=parts[sep + 1], source=_unescape(parts[sep + 2])))
    return out


def read_mounts(path: str = "/proc/self/mountinfo") -> List[MountEntry]:
    with open(path) as fh:
        return parse_mountinfo(fh.read())


def major_minor(device: str) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mount_at(mounts: Sequence[MountEntry], mountpoint: str) -> Optional[MountEntry]:
    """The topmost mount at ``mountpoint`` (the last one listed wins)."""
    target = os.path.normpath(mountpoint)
    found = None
    for m in mounts:
        if os.path.normpath(m.mountpoint) == target:
            found = m
    return found


def mounts_of(mounts: Sequence[MountEntry], dev: str) -> List[MountEntry]:
    return [m for m in mounts if m.major_minor == dev]


def mount_options(fs: str, user: Sequence[str], read_only: bool, multi_attach: bool, xfs_clone: bool) -> List[str]:
    """Options for mount -o. A read-only mount must not replay a journal another writer owns."""
    opts = [o for o in user if o]
    if read_only or multi_attach:
        opts = [o for o in opts if o != "rw"]
        if "ro" not in opts:
            opts.insert(0, "ro")
        if multi_attach:
            extra = "norecovery" if fs == "xfs" else "noload"
            if extra not in opts:
                opts.append(extra)
    if fs == "xfs" and xfs_clone and "nouuid" not in opts:
        opts.append("nouuid")
    return opts or ["defaults"]


def fstab_line(uuid: str, mountpoint: str, fs: str, options: Sequence[str], name: str) -> str:
    """One fstab line; ``nofail`` so a missing volume never drops the boot into emergency mode."""
    opts = [o for o in options if o != "defaults"]
    for extra in ("nofail", "x-systemd.device-timeout=30s"):
        if not any(o.split("=")[0] == extra.split("=")[0] for o in opts):
            opts.append(extra)
    return f"UUID={uuid} {_fstab_escape(mountpoint)} {fs} {','.join(opts)} 0 2  # spot-agent:{name}"


def _fstab_escape(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


def merge_fstab(text: str, line: str, mountpoint: str, name: str) -> str:
    """Replace our line for this volume (or any line for this mount point); keep everything else."""
    out = []
    placed = False
    target = _fstab_escape(os.path.normpath(mountpoint))
    for existing in text.splitlines():
        fields = existing.split()
        ours = existing.rstrip().endswith(f"# spot-agent:{name}")
        same_mount = len(fields) >= 2 and not existing.lstrip().startswith("#") and os.path.normpath(fields[1]) == target
        if ours or same_mount:
            if not placed:
                out.append(line)
                placed = True
            continue
        out.append(existing)
    if not placed:
        out.append(line)
    return "\n".join(out) + "\n"


def unit_name(mountpoint: str) -> str:
    """systemd-escape --path --suffix=mount, implemented here (the rule is small and fixed)."""
    path = os.path.normpath(mountpoint).strip("/")
    if not path:
        return "-.mount"
    out = []
    for i, ch in enumerate(path):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out) + ".mount"


def mount_unit_text(uuid: str, mountpoint: str, fs: str, options: Sequence[str], name: str) -> str:
    opts = [o for o in options if o != "defaults"] + ["nofail"]
    return (
        "# Written by spot-agent for [[volumes]] " + name + "\n"
        "[Unit]\n"
        f"Description=spot-agent volume {name}\n"
        "\n[Mount]\n"
        f"What=/dev/disk/by-uuid/{uuid}\n"
        f"Where={os.path.normpath(mountpoint)}\n"
        f"Type={fs}\n"
        f"Options={','.join(opts)}\n"
        "\n[Install]\n"
        "WantedBy=local-fs.target\n"
    )


def needs_growth(device_bytes: int, fs_bytes: int) -> bool:
    return device_bytes - fs_bytes >= max(GROW_MIN_BYTES, device_bytes // 100)


# ---- commands -----------------------------------------------------------------------------------


def mkfs(device: str, fs: str, probe_result: ProbeResult, runner: Runner, label: str = "") -> None:
    """Make a filesystem. Only ever called after format_rule.decide() said yes, with the blank probe
    taken under the O_EXCL hold (probe.held_exclusively) a moment before: a last check of the pair."""
    if not probe_result.blank or probe_result.device != device:
        raise FilesystemError(f"refusing to format {device}: it holds {probe_result.describe()}")
    argv = list(MKFS[fs])
    if label:
        argv += ["-L", label[:12] if fs == "xfs" else label[:16]]
    res = runner.run(argv + [device], timeout=600, check=False, input="")
    if not res.ok:
        raise FilesystemError(f"mkfs.{fs} {device} failed: {res.error_line()}")


def uuid_holders(uuid: str, runner: Runner) -> List[str]:
    """Every block device carrying this filesystem UUID (more than one: an XFS clone is present)."""
    res = runner.run(["blkid", "-o", "device", "-t", f"UUID={uuid}"], timeout=30, check=False)
    return sorted(set(line.strip() for line in res.stdout.splitlines() if line.strip())) if res.ok else []


def mount(device: str, uuid: str, mountpoint: str, fs: str, options: Sequence[str], runner: Runner,
          by_uuid: bool = True, mountinfo: str = "/proc/self/mountinfo") -> str:
    """Mount, creating the mount point. Returns "mounted" or "already mounted".

    The same device already mounted there is success (restarts); anything else mounted there is an
    error, and so is this device mounted somewhere else.
    """
    dev = major_minor(device)
    mounts = read_mounts(mountinfo)
    existing = mount_at(mounts, mountpoint)
    if existing is not None:
        if existing.major_minor == dev:
            return "already mounted"
        raise FilesystemError(f"{mountpoint} already has {existing.source} ({existing.fstype}) mounted; "
                              f"refusing to mount {device} over it")
    elsewhere = [m.mountpoint for m in mounts_of(mounts, dev) if m.root == "/"]
    if elsewhere:
        raise FilesystemError(f"{device} is already mounted at {elsewhere[0]}, not {mountpoint}")
    os.makedirs(mountpoint, exist_ok=True)
    source = f"UUID={uuid}" if by_uuid and uuid else device
    res = runner.run(["mount", "-t", fs, "-o", ",".join(options), source, mountpoint], timeout=120, check=False)
    if not res.ok:
        raise FilesystemError(f"mounting {device} ({source}) at {mountpoint} failed: {res.error_line()}")
    after = mount_at(read_mounts(mountinfo), mountpoint)
    if after is None or after.major_minor != dev:
        # UUID= picked another device with the same UUID: undo and say so.
        runner.run(["umount", mountpoint], timeout=60, check=False)
        raise FilesystemError(f"mount {source} at {mountpoint} mounted {after.source if after else 'nothing'}, not {device}")
    return "mounted"


def unmount(mountpoint: str, runner: Runner, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Unmount if mounted. Returns True when something was unmounted."""
    if mount_at(read_mounts(mountinfo), mountpoint) is None:
        return False
    res = runner.run(["umount", mountpoint], timeout=120, check=False)
    if not res.ok:
        raise FilesystemError(f"unmounting {mountpoint} failed: {res.error_line()}")
    return True


def write_fstab(path: str, line: str, mountpoint: str, name: str) -> bool:
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        text = ""
    new = merge_fstab(text, line, mountpoint, name)
    if new == text:
        return False
    atomic_write(path, new.encode(), mode=0o644)
    return True


def remove_fstab(path: str, name: str) -> bool:
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        return False
    lines = [l for l in text.splitlines() if not l.rstrip().endswith(f"# spot-agent:{name}")]
    new = "\n".join(lines) + ("\n" if lines else "")
    if new == text:
        return False
    atomic_write(path, new.encode(), mode=0o644)
    return True


def write_mount_unit(unit_dir: str, text: str, mountpoint: str) -> str:
    path = os.path.join(unit_dir, unit_name(mountpoint))
    try:
        with open(path) as fh:
            if fh.read() == text:
                return path
    except FileNotFoundError:
        pass
    atomic_write(path, text.encode(), mode=0o644)
    return path


def xfs_size(mountpoint: str, runner: Runner) -> int:
    res = runner.run(["xfs_info", mountpoint], timeout=30, check=False)
    if not res.ok:
        raise FilesystemError(f"xfs_info {mountpoint} failed: {res.error_line()}")
    return parse_xfs_info(res.stdout)


def parse_xfs_info(text: str) -> int:
    m = re.search(r"^data\s*=\s*bsize=(\d+)\s+blocks=(\d+)", text, re.M)
    if not m:
        raise FilesystemError("could not read the data size from xfs_info")
    return int(m.group(1)) * int(m.group(2))


def ext4_size(device: str, runner: Runner) -> int:
    res = runner.run(["dumpe2fs", "-h", device], timeout=30, check=False)
    if not res.ok:
        raise FilesystemError(f"dumpe2fs -h {device} failed: {res.error_line()}")
    return parse_dumpe2fs(res.stdout)


def parse_dumpe2fs(text: str) -> int:
    count = re.search(r"^Block count:\s+(\d+)", text, re.M)
    size = re.search(r"^Block size:\s+(\d+)", text, re.M)
    if not count or not size:
        raise FilesystemError("could not read the block count from dumpe2fs")
    return int(count.group(1)) * int(size.group(1))


def grow_xfs_online(mountpoint: str, device_bytes: int, runner: Runner) -> Optional[Tuple[int, int]]:
    """xfs_growfs a mounted XFS when the device is bigger. Returns (before, after) bytes, or None."""
    before = xfs_size(mountpoint, runner)
    if not needs_growth(device_bytes, before):
        return None
    res = runner.run(["xfs_growfs", mountpoint], timeout=600, check=False)
    if not res.ok:
        raise FilesystemError(f"xfs_growfs {mountpoint} failed: {res.error_line()}")
    return before, xfs_size(mountpoint, runner)


def grow_ext4_offline(device: str, device_bytes: int, runner: Runner) -> Optional[Tuple[int, int]]:
    """Check and resize an unmounted ext4 (resize2fs insists on a fresh e2fsck -f first)."""
    before = ext4_size(device, runner)
    if not needs_growth(device_bytes, before):
        return None
    fsck = runner.run(["e2fsck", "-f", "-p", device], timeout=1800, check=False)
    if fsck.returncode >= 4:
        raise FilesystemError(f"e2fsck before growing {device} failed: {fsck.error_line()}")
    res = runner.run(["resize2fs", device], timeout=1800, check=False)
    if not res.ok:
        raise FilesystemError(f"resize2fs {device} failed: {res.error_line()}")
    return before, ext4_size(device, runner)


def grow_ext4_online(device: str, mountpoint: str, device_bytes: int, runner: Runner) -> Optional[Tuple[int, int]]:
    """Online ext4 growth; needs CAP_SYS_RESOURCE, which containers often lack: say so plainly."""
    before = ext4_size(device, runner)
    if not needs_growth(device_bytes, before):
        return None
    res = runner.run(["resize2fs", device], timeout=1800, check=False)
    if not res.ok:
        text = (res.stderr + res.stdout).lower()
        if "operation not permitted" in text or "permission denied" in text:
            raise FilesystemError(
                f"growing mounted ext4 {device} at {mountpoint} was refused (online resize needs CAP_SYS_RESOURCE); "
                f"it stays at {before} bytes: run `spot-agent volumes down` then `volumes up` to grow it offline")
        raise FilesystemError(f"resize2fs {device} failed: {res.error_line()}")
    return before, ext4_size(device, runner)
