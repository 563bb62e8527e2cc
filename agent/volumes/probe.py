"""What is on this device? A no-cache ``blkid -p`` probe after the device has settled, the sampled
"never written" read, and the exclusive hold taken just before mkfs.

Why so careful: a blank probe is necessary for mkfs but not sufficient (see
:mod:`agent.volumes.format_rule`). ``blkid`` exits 2 both for "nothing found" and for "no such
device", so the path is checked to be a block device first; a device still coming up can read as
empty, so we wait until its size is non-zero and stable before probing. Right before mkfs the device
is opened with ``O_EXCL``, which the kernel refuses while it is mounted or held by device-mapper, md
or any other exclusive opener, and probed again under that hold.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

from agent.clock import SYSTEM_CLOCK, Clock
from agent.runner import Runner
from agent.volumes.device_resolver import is_block_device
from agent.volumes.format_rule import WrittenCheck, first_nonzero, sample_extents


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


def scan_written(fd: int, size: int) -> WrittenCheck:
    """Read :func:`sample_extents` of ``size`` bytes from ``fd``; stop at the first non-zero byte.

    Any read error or short read is an answer of its own (never "never written")."""
    done = 0
    for off, length in sample_extents(size):
        pos = off
        while pos < off + length:
            want = min(1024 * 1024, off + length - pos)
            try:
                data = os.pread(fd, want, pos)
            except OSError as exc:
                return WrittenCheck(False, bytes_read=done, error=f"offset {pos}: {exc.strerror or exc}")
            if len(data) != want:
                return WrittenCheck(False, bytes_read=done, error=f"short read at offset {pos}: {len(data)} of {want} bytes")
            done += len(data)
            idx = first_nonzero(data)
            if idx >= 0:
                return WrittenCheck(False, first_nonzero=pos + idx, bytes_read=done)
            pos += want
    return WrittenCheck(True, bytes_read=done)


@contextlib.contextmanager
def held_exclusively(device: str, expect: str = "") -> Iterator[int]:
    """Open ``device`` with ``O_EXCL`` for the duration: no mount, device-mapper/md holder or other
    exclusive opener can take it meanwhile, and one already there makes this fail (EBUSY).

    ``expect`` ("major:minor") re-checks that the path still names the device that was probed. The
    hold must be released before mkfs runs: mke2fs and mkfs.xfs open the device O_EXCL themselves.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ProbeError(f"{device} is in use (mounted, or held by device-mapper, md or another program): "
                             f"refusing to format it") from None
        raise ProbeError(f"{device}: cannot open it exclusively to check it before mkfs: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode):
            raise ProbeError(f"{device} is not a block device any more; refusing to format it")
        got = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        if expect and got != expect:
            raise ProbeError(f"{device} is now device {got}, not the {expect} that was probed; refusing to format it")
        yield fd
    finally:
        os.close(fd)
