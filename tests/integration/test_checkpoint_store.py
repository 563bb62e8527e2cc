"""Checkpoint upload/commit/restore/retention against a real moto server."""

from __future__ import annotations

import json
import os
import time

import pytest

from agent.config import CheckpointSection, TransferSection
from agent.sim.faultproxy import Fault, FaultProxy
from agent.transfer.checkpoints import CheckpointStore
from tests.integration.transfer_helpers import client, tree_hashes

BUCKET = "ckpt-bucket"
MiB = 1024 * 1024


@pytest.fixture
def bucket(aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    return aws.s3


def transfer(**kw) -> TransferSection:
    t = TransferSection(concurrency=4, part_size=5 * MiB, multipart_threshold=5 * MiB)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def make_ckpt(root, step: int, big: bool = True) -> dict:
    d = root / f"step-{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "optimizer.pt").write_bytes(os.urandom(200_000))
    if big:
        (d / "model.pt").write_bytes(os.urandom(11 * MiB + 7))  # 3 parts of 5 MiB
    (root / "latest").write_text(f"step-{step}\n")
    return tree_hashes(str(root))


def section(tmp_path, **kw) -> CheckpointSection:
    ck = CheckpointSection(dir=str(tmp_path / "ckpt"), s3=f"s3://{BUCKET}/checkpoints/run-42/", settle=0, keep=2)
    for k, v in kw.items():
        setattr(ck, k, v)
    return ck


def test_upload_commits_manifest_last_and_restore_is_identical(bucket, tmp_path):
    want = make_ckpt(tmp_path / "ckpt", 1)
    store = CheckpointStore(bucket, section(tmp_path), transfer(), str(tmp_path / "state"))
    r = store.upload(reason="interval")
    assert r.committed, r.error
    assert r.files == 3 and r.uploaded == 3 and r.bytes == 11 * MiB + 7 + 200_000 + len("step-1\n")
    doc = store.latest()
    assert doc["id"] == r.checkpoint_id and r.manifest_key.endswith(f"manifests/{r.checkpoint_id}.json")
    model = next(e for e in doc["files"] if e["path"] == "step-1/model.pt")
    assert model["checksum"]["algorithm"] == "sha256" and len(model["checksum"]["parts"]) == 3
    # S3 holds the per-part checksums we sent (it verified them on arrival).
    head = bucket.head_object(Bucket=BUCKET, Key="checkpoints/run-42/" + model["key"], ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")  # moto reports it (its composite format differs from AWS's "-N")
    # Restore into an empty dir on a "new instance".
    fresh = section(tmp_path, dir=str(tmp_path / "restored"))
    rr = CheckpointStore(bucket, fresh, transfer(), str(tmp_path / "state2")).restore()
    assert rr.restored and rr.checkpoint_id == r.checkpoint_id and rr.files == 3, rr.error
    assert tree_hashes(str(tmp_path / "restored")) == want
    # Restoring again finds everything in place (checked by hash, not fetched).
    rr = CheckpointStore(bucket, fresh, transfer(), str(tmp_path / "state2")).restore()
    assert rr.restored and rr.files == 0 and rr.skipped == 3


def test_only_changed_files_are_uploaded(bucket, tmp_path):
    root = tmp_path / "ckpt"
    make_ckpt(root, 1)
    store = CheckpointStore(bucket, section(tmp_path), transfer(), str(tmp_path / "state"))
    first = store.upload()
    assert first.committed and first.uploaded == 3
    (root / "step-2").mkdir()
    (root / "step-2" / "w.pt").write_bytes(b"new weights")
    (root / "latest").write_text("step-2\n")
    r = store.upload()
    assert r.committed and r.uploaded == 2 and r.reused == 2 and r.files == 4, r
    assert r.bytes == len(b"new weights") + len("step-2\n")
    keys = {e["path"]: e["key"] for e in store.latest()["files"]}
    assert keys["step-1/model.pt"].startswith(f"data/{first.checkpoint_id}/")
    assert keys["step-2/w.pt"].startswith(f"data/{r.checkpoint_id}/")
    assert keys["latest"].startswith(f"data/{r.checkpoint_id}/")


def test_settle_leaves_out_files_still_being_written(bucket, tmp_path):
    root = tmp_path / "ckpt"
    make_ckpt(root, 1, big=False)
    store = CheckpointStore(bucket, section(tmp_path, settle=3600), transfer(), str(tmp_path / "state"))
    r = store.upload()
    assert not r.committed and "nothing complete" in r.error and len(r.incomplete) == 2
    assert store.latest() is None


def test_marker_file_convention(bucket, tmp_path):
    root = tmp_path / "ckpt"
    (root / "step-1").mkdir(parents=True)
    (root / "step-1" / "w.pt").write_bytes(b"1" * 1000)
    (root / "step-1" / "COMPLETE").write_text("")
    (root / "step-2").mkdir()
    (root / "step-2" / "w.pt").write_bytes(b"2" * 1000)  # no marker yet: being written
    store = CheckpointStore(bucket, section(tmp_path, settle=3600, marker="COMPLETE"), transfer(), str(tmp_path / "state"))
    r = store.upload()
    assert r.committed and sorted(e["path"] for e in store.latest()["files"]) == ["step-1/COMPLETE", "step-1/w.pt"]
    assert r.incomplete == ["step-2/w.pt"]


def test_interrupted_upload_leaves_previous_checkpoint_newest(bucket, aws, tmp_path):
    root = tmp_path / "ckpt"
    make_ckpt(root, 1)
    store = CheckpointStore(bucket, section(tmp_path), transfer(), str(tmp_path / "state"))
    first = store.upload()
    assert first.committed
    make_ckpt(root, 2)
    # Every upload of a part of step-2's model fails (connection reset mid-body, each attempt).
    with FaultProxy(aws.url, [Fault("reset", method="PUT", path_contains="step-2/model.pt", every=1)]) as proxy:
        broken = CheckpointStore(client(proxy.url, attempts=2), section(tmp_path), transfer(), str(tmp_path / "state"))
        r = broken.upload(reason="drain")
    assert not r.committed and r.error and "step-2/model.pt" in r.error
    assert store.latest()["id"] == first.checkpoint_id
    # The failed multipart upload was aborted: no orphaned parts.
    assert not bucket.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    rr = CheckpointStore(bucket, section(tmp_path, dir=str(tmp_path / "r")), transfer(), str(tmp_path / "s2")).restore()
    assert rr.restored and rr.checkpoint_id == first.checkpoint_id
    assert (tmp_path / "r" / "latest").read_text() == "step-1\n"


def test_deadline_that_cannot_be_met_commits_nothing(bucket, tmp_path):
    root = tmp_path / "ckpt"
    make_ckpt(root, 1)
    store = CheckpointStore(bucket, section(tmp_path), transfer(max_bandwidth=2 * MiB), str(tmp_path / "state"))
    t = time.time()
    r = store.upload(deadline=time.time() + 3.0)  # 11 MiB at 2 MiB/s cannot finish in 3 s (minus the reserve)
    assert not r.committed and "deadline" in r.error
    assert time.time() - t < 6
    assert store.latest() is None
    assert not bucket.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    r = store.upload(deadline=time.time() - 1)
    assert not r.committed and "deadline" in r.error


def test_restore_refuses_a_corrupted_object(bucket, tmp_path):
    make_ckpt(tmp_path / "ckpt", 1)
    store = CheckpointStore(bucket, section(tmp_path), transfer(), str(tmp_path / "state"))
    assert store.upload().committed
    doc = store.latest()
    for e in doc["files"]:
        if e["path"] == "step-1/optimizer.pt":
            key = "checkpoints/run-42/" + e["key"]
            # Same size, different bytes, put straight through the API (moto accepts it).
            bucket.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(e["size"]))
    dest = tmp_path / "restored"
    rr = CheckpointStore(bucket, section(tmp_path, dir=str(dest)), transfer(), str(tmp_path / "s2")).restore()
    assert not rr.restored and "checksum mismatch" in rr.error and "optimizer.pt" in rr.error
    assert not (dest / "step-1" / "optimizer.pt").exists()
    assert [p.name for p in dest.rglob("*") if p.name.startswith(".spot-agent-tmp-")] == []


def test_retention_keeps_last_n_and_deletes_only_ours(bucket, tmp_path):
    root = tmp_path / "ckpt"
    bucket.put_object(Bucket=BUCKET, Key="checkpoints/run-42/README.txt", Body=b"not ours")
    bucket.put_object(Bucket=BUCKET, Key="checkpoints/run-42/data/not-an-id/x", Body=b"not ours either")
    store = CheckpointStore(bucket, section(tmp_path, keep=2), transfer(), str(tmp_path / "state"))
    ids = []
    for step in range(1, 5):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / "w.pt").write_bytes(os.urandom(1000))
        (root / "latest").write_text(f"step-{step}\n")
        r = store.upload()
        assert r.committed
        ids.append(r.checkpoint_id)
        time.sleep(0.002)
    assert store.committed_ids() == ids[-2:]
    keys = {o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert "checkpoints/run-42/README.txt" in keys and "checkpoints/run-42/data/not-an-id/x" in keys
    # Everything a kept manifest references still exists (step-1/w.pt was uploaded with ids[0] and is still used).
    for cid in ids[-2:]:
        doc = store._read_manifest(cid)
        for e in doc["files"]:
            assert "checkpoints/run-42/" + e["key"] in keys
    assert any(k.startswith(f"checkpoints/run-42/data/{ids[0]}/") for k in keys)
    assert not any(k.startswith(f"checkpoints/run-42/data/{ids[1]}/latest") for k in keys)
    assert f"checkpoints/run-42/manifests/{ids[0]}.json" not in keys
    assert store.prune() == []
