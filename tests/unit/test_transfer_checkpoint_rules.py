"""Checkpoint completeness (settle) and id ordering (pure)."""

from __future__ import annotations

from agent.transfer.checkpoints import ID_RE, complete_files, new_checkpoint_id
from agent.transfer.upload import LocalFile


def lf(path: str, mtime: float, ctime: float) -> LocalFile:
    return LocalFile(path, "/nonexistent/" + path, 1, int(mtime * 1e9), int(ctime * 1e9), 1)


def test_settle_uses_the_newer_of_mtime_and_ctime():
    files = [lf("old", 100, 100), lf("touched", 100, 995), lf("fresh", 999, 999)]
    done, pending = complete_files("/nonexistent", files, settle=10, marker="", now=1000)
    assert [f.path for f in done] == ["old"] and pending == ["touched", "fresh"]
    done, pending = complete_files("/nonexistent", files, settle=0, marker="", now=1000)
    assert len(done) == 3 and pending == []


def test_marker_missing_means_incomplete():
    done, pending = complete_files("/nonexistent", [lf("a/b", 1, 1)], settle=0, marker="COMPLETE", now=1000)
    assert done == [] and pending == ["a/b"]


def test_ids_sort_in_time_order():
    a, b, c = new_checkpoint_id(1_700_000_000.25), new_checkpoint_id(1_700_000_000.5), new_checkpoint_id(1_800_000_000.0)
    assert all(ID_RE.match(x) for x in (a, b, c))
    assert sorted([c, a, b]) == [a, b, c]
