"""Format only blank devices, mount everything else untouched, refuse what is unsafe (real loop
devices, real mkfs/mount, moto over HTTP)."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from tests.blockdev_fixtures import volume

pytestmark = pytest.mark.root


def _fs_of(mountpoint: str) -> str:
    return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--mountpoint", mountpoint], capture_output=True, text=True).stdout.strip()


def _checksums(root: str):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _write_dos_partition_table(device: str) -> None:
    """An MBR with one Linux partition (no sfdisk on these machines): entry at 446, 0x55AA at 510."""
    import struct

    entry = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0x83, b"\xff\xff\xff", 2048, 204800)
    with open(device, "r+b") as fh:
        fh.seek(446)
        fh.write(entry + b"\x00" * 48 + b"\x55\xaa")
        fh.flush()
        os.fsync(fh.fileno())


def _new_volume(host, size=1, **tags):
    spec = [{"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}] if tags else []
    return host.aws.ec2.create_volume(AvailabilityZone=host.identity.availability_zone, Size=size,
                                      VolumeType="gp3", TagSpecifications=spec)["VolumeId"]


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_blank_volume_is_formatted_and_mounted(host, fs):
    vid = _new_volume(host)
    mnt = host.mnt("data")
    mgr = host.manager([volume("data", mnt, fs=fs, volume_id=vid, fstab=True, mount_unit=True, format_existing="if-never-written")])
    progress = []
    [res] = mgr.up(progress=progress.append)
    assert res.ok, res.error
    assert "formatted" in res.actions and "attached" in res.actions and "mounted" in res.actions
    assert res.volume_id == vid
    assert res.device == host.sim.loop_device(vid)
    assert _fs_of(mnt) == fs
    assert any("formatting" in p for p in progress)
    mounted = mgr.mounted()["data"]
    assert (mounted.volume_id, mounted.device, mounted.mountpoint, mounted.fs) == (vid, res.device, mnt, fs)
    uuid = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", res.device], capture_output=True, text=True).stdout.strip()
    with open(os.path.join(host.root, "fstab")) as fh:
        fstab = fh.read()
    assert f"UUID={uuid} {mnt} {fs} " in fstab and "nofail" in fstab
    units = os.listdir(os.path.join(host.root, "units"))
    assert len(units) == 1 and units[0].endswith(".mount")


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_volume_with_data_is_mounted_untouched(host, fs):
    vid = _new_volume(host)
    mnt = host.mnt("ckpt")
    mgr = host.manager([volume("ckpt", mnt, fs=fs, volume_id=vid, format_existing="if-never-written")])
    assert mgr.up()[0].ok
    os.makedirs(os.path.join(mnt, "run-42"))
    for i in range(5):
        with open(os.path.join(mnt, "run-42", f"shard-{i}.bin"), "wb") as fh:
            fh.write(os.urandom(64 * 1024 + i))
    before = _checksums(mnt)
    [down] = mgr.down()
    assert down.ok and "detached" in down.actions and not os.path.ismount(mnt)
    assert host.sim.loop_device(vid) is None

    # A fresh boot: new state, the same volume attached again (a new loop device).
    mgr2 = host.manager([volume("ckpt", mnt, fs=fs, volume_id=vid)], state_name="state2.json")
    [res] = mgr2.up()
    assert res.ok, res.error
    assert "formatted" not in res.actions and "mounted" in res.actions
    assert _checksums(mnt) == before


def test_partition_table_is_refused_with_the_reason(host):
    vid = _new_volume(host)
    host.aws.ec2.attach_volume(VolumeId=vid, InstanceId=host.identity.instance_id, Device="/dev/sdg")
    loop = host.sim.loop_device(vid)
    _write_dos_partition_table(loop)
    mgr = host.manager([volume("data", host.mnt("data"), fs="xfs", volume_id=vid)])
    [res] = mgr.up()
    assert not res.ok
    assert "dos partition table" in res.error and "refusing" in res.error
    assert not os.path.ismount(host.mnt("data"))
    out = subprocess.run(["blkid", "-p", "-o", "export", loop], capture_output=True, text=True).stdout
    assert "PTTYPE=dos" in out and "TYPE=xfs" not in out


def test_other_filesystem_than_configured_is_refused(host):
    vid = _new_volume(host)
    host.aws.ec2.attach_volume(VolumeId=vid, InstanceId=host.identity.instance_id, Device="/dev/sdg")
    loop = host.sim.loop_device(vid)
    subprocess.run(["mkfs.ext4", "-q", loop], check=True)
    [res] = host.manager([volume("data", host.mnt("data"), fs="xfs", volume_id=vid)]).up()
    assert not res.ok and "holds a ext4 signature" in res.error and "not xfs" in res.error
    assert "TYPE=ext4" in subprocess.run(["blkid", "-p", "-o", "export", loop], capture_output=True, text=True).stdout


def test_serial_mismatch_is_refused_with_the_reason(host):
    vid = _new_volume(host)
    host.aws.ec2.attach_volume(VolumeId=vid, InstanceId=host.identity.instance_id, Device="/dev/sdg")
    loop = host.sim.loop_device(vid)
    # The by-id symlink still points at the loop device, but that device now reports another serial:
    # a stale symlink. Nothing may be formatted.
    with open(os.path.join(host.sim.sys_root, "block", os.path.basename(loop), "device", "serial"), "w") as fh:
        fh.write("vol0000000000000000f  \n")
    mgr = host.manager([volume("data", host.mnt("data"), fs="ext4", volume_id=vid, attach_timeout=2)])
    [res] = mgr.up()
    assert not res.ok
    assert "serial is vol0000000000000000f" in res.error and "stale symlink" in res.error
    assert subprocess.run(["blkid", "-p", loop], capture_output=True).returncode == 2  # still blank


def test_device_that_never_appears_is_a_clear_timeout(host):
    vid = _new_volume(host)
    host.sim.instance_ids = {"i-someoneelse"}  # attach succeeds in the API, no device shows up
    [res] = host.manager([volume("data", host.mnt("data"), volume_id=vid, attach_timeout=1)]).up()
    assert not res.ok
    assert "no block device for it appeared within 1s" in res.error and "nvme-Amazon_Elastic_Block_Store_" in res.error


def test_mounting_again_is_idempotent_and_another_source_is_an_error(host, loopdev):
    vid = _new_volume(host)
    mnt = host.mnt("data")
    mgr = host.manager([volume("data", mnt, fs="xfs", volume_id=vid, format_existing="if-never-written")])
    assert mgr.up()[0].ok
    [again] = mgr.up()
    assert again.ok and "mounted" not in again.actions and "attached" not in again.actions
    # Something else mounted on the target: an error, nothing touched.
    other = loopdev()
    subprocess.run(["mkfs.ext4", "-q", other], check=True)
    mnt2 = host.mnt("other")
    os.makedirs(mnt2)
    subprocess.run(["mount", other, mnt2], check=True)
    vid2 = _new_volume(host)
    [res] = host.manager([volume("other", mnt2, fs="xfs", volume_id=vid2, format_existing="if-never-written")], state_name="s3.json").up()
    assert not res.ok and "already has" in res.error and other in res.error


def test_read_only_and_multi_attach_are_never_formatted(host):
    ro = _new_volume(host)
    [res] = host.manager([volume("ro", host.mnt("ro"), volume_id=ro, read_only=True)]).up()
    assert not res.ok and "read-only volume is never formatted" in res.error
    assert subprocess.run(["blkid", "-p", host.sim.loop_device(ro)], capture_output=True).returncode == 2

    shared = host.aws.ec2.create_volume(AvailabilityZone=host.identity.availability_zone, Size=1, VolumeType="io2",
                                        Iops=1000, MultiAttachEnabled=True)["VolumeId"]
    [res] = host.manager([volume("shared", host.mnt("shared"), volume_id=shared, multi_attach=True, read_only=True)],
                         state_name="s2.json").up()
    assert not res.ok and "multi-attach volume is never formatted" in res.error
    assert subprocess.run(["blkid", "-p", host.sim.loop_device(shared)], capture_output=True).returncode == 2


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_multi_attach_with_data_is_mounted_read_only(host, fs):
    shared = host.aws.ec2.create_volume(AvailabilityZone=host.identity.availability_zone, Size=1, VolumeType="io2",
                                        Iops=1000, MultiAttachEnabled=True)["VolumeId"]
    host.aws.ec2.attach_volume(VolumeId=shared, InstanceId=host.identity.instance_id, Device="/dev/sdh")
    loop = host.sim.loop_device(shared)
    subprocess.run([f"mkfs.{fs}", "-q", loop], check=True)
    mnt = host.mnt("shared")
    mgr = host.manager([volume("shared", mnt, fs=fs, volume_id=shared, multi_attach=True, read_only=True)])
    [res] = mgr.up()
    assert res.ok, res.error
    opts = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", mnt], capture_output=True, text=True).stdout
    assert opts.startswith("ro")
    mv = mgr.mounted()["shared"]
    assert mv.multi_attach and mv.read_only and not mv.snapshot_on_drain


def test_mounted_survives_a_restart_but_not_a_lost_mount(host):
    vid = _new_volume(host)
    mnt = host.mnt("data")
    cfg = [volume("data", mnt, fs="ext4", volume_id=vid, delete_on_termination=True, format_existing="if-never-written")]
    assert host.manager(cfg).up()[0].ok
    again = host.manager(cfg)  # a new process reading the same state
    assert list(again.mounted()) == ["data"] and again.mounted()["data"].volume_id == vid
    # delete_on_termination was set on the attachment
    inst = host.aws.ec2.describe_instances(InstanceIds=[host.identity.instance_id])["Reservations"][0]["Instances"][0]
    [bdm] = [m for m in inst["BlockDeviceMappings"] if m["Ebs"]["VolumeId"] == vid]
    assert bdm["Ebs"]["DeleteOnTermination"] is True
    subprocess.run(["umount", mnt], check=True)  # as after a reboot: state says mounted, it is not
    assert again.mounted() == {}


def test_several_volumes_attach_at_once_and_mount_parents_first(host):
    vids = [_new_volume(host) for _ in range(3)]
    outer, inner, other = host.mnt("a"), host.mnt("a") + "/b", host.mnt("c")
    cfg = [volume("inner", inner, fs="ext4", volume_id=vids[0], format_existing="if-never-written"),  # listed before its parent on purpose
           volume("outer", outer, fs="xfs", volume_id=vids[1], format_existing="if-never-written"),
           volume("other", other, fs="ext4", volume_id=vids[2], format_existing="if-never-written")]
    results = host.manager(cfg).up()
    assert [r.name for r in results] == ["inner", "outer", "other"]
    assert all(r.ok for r in results), [r.error for r in results]
    assert _fs_of(inner) == "ext4" and _fs_of(outer) == "xfs"
    with open("/proc/self/mountinfo") as fh:
        order = [line.split()[4] for line in fh if line.split()[4] in (outer, inner)]
    assert order == [outer, inner]
    vols = host.aws.ec2.describe_volumes(VolumeIds=vids)["Volumes"]
    names = [v["Attachments"][0]["Device"] for v in vols]
    assert len(set(names)) == 3
