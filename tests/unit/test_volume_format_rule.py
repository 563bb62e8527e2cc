"""The formatting rule: which blank-looking devices may be formatted, and what "never written" reads."""

from __future__ import annotations

import os
import tempfile

import pytest

from agent.volumes import format_rule as FR
from agent.volumes.probe import scan_written

MiB = 1024 * 1024
GiB = 1024 * MiB


def facts(**kw):
    base = dict(name="data", device="/dev/nvme1n1", volume_id="vol-0123456789abcdef0")
    base.update(kw)
    return FR.FormatFacts(**base)


# ---- sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64 * MiB, 400 * MiB + 512, GiB, 100 * GiB, 16 * 1024 * GiB])
def test_sample_covers_both_ends_and_one_block_per_stratum(size):
    ext = FR.sample_extents(size)
    assert ext[0][0] == 0 and ext[0][1] >= FR.EDGE_BYTES
    last_off, last_len = ext[-1]
    assert last_off + last_len == size and last_len >= FR.EDGE_BYTES
    # sorted, non-overlapping, inside the device
    for (a, la), (b, _) in zip(ext, ext[1:]):
        assert a + la < b
    assert all(0 <= off and off + length <= size for off, length in ext)
    # every stratum between the edges holds exactly one sampled block
    start, end = FR.EDGE_BYTES, size - FR.EDGE_BYTES
    inner = [e for e in ext if e[0] >= start and e[0] + e[1] <= end]
    assert len(inner) == FR.SAMPLE_BLOCKS
    span = end - start
    for i, (off, length) in enumerate(inner):
        lo, hi = start + span * i // FR.SAMPLE_BLOCKS, start + span * (i + 1) // FR.SAMPLE_BLOCKS
        assert lo <= off and off + length <= hi and length == FR.SAMPLE_BLOCK_BYTES
    # bounded: 2 MiB of edges and 128 blocks, whatever the size
    assert sum(length for _, length in ext) == 2 * FR.EDGE_BYTES + FR.SAMPLE_BLOCKS * FR.SAMPLE_BLOCK_BYTES


def test_sample_is_deterministic_and_not_a_fixed_stride():
    a, b = FR.sample_extents(GiB), FR.sample_extents(GiB)
    assert a == b
    inner = [off for off, _ in a[1:-1]]
    strides = {y - x for x, y in zip(inner, inner[1:])}
    assert len(strides) > 10  # positions inside the strata vary


def test_small_device_is_read_whole():
    assert FR.sample_extents(3 * MiB) == [(0, 3 * MiB)]
    assert FR.sample_extents(0) == []


def test_first_nonzero():
    assert FR.first_nonzero(b"") == -1
    assert FR.first_nonzero(bytes(4096)) == -1
    assert FR.first_nonzero(bytes(100) + b"\x01" + bytes(10)) == 100
    assert FR.first_nonzero(b"\xff") == 0


# ---- reading (a sparse file stands in for the device: same pread path) ---------------------------------


def _scan(size, writes=()):
    with tempfile.NamedTemporaryFile() as fh:
        fh.truncate(size)
        for off, data in writes:
            fh.seek(off)
            fh.write(data)
        fh.flush()
        fd = os.open(fh.name, os.O_RDONLY)
        try:
            return scan_written(fd, size)
        finally:
            os.close(fd)


def test_all_zeros_reads_as_never_written():
    res = _scan(256 * MiB)
    assert res.never_written and res.first_nonzero == -1 and not res.error
    assert res.bytes_read == 2 * MiB + 128 * 64 * 1024


@pytest.mark.parametrize("where", ["start", "last-mib", "md-1.0-superblock", "middle-8MiB"])
def test_data_anywhere_it_is_looked_for_is_found(where):
    size = 256 * MiB
    off, data = {
        "start": (4096, b"\x01"),  # an ext4 whose first 4 KiB were zeroed still has its group descriptors here
        "last-mib": (size - 1, b"\x01"),
        "md-1.0-superblock": (size - 8192, b"\xfc\x4e\x2b\xa9"),  # 8 KiB before the end, 4 KiB aligned
        "middle-8MiB": (120 * MiB, os.urandom(8 * MiB)),  # zeros at both ends, data in between
    }[where]
    res = _scan(size, [(off, data)])
    assert not res.never_written
    assert off <= res.first_nonzero < off + len(data)
    assert "non-zero byte at offset" in res.describe()


def test_a_short_read_is_never_never_written():
    with tempfile.NamedTemporaryFile() as fh:
        fh.truncate(16 * MiB)
        fd = os.open(fh.name, os.O_RDONLY)
        try:
            res = scan_written(fd, 32 * MiB)  # the "device" claims more than can be read
        finally:
            os.close(fd)
    assert not res.never_written and "short read" in res.error


# ---- the decision ----------------------------------------------------------------------------------


def test_created_empty_is_formatted_without_reading():
    d = FR.decide(facts(created_empty=True))
    assert d.format and not d.needs_scan and "created this volume empty" in d.reason


def test_default_refuses_a_blank_volume_it_did_not_create_with_one_line_naming_it():
    d = FR.decide(facts())
    assert not d.format and not d.needs_scan
    assert "\n" not in d.reason
    assert "volume data (vol-0123456789abcdef0) on /dev/nvme1n1" in d.reason
    assert 'format_existing = "if-never-written"' in d.reason


def test_if_never_written_needs_the_read_and_follows_it():
    f = facts(policy=FR.IF_NEVER_WRITTEN)
    first = FR.decide(f)
    assert not first.format and first.needs_scan
    yes = FR.decide(f, FR.WrittenCheck(True, bytes_read=10 * MiB))
    assert yes.format and "never written" in yes.reason
    no = FR.decide(f, FR.WrittenCheck(False, first_nonzero=4096, bytes_read=MiB))
    assert not no.format and "non-zero byte at offset 4096" in no.reason and "/dev/nvme1n1" in no.reason
    err = FR.decide(f, FR.WrittenCheck(False, error="offset 0: Input/output error"))
    assert not err.format and "could not be read" in err.reason


@pytest.mark.parametrize("kw,words", [
    (dict(read_only=True), "read-only volume is never formatted"),
    (dict(multi_attach=True, read_only=True), "multi-attach volume is never formatted"),
    (dict(from_snapshot=True), "created from a snapshot"),
    (dict(blank=False), "already carries a signature"),
])
def test_never_formatted_whatever_the_licence(kw, words):
    for extra in (dict(created_empty=True), dict(policy=FR.IF_NEVER_WRITTEN)):
        d = FR.decide(facts(**kw, **extra), FR.WrittenCheck(True))
        assert not d.format and words in d.reason


def test_instance_store_scratch_is_formatted_when_it_carries_no_signature():
    d = FR.decide(facts(volume_id="", instance_store=True))
    assert d.format and "instance-store" in d.reason
