"""The drain's final upload takes the checkpoint the workload just wrote (settled=True), while a
periodic upload still leaves files younger than the settle time alone."""

from agent.config import CheckpointSection, TransferSection
from agent.transfer.checkpoints import CheckpointStore


def test_settled_upload_takes_the_fresh_checkpoint(aws, tmp_path):
    aws.s3.create_bucket(Bucket="ckpt-bucket")
    ckdir = tmp_path / "ckpt"
    ckdir.mkdir()
    (ckdir / "step-41.pt").write_bytes(b"weights" * 1000)  # written just now
    store = CheckpointStore(aws.s3, CheckpointSection(dir=str(ckdir), s3="s3://ckpt-bucket/run/", settle=60),
                            TransferSection(), str(tmp_path / "state"))
    periodic = store.upload(reason="interval")
    assert not periodic.committed and "still being written" in periodic.error
    final = store.upload(reason="drain:spot-interruption", settled=True)
    assert final.committed and final.files == 1
    assert [f["path"] for f in store.latest()["files"]] == ["step-41.pt"]
