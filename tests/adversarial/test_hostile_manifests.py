"""Hostile, corrupt and truncated checkpoint manifests, written where the job can write: the S3 prefix.

Whoever can write the prefix can put a newer ``manifests/<id>.json`` there. Each case below makes the
newest manifest hostile and checks that the restore refuses it (without building anything from it:
a 1 TiB file in 1-byte parts used to be a MemoryError), falls back to the newest manifest that
verifies, says so (log, ``RestoreResult.rejected``, the fallback metric, the daemon's status), writes
nothing outside its directory, and that the store still works afterwards. Real moto over HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from agent import metrics
from agent.config import CheckpointSection, TransferSection
from agent.transfer.checkpoints import CheckpointStore, new_checkpoint_id
from tests.daemon_harness import AgentProcess, wait_file
from tests.integration.transfer_helpers import tree_hashes

BUCKET = "hostile-bucket"
PREFIX = "run-7/"
MiB = 1024 * 1024


def section(tmp_path, d="ckpt", **kw) -> CheckpointSection:
    ck = CheckpointSection(dir=str(tmp_path / d), s3=f"s3://{BUCKET}/{PREFIX}", settle=0, keep=10)
    for k, v in kw.items():
        setattr(ck, k, v)
    return ck


def transfer() -> TransferSection:
    return TransferSection(concurrency=4, part_size=5 * MiB, multipart_threshold=5 * MiB)


@pytest.fixture
def committed(aws, tmp_path):
    """One good checkpoint, committed by the agent; returns (store, its id, the tree's hashes)."""
    aws.s3.create_bucket(Bucket=BUCKET)
    root = tmp_path / "ckpt" / "step-1"
    root.mkdir(parents=True)
    (root / "model.pt").write_bytes(os.urandom(6 * MiB + 3))  # two parts
    (root / "COMPLETE").write_text("")
    store = CheckpointStore(aws.s3, section(tmp_path), transfer(), str(tmp_path / "state"))
    r = store.upload()
    assert r.committed, r.error
    return store, r.checkpoint_id, tree_hashes(str(tmp_path / "ckpt"))


def good_doc(store: CheckpointStore, cid: str) -> dict:
    return json.loads(store.s3.get_object(Bucket=BUCKET, Key=store.manifest_key(cid))["Body"].read())


def put_manifest(s3, cid: str, body) -> None:
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}manifests/{cid}.json",
                  Body=body if isinstance(body, bytes) else json.dumps(body).encode())


def newer_id(k: int = 1) -> str:
    return new_checkpoint_id(time.time() + k)


def hostile(kind: str, doc: dict, cid: str) -> object:
    """The newest manifest, rewritten by someone who can write the prefix."""
    doc = dict(doc, id=cid, created=doc["created"] + 0)
    first = doc["files"][0]
    if kind == "huge-part-count":  # 1 TiB in 1-byte parts: one chunk each, if built before checking
        doc["files"] = [dict(first, size=2 ** 40, checksum=dict(first["checksum"], part_size=1, parts=[]))]
    elif kind == "non-dict-entries":
        doc["files"] = ["step-1/model.pt", None, 42] + doc["files"]
    elif kind == "traversal-path":
        doc["files"] = [dict(first, path="../../../../etc/cron.d/pwn", key="data/x/../../../../etc/cron.d/pwn")]
    elif kind == "absolute-path":
        doc["files"] = [dict(first, path="/root/.ssh/authorized_keys")]
    elif kind == "foreign-key":  # any object under the prefix (or a traversal in the key) as the data
        doc["files"] = [dict(first, key="data/../manifests/" + cid + ".json")]
    elif kind == "nul-in-path":
        doc["files"] = [dict(first, path="step-1/mod\x00el.pt")]
    elif kind == "parts-mismatch":
        doc["files"] = [dict(first, checksum=dict(first["checksum"], parts=first["checksum"]["parts"] * 500))]
    elif kind == "files-not-a-list":
        doc["files"] = {"step-1/model.pt": first}
    elif kind == "truncated":
        return json.dumps(doc).encode()[:-25]
    elif kind == "deeply-nested":
        return b"[" * 100_000 + b"]" * 100_000
    elif kind == "not-json":
        return b"\x00\xffPK\x03\x04 a zip, not a manifest"
    else:
        raise AssertionError(kind)
    # The id must still be newer: the refused manifest is the first one a restore sees.
    doc["id"] = cid
    return doc


KINDS = ["huge-part-count", "non-dict-entries", "traversal-path", "absolute-path", "foreign-key", "nul-in-path",
         "parts-mismatch", "files-not-a-list", "truncated", "deeply-nested", "not-json"]


def outside_snapshot(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "restored" not in p.parts
                  and "state2" not in p.parts)


@pytest.mark.parametrize("kind", KINDS)
def test_restore_skips_a_hostile_newest_manifest_and_restores_the_one_that_verifies(committed, aws, tmp_path, kind, caplog):
    store, good_id, want = committed
    bad = newer_id()
    put_manifest(aws.s3, bad, hostile(kind, good_doc(store, good_id), bad))
    before = outside_snapshot(tmp_path)
    fallbacks = metrics.CHECKPOINT_RESTORE_FALLBACKS.labels(checkpoint="restored")._value.get()
    fresh = CheckpointStore(aws.s3, section(tmp_path, "restored"), transfer(), str(tmp_path / "state2"))
    with caplog.at_level(logging.WARNING, logger="agent.transfer.checkpoints"):
        rr = fresh.restore()
    assert rr.restored and rr.checkpoint_id == good_id, rr.error
    assert [r["id"] for r in rr.rejected] == [bad] and rr.rejected[0]["reason"] and rr.fell_back
    assert tree_hashes(str(tmp_path / "restored")) == want
    assert outside_snapshot(tmp_path) == before  # nothing written anywhere else
    assert metrics.CHECKPOINT_RESTORE_FALLBACKS.labels(checkpoint="restored")._value.get() == fallbacks + 1
    assert any(bad in r.getMessage() and "does not verify" in r.getMessage() for r in caplog.records)
    assert any("restoring " + good_id in r.getMessage() for r in caplog.records)
    # The agent still works: the next upload commits, on the good baseline (nothing re-sent).
    again = store.upload(reason="interval")
    assert again.committed and again.uploaded == 0 and again.reused == 2, again
    assert store.latest()["id"] == again.checkpoint_id


def test_only_hostile_manifests_restore_nothing_and_say_why(aws, tmp_path):
    aws.s3.create_bucket(Bucket=BUCKET)
    bad = newer_id()
    put_manifest(aws.s3, bad, b'{"format": "spot-agent-checkpoint/1", "files": [')
    rr = CheckpointStore(aws.s3, section(tmp_path, "restored"), transfer(), str(tmp_path / "s")).restore()
    assert not rr.restored and not rr.checkpoint_id and "verifies" in rr.error and bad in rr.error
    assert [r["id"] for r in rr.rejected] == [bad]
    assert not (tmp_path / "restored").exists() or not any((tmp_path / "restored").iterdir())


def test_a_huge_manifest_object_is_not_read(committed, aws, tmp_path, monkeypatch):
    from agent.transfer import checkpoints

    store, good_id, _ = committed
    bad = newer_id()
    put_manifest(aws.s3, bad, b" " * 4096 + json.dumps(good_doc(store, good_id)).encode())
    monkeypatch.setattr(checkpoints, "MAX_MANIFEST_BYTES", 4096)  # stands in for a 300 MB object
    rr = CheckpointStore(aws.s3, section(tmp_path, "restored"), transfer(), str(tmp_path / "s")).restore()
    assert rr.restored and rr.checkpoint_id == good_id and "at most 4096" in rr.rejected[0]["reason"]


def test_the_daemon_boots_past_a_hostile_manifest_and_reports_the_fallback(committed, aws, tmp_path, imds_sim):
    store, good_id, want = committed
    bad = newer_id()
    put_manifest(aws.s3, bad, hostile("non-dict-entries", good_doc(store, good_id), bad))
    state = tmp_path / "agent-state"
    cfg = f'''
[agent]
state_dir = "{state}"
socket = "{state}/agent.sock"
[imds]
endpoint = "{imds_sim.url}"
[aws]
region = "us-east-1"
endpoint_url = "{aws.url}"
[metrics]
enabled = false
[drain.lifecycle]
enabled = false
[[checkpoints]]
dir = "{tmp_path}/restored"
s3 = "s3://{BUCKET}/{PREFIX}"
interval = 0
restore = true
'''
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.wait_ready(30)
        status = json.loads(wait_file(str(state / "status.json"), 10, contains="rejected_manifests"))
        fb = status["restore_fallbacks"]
        assert fb and fb[0]["checkpoint_id"] == good_id and fb[0]["rejected_manifests"][0]["id"] == bad, fb
        assert tree_hashes(str(tmp_path / "restored")) == want
        assert f"manifest {PREFIX}manifests/{bad}.json does not verify" in agent.log()
    finally:
        agent.stop()
