"""What the drain's final upload commits, and who may commit: the marker rule holds with
settled=True, a file that changes while it is uploaded is left out (the rest commits), and the
manifest is written with If-None-Match: * so nobody overwrites a commit. Real moto over HTTP; the
fault proxy holds a PUT open while the test changes the file."""

from __future__ import annotations

import json
import threading
import time

import pytest

from agent.config import CheckpointSection, TransferSection
from agent.sim.faultproxy import Fault, FaultProxy
from agent.transfer import checkpoints
from agent.transfer.checkpoints import CheckpointStore
from agent.transfer.upload import Uploader
from agent.transfer.bandwidth import Limiter
from tests.integration.transfer_helpers import client

BUCKET = "rules-bucket"
PREFIX = "run-9/"


@pytest.fixture
def s3(aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    return aws.s3


def store_for(s3, tmp_path, **kw) -> CheckpointStore:
    ck = CheckpointSection(dir=str(tmp_path / "ckpt"), s3=f"s3://{BUCKET}/{PREFIX}", settle=3600, keep=5)
    for k, v in kw.items():
        setattr(ck, k, v)
    return CheckpointStore(s3, ck, TransferSection(concurrency=4), str(tmp_path / "state"))


def paths(store) -> list:
    return sorted(e["path"] for e in store.latest()["files"])


def test_settled_final_upload_still_applies_the_marker_rule(s3, tmp_path):
    root = tmp_path / "ckpt"
    (root / "step-1").mkdir(parents=True)
    (root / "step-1" / "w.pt").write_bytes(b"1" * 1000)
    (root / "step-1" / "COMPLETE").write_text("")
    (root / "step-2").mkdir()
    (root / "step-2" / "w.pt").write_bytes(b"2" * 500)  # half-written: no marker yet
    store = store_for(s3, tmp_path, marker="COMPLETE")
    r = store.upload(reason="drain:spot-interruption", settled=True)
    assert r.committed, r.error
    assert paths(store) == ["step-1/COMPLETE", "step-1/w.pt"]
    assert r.incomplete == ["step-2/w.pt"]
    assert store.latest()["incomplete"] == ["step-2/w.pt"]


def append_during_put(path, key_part: str, aws, tmp_path, **kw):
    """Upload through a proxy that holds the PUT of ``key_part`` for 1 s while ``path`` grows."""
    def grow():
        time.sleep(0.4)
        with open(path, "ab") as fh:
            fh.write(b"epoch 2 loss 0.1\n")

    with FaultProxy(aws.url, [Fault("delay", method="PUT", path_contains=key_part, every=1, seconds=1.0)]) as proxy:
        store = store_for(client(proxy.url), tmp_path, **kw)
        t = threading.Thread(target=grow)
        t.start()
        r = store.upload(reason="drain:spot-interruption", settled=True)
        t.join()
    return store, r


def test_a_file_that_changes_during_the_upload_is_left_out_and_the_rest_commits(s3, aws, tmp_path):
    root = tmp_path / "ckpt"
    (root / "step-1").mkdir(parents=True)
    (root / "step-1" / "w.pt").write_bytes(b"w" * 100_000)
    (root / "train.log").write_text("epoch 1 loss 0.3\n")
    store, r = append_during_put(root / "train.log", "train.log", aws, tmp_path)
    assert r.committed, r.error
    assert r.changed == ["train.log"] and "train.log" in r.incomplete
    assert paths(store) == ["step-1/w.pt"]
    assert store.latest()["incomplete"] == ["train.log"]


def test_with_a_marker_a_changed_file_takes_its_whole_step_out(s3, aws, tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / "w.pt").write_bytes(bytes([step]) * 10_000)
        (root / f"step-{step}" / "log.txt").write_text("x\n")
        (root / f"step-{step}" / "COMPLETE").write_text("")
    # step-2's log changes while it is uploaded: step-2 must not commit with its marker but torn
    store, r = append_during_put(root / "step-2" / "log.txt", "step-2/log.txt", aws, tmp_path, marker="COMPLETE")
    assert r.committed, r.error
    assert r.changed == ["step-2/log.txt"]
    assert paths(store) == ["step-1/COMPLETE", "step-1/log.txt", "step-1/w.pt"]
    assert set(r.incomplete) == {"step-2/COMPLETE", "step-2/log.txt", "step-2/w.pt"}


def test_a_commit_never_overwrites_a_manifest_with_the_same_id(s3, tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "w.pt").write_bytes(b"mine")
    cid = checkpoints.new_checkpoint_id(time.time())
    monkeypatch.setattr(checkpoints, "new_checkpoint_id", lambda now: cid)
    # Another writer (a zombie instance, a second agent on the same prefix) committed this id first.
    theirs = json.dumps({"format": "spot-agent-checkpoint/1", "id": cid, "note": "the other writer's"}).encode()
    key = f"{PREFIX}manifests/{cid}.json"
    s3.put_object(Bucket=BUCKET, Key=key, Body=theirs)
    store = store_for(s3, tmp_path, settle=0)
    r = store.upload(reason="interval")
    assert not r.committed and "already exists" in r.error and "PreconditionFailed" in r.error, r.error
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == theirs  # left as it was


def test_a_retried_manifest_put_that_had_landed_counts_as_committed(s3, tmp_path):
    store = store_for(s3, tmp_path)
    cid = checkpoints.new_checkpoint_id(time.time())
    body = b'{"the": "manifest"}'
    up = Uploader(s3, BUCKET, "sha256", 8 << 20, 16 << 20, Limiter(0))
    assert store._commit(up, cid, body) == ""
    assert store._commit(up, cid, body) == ""  # 412, but the object is ours: committed
    assert "already exists" in store._commit(up, cid, b'{"another": "body"}')


def test_a_small_file_finishing_first_does_not_stop_a_drain_upload_that_fits(s3, tmp_path):
    # The rate used to be measured on whatever had arrived after 0.5 s: 10 bytes of a.txt made
    # 15 MiB look like hours, and the drain's upload stopped with most of its budget left.
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "a.txt").write_bytes(b"0123456789")
    (root / "b.pt").write_bytes(b"b" * (15 * 1024 * 1024))
    store = store_for(s3, tmp_path, settle=0)
    store.transfer = TransferSection(concurrency=2, part_size=5 << 20, multipart_threshold=5 << 20, max_bandwidth=8 << 20)
    r = store.upload(deadline=time.time() + 12, reason="drain:spot-interruption")
    assert r.committed, r.error
    assert paths(store) == ["a.txt", "b.pt"]
