"""The merge-join planner: what to skip, fetch, verify, refuse (pure; stat is a dict lookup)."""

from __future__ import annotations

from agent.transfer.planner import (Download, Filtered, LocalStat, ManifestEntry, Refuse, RemoteObject, Skip, Stale,
                                    decide, plan)
from agent.transfer.keys import KeyFilter


def obj(key, size=10, etag='"e1"'):
    return RemoteObject(key, size, etag)


def test_skip_needs_manifest_etag_and_local_stat_to_agree():
    o = obj("p/a")
    entry = ManifestEntry("p/a", "a", 10, '"e1"', 111)
    assert isinstance(decide(o, "a", entry, LocalStat(10, 111, True)), Skip)
    # Same size, new ETag: the same-size update trap.
    d = decide(obj("p/a", etag='"e2"'), "a", entry, LocalStat(10, 111, True))
    assert isinstance(d, Download) and d.reason == "changed" and d.verify
    # Local file touched since we wrote it.
    d = decide(o, "a", entry, LocalStat(10, 222, True))
    assert isinstance(d, Download) and d.reason == "local-modified"
    # Gone locally.
    assert decide(o, "a", entry, None).reason == "missing"
    # No manifest row, but a same-size local file: verify by hash before fetching.
    d = decide(o, "a", None, LocalStat(10, 5, True))
    assert d.verify and d.reason == "unverified"
    assert not decide(o, "a", None, LocalStat(9, 5, True)).verify
    assert decide(o, "a", None, LocalStat(10, 5, False)).reason == "not-a-file"


def test_plan_merges_listing_and_manifest_and_reports_stale_rows():
    remote = [obj("p/a"), obj("p/c"), obj("p/e")]
    manifest = [ManifestEntry("p/a", "a", 10, '"e1"', 1), ManifestEntry("p/b", "b", 3, '"x"', 1),
                ManifestEntry("p/c", "c", 10, '"old"', 1), ManifestEntry("p/z", "z", 1, '"y"', 1)]
    local = {"a": LocalStat(10, 1, True), "c": LocalStat(10, 1, True)}
    acts = list(plan(remote, manifest, local.get, "p/"))
    kinds = [(type(a).__name__, getattr(a, "key", None) or a.entry.key) for a in acts]
    assert kinds == [("Skip", "p/a"), ("Stale", "p/b"), ("Download", "p/c"), ("Download", "p/e"), ("Stale", "p/z")]


def test_plan_refuses_bad_keys_conflicts_and_filters():
    remote = [obj("p/../x"), obj("p/f"), obj("p/f/g"), obj("p/keep.tar"), obj("p/skip.txt"), obj("p/folder/", 0)]
    acts = list(plan(sorted(remote), [], lambda p: None, "p/", KeyFilter(["*.tar", "f*"])))
    refused = [a for a in acts if isinstance(a, Refuse)]
    assert [a.key for a in refused if not a.marker] == ["p/../x", "p/f/g"]
    assert [a.key for a in refused if a.marker] == ["p/folder/"]
    assert [a.key for a in acts if isinstance(a, Filtered)] == ["p/skip.txt"]
    assert sorted(a.key for a in acts if isinstance(a, Download)) == ["p/f", "p/keep.tar"]


def test_out_of_order_listing_falls_back_to_lookup():
    manifest = {"p/a": ManifestEntry("p/a", "a", 10, '"e1"', 1)}
    acts = list(plan([obj("p/b"), obj("p/a")], [], {"a": LocalStat(10, 1, True)}.get, "p/", lookup=manifest.get))
    assert isinstance(acts[1], Skip) and acts[1].key == "p/a"


def test_plan_streams_in_constant_memory():
    # A generator in, a generator out: nothing materialises the listing.
    n = 200_000
    remote = (obj(f"p/{i:08d}") for i in range(n))
    count = 0
    for a in plan(remote, iter(()), lambda p: None, "p/"):
        count += isinstance(a, Download)
    assert count == n
