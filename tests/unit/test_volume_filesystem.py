"""Pure parts of format/mount/grow: mountinfo, options, fstab, unit names, probe parsing, growth."""

from agent.volumes.filesystem import (fstab_line, merge_fstab, mount_at, mount_options, mount_unit_text, needs_growth,
                                      parse_dumpe2fs, parse_mountinfo, parse_xfs_info, unit_name)
from agent.volumes.instance_store import InstanceStoreError, plan
from agent.volumes.probe import ProbeResult, parse_export

MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
42 22 7:3 / /mnt/check\\040points rw,relatime shared:2 - xfs /dev/loop3 rw,inode64
43 22 7:4 / /mnt/data rw,relatime - ext4 /dev/loop4 rw
44 22 7:5 / /mnt/data rw,relatime - ext4 /dev/loop5 rw
"""


def test_parse_mountinfo_decodes_escapes_and_topmost_wins():
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[1].mountpoint == "/mnt/check points" and mounts[1].major_minor == "7:3" and mounts[1].fstype == "xfs"
    assert mount_at(mounts, "/mnt/data/").source == "/dev/loop5"
    assert mount_at(mounts, "/mnt/none") is None


def test_mount_options():
    assert mount_options("xfs", [], False, False, False) == ["defaults"]
    assert mount_options("xfs", ["noatime"], False, False, True) == ["noatime", "nouuid"]
    assert mount_options("ext4", ["rw", "noatime"], True, False, False) == ["ro", "noatime"]
    assert mount_options("xfs", [], True, True, False) == ["ro", "norecovery"]
    assert mount_options("ext4", [], True, True, False) == ["ro", "noload"]


def test_fstab_line_has_uuid_and_nofail_and_merges_idempotently():
    line = fstab_line("1234-abcd", "/mnt/ckpt", "xfs", ["defaults"], "ckpt")
    assert line.startswith("UUID=1234-abcd /mnt/ckpt xfs nofail,")
    assert line.endswith("# spot-agent:ckpt")
    text = "UUID=root / ext4 defaults 0 1\n/dev/old /mnt/ckpt xfs defaults 0 2\n"
    merged = merge_fstab(text, line, "/mnt/ckpt", "ckpt")
    assert merged.splitlines() == ["UUID=root / ext4 defaults 0 1", line]
    assert merge_fstab(merged, line, "/mnt/ckpt", "ckpt") == merged


def test_unit_names_follow_systemd_escape():
    assert unit_name("/mnt/checkpoints") == "mnt-checkpoints.mount"
    assert unit_name("/mnt/my-data") == "mnt-my\\x2ddata.mount"
    assert unit_name("/") == "-.mount"
    text = mount_unit_text("u-1", "/mnt/x", "ext4", ["noatime"], "x")
    assert "What=/dev/disk/by-uuid/u-1" in text and "Where=/mnt/x" in text and "Options=noatime,nofail" in text


def test_probe_result_describes_what_it_found():
    assert ProbeResult("/dev/x", {}).blank
    pt = ProbeResult("/dev/x", parse_export("DEVNAME=/dev/x\nPTUUID=abc\nPTTYPE=gpt\n"))
    assert not pt.blank and pt.describe() == "a gpt partition table"
    fs = ProbeResult("/dev/x", parse_export("UUID=1\nTYPE=xfs\nLABEL=data\nUSAGE=filesystem\n"))
    assert not fs.blank and fs.uuid == "1" and fs.describe() == "a xfs signature (label 'data')"
    raid = ProbeResult("/dev/x", parse_export("TYPE=linux_raid_member\nUSAGE=raid\n"))
    assert not raid.blank
    odd = ProbeResult("/dev/x", parse_export("DEVNAME=/dev/x\nPART_ENTRY_SCHEME=gpt\n"))
    assert not odd.blank and "unrecognised signature (PART_ENTRY_SCHEME=gpt)" in odd.describe()
    assert ProbeResult("/dev/x", {"DEVNAME": "/dev/x"}).blank


def test_growth_parsers_and_threshold():
    xfs = "meta-data=/dev/loop0 isize=512 agcount=4, agsize=20480 blks\ndata     =bsize=4096   blocks=81920, imaxpct=25\n"
    assert parse_xfs_info(xfs) == 4096 * 81920
    assert parse_dumpe2fs("Block count:              102400\nBlock size:               4096\n") == 4096 * 102400
    assert needs_growth(2 << 30, 1 << 30)
    assert not needs_growth((1 << 30) + (1 << 20), 1 << 30)


def test_instance_store_plans():
    blank = [ProbeResult("/dev/a"), ProbeResult("/dev/b")]
    assert plan("s", ["/dev/a"], blank[:1], True).kind == "single"
    p = plan("s", ["/dev/a", "/dev/b"], blank, True)
    assert p.kind == "raid0" and p.device == "/dev/md/spot-agent-s"
    p = plan("s", ["/dev/a", "/dev/b"], blank, False)
    assert p.kind == "single" and p.device == "/dev/a" and "no md RAID" in p.warning
    members = [ProbeResult(d, {"TYPE": "linux_raid_member"}) for d in ("/dev/a", "/dev/b")]
    assert plan("s", ["/dev/a", "/dev/b"], members, True).kind == "assemble"
    busy = [ProbeResult("/dev/a", {"TYPE": "ext4"}), ProbeResult("/dev/b")]
    try:
        plan("s", ["/dev/a", "/dev/b"], busy, True)
        raise AssertionError("expected a refusal")
    except InstanceStoreError as exc:
        assert "/dev/a holds a ext4 signature" in str(exc)
    try:
        plan("s", [], [], True)
        raise AssertionError("expected an error")
    except InstanceStoreError as exc:
        assert "Amazon EC2 NVMe Instance Storage" in str(exc)
