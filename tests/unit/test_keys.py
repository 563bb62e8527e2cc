"""Key -> local path safety and include/exclude globs (pure)."""

from __future__ import annotations

import pytest

from agent.transfer.keys import ConflictDetector, KeyFilter, key_to_relpath, split_s3_url


@pytest.mark.parametrize("key,path", [
    ("p/a.txt", "a.txt"), ("p/d/e/f.bin", "d/e/f.bin"), ("p/..hidden", "..hidden"), ("p/a..b", "a..b"),
    ("p/ünïcode/ß", "ünïcode/ß"), ("p/.dotfile", ".dotfile"),
])
def test_good_keys_map_to_relative_paths(key, path):
    assert key_to_relpath(key, "p/").path == path


@pytest.mark.parametrize("key,why", [
    ("p/../evil", "'..'"), ("p//abs", "absolute"), ("p/a\\b", "backslash"), ("p/a//b", "empty path segment"),
    ("p/dir/", "ends with '/'"), ("p/a/../../x", "'..'"), ("p/./x", "'.'"), ("p/a\x00b", "NUL"),
    ("p/" + "n" * 256, "longer than 255"), ("p/.spot-agent-tmp-x", "reserved temp"),
    ("p/.spot-agent-sync/m", "reserved state"), ("other/x", "outside the prefix"),
])
def test_bad_keys_are_refused_with_a_reason(key, why):
    v = key_to_relpath(key, "p/", size=5)
    assert v.path is None and why in v.reason and repr(key) in v.reason


def test_zero_byte_folder_objects_are_markers_not_errors():
    assert key_to_relpath("p/folder/", "p/", 0).marker
    assert not key_to_relpath("p/folder/", "p/", 3).marker
    assert not key_to_relpath("p/../", "p/", 0).marker
    assert key_to_relpath("p/", "p/", 0).marker


def test_split_s3_url_treats_the_prefix_as_a_directory():
    assert split_s3_url("s3://bkt/a/b") == ("bkt", "a/b/")
    assert split_s3_url("s3://bkt/a/b/") == ("bkt", "a/b/")
    assert split_s3_url("s3://bkt") == ("bkt", "")
    with pytest.raises(ValueError):
        split_s3_url("http://bkt/x")


def test_filter_globs_match_paths_and_base_names_and_exclude_wins():
    f = KeyFilter(["*.tar"], ["skip/*"])
    assert f("a.tar") and f("d/e/a.tar")
    assert not f("a.txt") and not f("skip/a.tar")
    assert KeyFilter()("anything")
    g = KeyFilter([], ["*.tmp"])
    assert g("a.bin") and not g("x/y.tmp")


def test_conflict_detector_finds_file_then_dir_in_sorted_order():
    d = ConflictDetector()
    seen = {k: d.check(k) for k in sorted(["x", "x-a", "x.b", "x/y", "x/z/w", "y", "yy/z"])}
    assert seen["x/y"] == "x" and seen["x/z/w"] == "x"
    assert seen["x"] is None and seen["x-a"] is None and seen["y"] is None and seen["yy/z"] is None


def test_conflict_detector_nested():
    d = ConflictDetector()
    assert [d.check(k) for k in ["a/b", "a/b/c", "a/c", "a/c-d", "a/c/e"]] == [None, "a/b", None, None, "a/c"]
