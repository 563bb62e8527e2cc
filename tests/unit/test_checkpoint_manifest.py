"""The checkpoint manifest validator: any JSON value or any bytes give a validated manifest or a
ManifestError with one line, never another exception (no MemoryError, TypeError, RecursionError), and
whatever passes is safe to build a restore from. Pure: hypothesis drives the validator directly."""

from __future__ import annotations

import base64
import hashlib
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.transfer.checkpoint_manifest import (FORMAT, MAX_PARTS, ManifestError, id_time, parse, validate)
from agent.transfer.checkpoints import marker_groups, new_checkpoint_id

NOW = 1796156118.405336
CID = new_checkpoint_id(NOW)
OLD = new_checkpoint_id(NOW - 3600)
SHA = base64.b64encode(hashlib.sha256(b"x").digest()).decode()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30)

names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00"), min_size=1, max_size=12) \
    .filter(lambda s: s not in (".", "..") and not s.startswith(".spot-agent-"))


def entry(path: str, size: int, part_size: int = 0, owner: str = CID) -> dict:
    part_size = part_size or max(1, size)
    n = max(1, -(-size // part_size))
    return {"path": path, "size": size, "key": f"data/{owner}/{path}",
            "checksum": {"algorithm": "sha256", "part_size": part_size, "parts": [SHA] * n},
            "mtime_ns": 1796156100000000000, "ctime_ns": 1796156100000000000, "ino": 1234}


def manifest(files) -> dict:
    return {"format": FORMAT, "id": CID, "created": NOW, "reason": "interval", "host": "ip-10-0-0-1",
            "source_dir": "/mnt/ckpt", "files": files, "total_bytes": sum(f["size"] for f in files), "incomplete": []}


def good() -> dict:
    return manifest([entry("step-1/model.pt", 11 * 2 ** 20 + 7, 5 * 2 ** 20, OLD), entry("step-1/COMPLETE", 0),
                     entry("latest", 7)])


def assert_safe(doc: dict) -> None:
    """What a restore relies on, for anything the validator let through."""
    assert doc["format"] == FORMAT and doc["id"] == CID
    seen = set()
    for e in doc["files"]:
        p = e["path"]
        assert p and not p.startswith("/") and "\x00" not in p and "\\" not in p and p not in seen
        assert all(seg not in ("", ".", "..") for seg in p.split("/"))
        seen.add(p)
        owner = e["key"].split("/")[1]
        assert e["key"] == f"data/{owner}/{p}" and id_time(owner) is not None and owner <= CID
        cs = e["checksum"]
        assert 1 <= len(cs["parts"]) == max(1, -(-e["size"] // cs["part_size"])) <= MAX_PARTS
        assert not e.get("mode", 0) & 0o6000
    assert doc["total_bytes"] == sum(e["size"] for e in doc["files"])
    assert math.isfinite(doc["created"])


def check(doc, cid: str = CID):
    try:
        out = validate(doc, cid, now=NOW)
    except ManifestError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    assert_safe(out)
    return out


def test_what_the_store_writes_verifies_and_round_trips():
    doc = good()
    out = validate(json.loads(json.dumps(doc)), CID, now=NOW)
    assert out == doc


@given(json_values)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_json_value_is_a_manifest_or_a_clear_rejection(value):
    check(value)


@given(st.binary(max_size=400))
@settings(deadline=None)
def test_any_bytes_are_a_manifest_or_a_clear_rejection(body):
    try:
        parse(body, CID, now=NOW)
    except ManifestError as exc:
        assert str(exc)


def _paths(doc, prefix=()):
    """Every (path of keys/indexes) inside a manifest, to mutate one of them."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = list(_paths(good()))[1:]


@given(st.sampled_from(ALL_PATHS), json_values | st.integers(min_value=-2 ** 70, max_value=2 ** 70), st.booleans())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_one_field_changed_or_removed_still_verifies_safely_or_is_refused(where, value, remove):
    doc = good()
    target = doc
    for k in where[:-1]:
        target = target[k]
    if remove and isinstance(target, dict):
        del target[where[-1]]
    else:
        target[where[-1]] = value
    check(doc)


@given(st.lists(st.tuples(st.lists(names, min_size=1, max_size=3), st.integers(0, 10 ** 9), st.integers(1, 10 ** 8)),
                max_size=8, unique_by=lambda t: "/".join(t[0])))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_manifest_the_writer_makes_verifies(files):
    entries = [entry("/".join(segs), size, ps) for segs, size, ps in files
               if max(1, -(-size // ps)) <= MAX_PARTS]
    paths = {e["path"] for e in entries}
    entries = [e for e in entries if not any(p.startswith(e["path"] + "/") for p in paths)]  # a file is not a dir
    out = check(json.loads(json.dumps(manifest(entries))))
    assert out is not None and len(out["files"]) == len(entries)


@pytest.mark.parametrize("change, expect", [
    (lambda d: d["files"][0]["checksum"].update(part_size=1, parts=[SHA]), "parts"),  # 11 MiB in 1-byte parts
    (lambda d: d["files"].append(dict(entry("huge", 7), size=2 ** 40, checksum={"algorithm": "sha256", "part_size": 1, "parts": []})),
     f"at most {MAX_PARTS}"),
    (lambda d: d["files"].append("not an object"), "expected an object"),
    (lambda d: d["files"].append(None), "expected an object"),
    (lambda d: d["files"].append(entry("../../root/.ssh/authorized_keys", 7)), "'..'"),
    (lambda d: d["files"].append(entry("/etc/cron.d/x", 7)), "absolute"),
    (lambda d: d["files"].append(entry("a/\x00/b", 7)), "NUL"),
    (lambda d: d["files"].append(entry("a\ud800b", 7)), "encode"),
    (lambda d: d["files"].append(dict(entry("x", 7), key="data/../../other-run/x")), "key"),
    (lambda d: d["files"].append(dict(entry("x", 7), key="manifests/x")), "key"),
    (lambda d: d["files"].append(entry("x", 7, owner=new_checkpoint_id(NOW + 60))), "key"),
    (lambda d: d["files"].append(entry("latest", 7)), "listed twice"),
    (lambda d: d["files"].append(dict(entry("x", 7), size=True)), "size"),
    (lambda d: d["files"].append(dict(entry("x", 7), size=-1)), "size"),
    (lambda d: d["files"].append(dict(entry("x", 7), mode=0o10644)), "mode"),
    (lambda d: d["files"].append(dict(entry("x", 7), uid=-1)), "uid"),
    (lambda d: d["files"][0]["checksum"].update(algorithm=["sha256"]), "algorithm"),
    (lambda d: d["files"][0]["checksum"]["parts"].__setitem__(0, "not base64!"), "digest"),
    (lambda d: d.update(total_bytes=1), "total_bytes"),
    (lambda d: d.update(created=NOW + 86400), "created"),
    (lambda d: d.update(id="20261201T000000.000000Z-abcdef"), "id"),
    (lambda d: d.update(format="spot-agent-checkpoint/2"), "format"),
    (lambda d: d.update(files={"a": 1}), "files"),
])
def test_hostile_fields_are_refused_with_a_reason(change, expect):
    doc = good()
    change(doc)
    with pytest.raises(ManifestError, match=None) as info:
        validate(doc, CID, now=NOW)
    assert expect in str(info.value), str(info.value)


def test_owner_and_mode_are_kept_but_never_setuid_or_setgid():
    doc = good()
    doc["files"][2].update(uid=1000, gid=1000, mode=0o6755)
    out = validate(doc, CID, now=NOW)
    assert {k: out["files"][2][k] for k in ("uid", "gid", "mode")} == {"uid": 1000, "gid": 1000, "mode": 0o755}


def test_a_manifest_from_the_future_is_refused():
    future = new_checkpoint_id(NOW + 7200)
    doc = dict(good(), id=future, created=NOW + 7200)
    with pytest.raises(ManifestError, match="future"):
        validate(doc, future, now=NOW)


@pytest.mark.parametrize("body, expect", [
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b'{"format": NaN}', "NaN"),
    (b'{"created": Infinity}', "Infinity"),
    (b'{"format": "spot-agent-checkpoint/1", "files": [', "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    (json.dumps(good()).encode()[:-40], "not JSON"),  # truncated
])
def test_bodies_that_are_not_json_are_refused(body, expect):
    with pytest.raises(ManifestError) as info:
        parse(body, CID, now=NOW)
    assert expect in str(info.value)
def test_marker_groups_follow_the_nearest_marker():
    paths = ["step-1/COMPLETE", "step-1/w.pt", "step-1/sub/x", "step-2/w.pt", "latest"]
    assert marker_groups(paths, "COMPLETE") == {"step-1/COMPLETE": "step-1", "step-1/w.pt": "step-1",
                                                "step-1/sub/x": "step-1", "step-2/w.pt": None, "latest": None}
    assert marker_groups(["COMPLETE", "a/b"], "COMPLETE") == {"COMPLETE": "", "a/b": ""}
