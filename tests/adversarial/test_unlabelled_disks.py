"""Disks that hold data no probe can name are never formatted (real loop devices, real blkid and
mkfs, moto over HTTP).

Each disk below makes ``blkid -p`` report nothing, which is all the agent used to require before
running mkfs. Every case is refused with one line naming the volume and the device, even with
``format_existing = "if-never-written"``; the disk's bytes are hashed before and after; and a good
volume in the same ``up()`` is still formatted and mounted (the agent keeps working).
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from typing import Tuple

import pytest

from tests.blockdev_fixtures import blockdevs, host, instance, loopdev, scratch_dir, volume  # noqa: F401
from tests.blockdev_fixtures import device_sha256 as _sha256

pytestmark = pytest.mark.root

MiB = 1024 * 1024
SIZE = 64 * MiB  # per volume: small and fast, still above every filesystem's minimum used here
MD_OLD_SIZE = 32 * MiB  # the md 1.0 member's size before its volume was grown to SIZE


def _write(device: str, offset: int, data: bytes) -> None:
    with open(device, "r+b", buffering=0) as fh:
        fh.seek(offset)
        fh.write(data)
        os.fsync(fh.fileno())


def _blkid(device: str) -> subprocess.CompletedProcess:
    return subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True, text=True)


def md10_superblock(device_bytes: int) -> Tuple[int, bytes]:
    """An md v1.0 superblock (linux/raid/md_p.h, mdp_superblock_1) as mdadm writes it for a member of
    ``device_bytes``: 8 KiB before the 4 KiB-aligned end, with libblkid's checksum. (mdadm --create
    needs the md driver, which this host does not load; the bytes on disk are the same.)"""
    offset = (device_bytes & ~0xFFF) - 0x2000
    sb = bytearray(256 + 2 * 4)  # max_dev = 4 roles
    struct.pack_into("<IIII", sb, 0, 0xA92B4EFC, 1, 0, 0)  # magic, major_version, feature_map
    sb[16:32] = bytes(range(1, 17))  # set_uuid
    sb[32:45] = b"spot-test:md0"  # set_name
    struct.pack_into("<QIIQIII", sb, 64, 1_700_000_000, 0, 0, (offset >> 9), 512, 2, 0)  # ctime, level 0 (raid0), layout, size, chunk, raid_disks
    struct.pack_into("<QQQ", sb, 128, 0, offset >> 9, offset >> 9)  # data_offset 0 (1.0: data first), data_size, super_offset
    struct.pack_into("<I", sb, 160, 0)  # dev_number
    sb[168:184] = bytes(range(17, 33))  # device_uuid
    struct.pack_into("<QQQ", sb, 192, 1_700_000_000, 7, 2**64 - 1)  # utime, events, resync_offset
    struct.pack_into("<II", sb, 216, 0, 4)  # sb_csum (below), max_dev
    struct.pack_into("<HHHH", sb, 256, 0, 1, 0xFFFF, 0xFFFF)  # dev_roles
    csum = sum(struct.unpack("<%dI" % (len(sb) // 4), bytes(sb)))
    csum = (csum & 0xFFFFFFFF) + (csum >> 32)
    struct.pack_into("<I", sb, 216, csum & 0xFFFFFFFF)
    return offset, bytes(sb)


def _random_disk(loop: str, loopdev) -> None:
    """Plain dm-crypt: ciphertext from the first byte to the last, no header at all."""
    _write(loop, 0, os.urandom(SIZE))


def _ext4_without_primary_superblock(loop: str, loopdev) -> None:
    """A populated ext4 whose first 4 KiB (boot block, primary superblock) were overwritten."""
    with tempfile.TemporaryDirectory() as tree:
        for i in range(8):
            with open(os.path.join(tree, f"shard-{i}.bin"), "wb") as fh:
                fh.write(os.urandom(256 * 1024))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, loop], check=True, stdin=subprocess.DEVNULL)
    assert "TYPE=ext4" in _blkid(loop).stdout
    _write(loop, 0, bytes(4096))


def _md10_member_of_a_grown_volume(loop: str, loopdev) -> None:
    """A RAID0 member with md metadata 1.0 (superblock at the end, data from sector 0), whose EBS
    volume was then grown: the superblock now sits in the middle, where no probe looks."""
    offset, sb = md10_superblock(MD_OLD_SIZE)
    # The emulation is faithful: on a device of the member's original size blkid names it.
    original = loopdev(MD_OLD_SIZE, name="md-original.img")
    _write(original, offset, sb)
    probe = _blkid(original).stdout
    assert "TYPE=linux_raid_member" in probe and "VERSION=1.0" in probe, probe
    _write(loop, 0, os.urandom(4 * MiB))  # stripes of the array's filesystem
    _write(loop, 12 * MiB, os.urandom(2 * MiB))
    _write(loop, offset, sb)


def _partially_written(loop: str, loopdev) -> None:
    """Zeros in the first and last 8 MiB, data in the middle (say, an application writing at an offset)."""
    _write(loop, 28 * MiB, os.urandom(8 * MiB))


DISKS = {
    "random-bytes-like-plain-dm-crypt": _random_disk,
    "ext4-primary-superblock-zeroed": _ext4_without_primary_superblock,
    "md-1.0-member-of-a-grown-volume": _md10_member_of_a_grown_volume,
    "zeros-at-the-ends-data-in-the-middle": _partially_written,
}


@pytest.mark.parametrize("policy", ["never", "if-never-written"])
@pytest.mark.parametrize("kind", sorted(DISKS))
def test_unlabelled_data_is_refused_untouched(host, loopdev, kind, policy):
    host.sim.bytes_per_gib = SIZE
    az = host.identity.availability_zone
    vid = host.aws.ec2.create_volume(AvailabilityZone=az, Size=1, VolumeType="gp3")["VolumeId"]
    good = host.aws.ec2.create_volume(AvailabilityZone=az, Size=1, VolumeType="gp3")["VolumeId"]
    host.aws.ec2.attach_volume(VolumeId=vid, InstanceId=host.identity.instance_id, Device="/dev/sdg")
    loop = host.sim.loop_device(vid)
    DISKS[kind](loop, loopdev)
    assert _blkid(loop).returncode == 2, f"blkid must see nothing for this case: {_blkid(loop).stdout}"
    before = _sha256(loop)

    cfg = [volume("hostile", host.mnt("hostile"), fs="ext4", volume_id=vid, format_existing=policy),
           volume("good", host.mnt("good"), fs="ext4", volume_id=good, format_existing="if-never-written")]
    hostile, fine = host.manager(cfg).up()

    assert not hostile.ok and "formatted" not in hostile.actions
    line = hostile.error
    assert "\n" not in line and "refusing to format" in line
    assert f"volume hostile ({vid}) on {loop}" in line
    if policy == "never":
        assert "did not create it empty" in line
    else:
        assert "holds data (a non-zero byte at offset" in line
    assert not os.path.ismount(host.mnt("hostile"))
    assert _sha256(loop) == before
    assert _blkid(loop).returncode == 2
    # The agent still works: the never-written volume beside it is formatted and mounted.
    assert fine.ok, fine.error
    assert "formatted" in fine.actions and os.path.ismount(host.mnt("good"))
