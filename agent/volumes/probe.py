"""Is this device blank? A no-cache ``blkid -p`` probe after the device has settled.

Why so careful: "blank" is the only licence to run mkfs. ``blkid`` exits 2 both for "nothing found"
and for "no such device", so the path is checked to be a block device first; a device still coming
up can read as empty, so we wait until its size is non-zero and stable before probing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, Optional

from agent.clock import SYSTEM_CLOCK, Clock
from agent.runner import Runner
from agent.volumes.device_resolver import is_block_device


class ProbeError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProbeResult:
    device: str
    fields: Dict[str, str] = field(default_factory=dict)  # blkid -o export output

    @property
    def blank(self) -> bool:
        """Nothing at all found: any field but DEVNAME (a signature blkid cannot name) is not blank."""
        return not any(k != "DEVNAME" for k in self.fields)

    @property
    def fs_type(self) -> str:
        return self.fields.get("TYPE", "")

    @property
    def pt_type(self) -> str:
        return self.fields.get("PTTYPE", "")

    @property
    def uuid(self) -> str:
        return self.fields.get("UUID", "")

    def describe(self) -> str:
        """What was found, for a refusal message."""
        if self.pt_type:
            return f"a {self.pt_type} partition table"
        if self.fs_type:
            label = self.fields.get("LABEL")
            return f"a {self.fs_type} signature" + (f" (label {label!r})" if label else "")
        if self.fields.get("USAGE"):
            return f"a {self.fields['USAGE']} signature"
        other = ", ".join(f"{k}={v}" for k, v in sorted(self.fields.items()) if k != "DEVNAME")
        return f"an unrecognised signature ({other})" if other else "nothing"


def parse_export(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def probe(device: str, runner: Runner) -> ProbeResult:
    """Low-level probe, bypassing the blkid cache. Raises ProbeError for anything but a clear answer."""
    if not is_block_device(device):
        raise ProbeError(f"{device} is not a block device (blkid would report it as empty)")
    res = runner.run(["blkid", "-p", "-o", "export", device], timeout=30, check=False)
    if res.returncode == 0:
        return ProbeResult(device, parse_export(res.stdout))
    if res.returncode == 2:
        return ProbeResult(device, {})
    if res.returncode == 8:
        raise ProbeError(f"{device}: blkid found several conflicting signatures (ambivalent probe); refusing to touch it")
    raise ProbeError(f"{device}: probe failed: {res.error_line()}")


def device_size(device: str) -> int:
    """Size in bytes, read from the device itself (seek to the end)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def wait_settled(device: str, runner: Runner, clock: Clock = SYSTEM_CLOCK, timeout: float = 10.0,
                 interval: float = 0.05) -> int:
    """Wait until ``device`` is a readable block device whose size is non-zero and unchanged between
    two reads; run ``udevadm settle`` first where udev runs. Returns the size in bytes."""
    if shutil.which("udevadm") and os.path.exists("/run/udev/control"):
        runner.run(["udevadm", "settle", f"--timeout={max(1, int(timeout))}"], timeout=timeout + 5, check=False)
    deadline = clock.monotonic() + timeout
    last: Optional[int] = None
    why = "never became readable"
    while True:
        try:
            if not is_block_device(device):
                why = "is not a block device"
                raise OSError(why)
            size = device_size(device)
            if size > 0 and size == last:
                return size
            why = "reports size 0" if size == 0 else "size still changing"
            last = size
        except OSError as exc:
            why = str(exc.strerror or exc)
            last = None
        if clock.monotonic() >= deadline:
            raise ProbeError(f"{device} did not settle within {timeout:g}s ({why})")
        clock.sleep(interval)
