"""Bad [[volumes]] configs are rejected, each with its key path."""

import pytest

from agent.config import ConfigError, parse

VID = 'volume_id = "vol-0123456789abcdef0"\n'


def problems(text):
    with pytest.raises(ConfigError) as info:
        parse(text)
    return [str(p) for p in info.value.problems]


def test_two_volumes_on_one_mount_point():
    text = ('[[volumes]]\nname = "a"\nmount = "/mnt/x"\n' + VID +
            '[[volumes]]\nname = "b"\nmount = "/mnt/x/"\nvolume_id = "vol-0123456789abcdef1"\n')
    assert problems(text) == ["volumes[1].mount: /mnt/x/ is already the mount of volumes[0]"]


def test_two_sources():
    text = '[[volumes]]\nname = "a"\nmount = "/mnt/x"\n' + VID + 'tags = { Name = "data" }\n'
    assert problems(text) == ["volumes[0]: exactly one source allowed, got volume_id and tags"]


def test_no_source():
    assert problems('[[volumes]]\nname = "a"\nmount = "/mnt/x"\n') == [
        "volumes[0]: needs a source: volume_id, tags, snapshot_id, latest_snapshot, create or instance_store"]


def test_unknown_fs():
    text = '[[volumes]]\nname = "a"\nmount = "/mnt/x"\nfs = "btrfs"\n' + VID
    assert problems(text) == ["volumes[0].fs: 'btrfs' is not one of ext4, xfs"]


def test_relative_mount_path():
    text = '[[volumes]]\nname = "a"\nmount = "mnt/x"\n' + VID
    assert problems(text) == ["volumes[0].mount: must be an absolute path, got 'mnt/x'"]


def test_create_spec_and_other_rules_carry_key_paths():
    assert problems('[[volumes]]\nname = "a"\nmount = "/m"\ncreate = { size_gib = 0 }\n') == [
        "volumes[0].create.size_gib: must be >= 1, got 0"]
    assert problems('[[volumes]]\nname = "a"\nmount = "/m"\n' + VID + "multi_attach = true\n") == [
        "volumes[0].read_only: multi_attach volumes must be read_only = true"]
    assert problems('[[volumes]]\nname = "a"\nmount = "/m"\nsnapshot_id = "snap-0123456789abcdef0"\ncopy_across_az = true\n') == [
        "volumes[0].copy_across_az: only applies to volume_id or tags, not snapshot_id"]
    assert problems('[[volumes]]\nname = "a"\nmount = "/m"\n' + VID + 'device_name = "/dev/nvme1n1"\n') == [
        "volumes[0].device_name: must look like /dev/sdf, got '/dev/nvme1n1'"]


def test_a_full_example_parses():
    text = """
[[volumes]]
name = "datasets"
mount = "/mnt/datasets"
tags = { Name = "training-datasets" }
create = { size_gib = 100, type = "gp3", iops = 3000, throughput = 125, encrypted = true }
[[volumes]]
name = "checkpoints"
mount = "/mnt/checkpoints"
fs = "ext4"
latest_snapshot = { Name = "ckpt-run-42" }
initialize = true
fstab = true
[[volumes]]
name = "scratch"
mount = "/scratch"
instance_store = true
required = false
"""
    cfg = parse(text)
    assert [v.name for v in cfg.volumes] == ["datasets", "checkpoints", "scratch"]
    assert cfg.volumes[0].create.iops == 3000 and not cfg.volumes[0].delete_on_termination


def test_format_existing_defaults_to_never_and_applies_only_where_it_can():
    base = '[[volumes]]\nname = "a"\nmount = "/m"\n'
    assert parse(base + VID).volumes[0].format_existing == "never"
    for ok in (VID, 'tags = { Name = "w" }\n', 'tags = { Name = "w" }\ncreate = { size_gib = 1 }\n'):
        assert parse(base + ok + 'format_existing = "if-never-written"\n').volumes[0].format_existing == "if-never-written"
    assert problems(base + VID + 'format_existing = "always"\n') == [
        "volumes[0].format_existing: 'always' is not one of never, if-never-written"]
    assert problems(base + 'snapshot_id = "snap-0123456789abcdef0"\nformat_existing = "if-never-written"\n') == [
        "volumes[0].format_existing: only applies to volume_id or tags, not snapshot_id (a volume from a snapshot "
        "is never formatted; one spot-agent creates empty always is)"]
    assert problems(base + VID + 'read_only = true\nformat_existing = "if-never-written"\n') == [
        "volumes[0].format_existing: a read-only or multi-attach volume is never formatted"]
    assert problems(base + 'create = { size_gib = 1 }\nformat_existing = "if-never-written"\n') == [
        "volumes[0].format_existing: only applies to volume_id or tags (a volume spot-agent creates empty is always formatted)"]
    assert problems(base + 'instance_store = true\nformat_existing = "if-never-written"\n')[0].startswith(
        "volumes[0].format_existing: only applies to volume_id or tags, not instance_store")
