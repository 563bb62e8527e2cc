"""The job attacks checkpoint upload and restore through its checkpoint directory (symlinks, hard
links, RENAME_EXCHANGE swap loops). Verdict for every case: no canary byte reaches S3, secret/ is
untouched, and the agent still uploads and restores correctly once the attack stops."""

from __future__ import annotations

import os

import pytest

from agent.config import CheckpointSection, TransferSection
from agent.transfer.checkpoints import CheckpointStore
from tests.adversarial.conftest import JOB_GID, JOB_UID, tree

BUCKET = "adv-ckpt"
MiB = 1024 * 1024


@pytest.fixture
def s3(aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    return aws.s3


def store(s3, ckdir, state, prefix: str = "run/") -> CheckpointStore:
    ck = CheckpointSection(dir=str(ckdir), s3=f"s3://{BUCKET}/{prefix}", settle=0, keep=50)
    return CheckpointStore(s3, ck, TransferSection(concurrency=4, part_size=5 * MiB, multipart_threshold=5 * MiB), str(state))


def job_files(job, root, files: dict) -> None:
    """The job writes its own checkpoint files (as its uid). A value is bytes, or (byte, size) for a
    large file of one repeated byte (argv could not carry it)."""
    job.run(f"""
root = {str(root)!r}
for rel, data in {files!r}.items():
    if isinstance(data, tuple):
        data = data[0] * data[1]
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, 'wb') as fh:
        fh.write(data)
""")


def still_works(s3, job, arena, tmp_path, ckdir) -> None:
    """After the attack: a clean checkpoint dir uploads, and restores byte for byte."""
    want = tree(ckdir)
    assert want, "the job's checkpoint dir should hold files"
    r = store(s3, ckdir, tmp_path / "state-after", prefix="after/").upload(settled=True)
    assert r.committed, r.error
    fresh = arena.home / "fresh-restore"
    job.run(f"os.mkdir({str(fresh)!r})")
    rr = store(s3, fresh, tmp_path / "state-after2", prefix="after/").restore()
    assert rr.restored, rr.error
    assert tree(fresh) == want
    assert arena.leaks(s3, BUCKET) == []
    arena.assert_secret_intact()


def test_checkpoint_dir_replaced_by_a_symlink_is_neither_read_nor_written(s3, arena, job, tmp_path):
    arena.plant("id_rsa", 3000)
    arena.plant("model.pt", 5000)
    ck = arena.home / "ckpt"
    job_files(job, ck, {"model.pt": b"w" * 5000})
    # A good checkpoint exists in S3 (from the real dir), so a restore has something to write.
    first = store(s3, ck, tmp_path / "state").upload(settled=True)
    assert first.committed, first.error
    # The job swaps its checkpoint dir for a link to a root-only directory.
    job.run(f"os.rename({str(ck)!r}, {str(ck)!r} + '.real'); os.symlink({str(arena.secret)!r}, {str(ck)!r})")

    r = store(s3, ck, tmp_path / "state").upload(settled=True)
    assert not r.committed
    assert "symlink" in r.error and str(ck) in r.error
    assert arena.leaks(s3, BUCKET) == []

    rr = store(s3, ck, tmp_path / "state-restore").restore()
    assert not rr.restored
    assert "symlink" in rr.error and str(ck) in rr.error
    arena.assert_secret_intact()

    job.run(f"os.unlink({str(ck)!r}); os.rename({str(ck)!r} + '.real', {str(ck)!r})")
    still_works(s3, job, arena, tmp_path, ck)


def test_links_inside_the_checkpoint_dir_are_not_checkpoint_data(s3, arena, job, tmp_path):
    arena.plant("id_rsa", 3000)
    arena.plant("sub/weights.pt", 4000)
    ck = arena.home / "ckpt"
    job_files(job, ck, {"step-1/w.pt": b"job weights"})
    job.run(f"""
os.symlink({str(arena.secret)!r}, {str(ck / 'step-1' / 'escape')!r})
os.symlink({str(arena.secret / 'id_rsa')!r}, {str(ck / 'key')!r})
""")
    # A hard link to a root-only file, as a job could make where fs.protected_hardlinks=0 (root plants
    # it here because this host has protected_hardlinks=1).
    os.link(arena.secret / "id_rsa", ck / "step-1" / "hard.bin")

    r = store(s3, ck, tmp_path / "state").upload(settled=True)
    assert r.committed, r.error
    doc = store(s3, ck, tmp_path / "state").latest()
    assert [e["path"] for e in doc["files"]] == ["step-1/w.pt"]
    assert arena.leaks(s3, BUCKET) == []
    arena.assert_secret_intact()
    os.unlink(ck / "step-1" / "hard.bin")
    job.run(f"os.unlink({str(ck / 'step-1' / 'escape')!r}); os.unlink({str(ck / 'key')!r})")
    still_works(s3, job, arena, tmp_path, ck)


def test_directory_swap_loop_during_uploads_never_uploads_root_only_bytes(s3, arena, job, tmp_path):
    names = [f"part-{i}.bin" for i in range(6)]
    for n in names:
        arena.plant(n, 2048)
    ck = arena.home / "ckpt"
    job_files(job, ck, {f"step-1/{n}": b"d" * 2048 for n in names})
    real, link = str(ck / "step-1"), str(ck / "swap")
    job.run(f"os.symlink({str(arena.secret)!r}, {link!r})")
    job.swap((real, link))
    st = store(s3, ck, tmp_path / "state")
    for _ in range(12):
        st.upload(settled=True)  # committed or refused: either way no root-only byte may be sent
    job.stop()
    assert arena.leaks(s3, BUCKET) == []
    arena.assert_secret_intact()
    job.unswap(real, link)
    still_works(s3, job, arena, tmp_path, ck)


def test_file_swap_loop_during_uploads_never_uploads_root_only_bytes(s3, arena, job, tmp_path):
    ck = arena.home / "ckpt"
    pairs = []
    decoys = {}
    for i in range(8):
        size = 6 * MiB if i == 0 else 3000  # one multipart file: every part is a separate read
        arena.plant(f"c{i}", size)
        decoys[f"f{i}.bin"] = (b"d", size)
    job_files(job, ck, decoys)
    for i in range(8):
        job.run(f"os.symlink({str(arena.secret / f'c{i}')!r}, {str(ck / f'.l{i}')!r})")
        pairs.append((str(ck / f"f{i}.bin"), str(ck / f".l{i}")))
    job.swap(*pairs)
    st = store(s3, ck, tmp_path / "state")
    for _ in range(10):
        st.upload(settled=True)
    job.stop()
    assert arena.leaks(s3, BUCKET) == []
    arena.assert_secret_intact()
    for a, b in pairs:
        job.unswap(a, b)
    still_works(s3, job, arena, tmp_path, ck)


def test_restore_into_a_dir_whose_subdirs_are_swapped_for_links(s3, arena, job, tmp_path):
    arena.plant("keep", 100)
    src = arena.home / "src"
    files = {f"step-1/n{i:03d}": os.urandom(64) for i in range(100)}
    job_files(job, src, files)
    r = store(s3, src, tmp_path / "state").upload(settled=True)
    assert r.committed, r.error
    dest = arena.home / "restore"
    real, link = str(dest / "step-1"), str(dest / "swap")
    job.run(f"os.makedirs({real!r}); os.symlink({str(arena.secret)!r}, {link!r})")
    job.swap((real, link))
    for _ in range(2):
        store(s3, dest, tmp_path / "state-r").restore()  # errors are fine; writes outside dest are not
    job.stop()
    arena.assert_secret_intact()
    job.unswap(real, link)
    rr = store(s3, dest, tmp_path / "state-r").restore()
    assert rr.restored, rr.error
    assert tree(dest) == tree(src)
    arena.assert_secret_intact()


def test_restored_files_keep_their_owner_and_mode(s3, arena, job, tmp_path):
    """A non-root job must be able to rotate (delete, rewrite) what a root restore put back."""
    src = arena.home / "src"
    job_files(job, src, {"step-1/w.pt": b"weights", "latest": b"step-1"})
    job.run(f"os.chmod({str(src / 'latest')!r}, 0o640)")
    r = store(s3, src, tmp_path / "state").upload(settled=True)
    assert r.committed, r.error
    dest = arena.base / "new-volume" / "ckpt"  # a fresh volume: nothing exists yet
    rr = store(s3, dest, tmp_path / "state-r").restore()
    assert rr.restored, rr.error
    for rel, mode in (("step-1/w.pt", 0o644), ("latest", 0o640)):
        st = os.lstat(dest / rel)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (JOB_UID, JOB_GID, mode), rel
    st = os.lstat(dest / "step-1")
    assert (st.st_uid, st.st_gid) == (JOB_UID, JOB_GID)
    # The job rotates its restored checkpoint as its own uid.
    os.chmod(arena.base / "new-volume", 0o755)
    job.run(f"os.unlink({str(dest / 'step-1' / 'w.pt')!r}); os.rmdir({str(dest / 'step-1')!r}); open({str(dest / 'latest')!r}, 'w').write('x')")


def rewrite_manifest(s3, st: CheckpointStore, change) -> None:
    import json

    cid = st.committed_ids()[-1]
    doc = json.loads(s3.get_object(Bucket=BUCKET, Key=st.manifest_key(cid))["Body"].read())
    for e in doc["files"]:
        change(e)
    s3.put_object(Bucket=BUCKET, Key=st.manifest_key(cid), Body=json.dumps(doc).encode())


def test_owner_and_mode_defaults_for_old_manifests_and_no_setuid_from_a_hostile_one(s3, arena, job, tmp_path):
    src = arena.home / "src"
    job_files(job, src, {"bin/tool": b"#!/bin/sh\necho job\n"})
    st = store(s3, src, tmp_path / "state")
    assert st.upload(settled=True).committed
    # A manifest from before owner and mode were recorded: files get the checkpoint dir's owner, 0644.
    rewrite_manifest(s3, st, lambda e: [e.pop(k, None) for k in ("uid", "gid", "mode")])
    old = arena.home / "old"
    job.run(f"os.mkdir({str(old)!r})")
    rr = store(s3, old, tmp_path / "state-old").restore()
    assert rr.restored, rr.error
    s = os.lstat(old / "bin" / "tool")
    assert (s.st_uid, s.st_gid, s.st_mode & 0o7777) == (JOB_UID, JOB_GID, 0o644)
    assert os.lstat(old / "bin").st_uid == JOB_UID
    # A hostile manifest asks for a setuid-root executable: owner as recorded, never the setuid bit.
    rewrite_manifest(s3, st, lambda e: e.update(uid=0, gid=0, mode=0o4755))
    evil = arena.base / "evil"
    rr = store(s3, evil, tmp_path / "state-evil").restore()
    assert rr.restored, rr.error
    s = os.lstat(evil / "bin" / "tool")
    assert (s.st_uid, s.st_mode & 0o7777) == (0, 0o755)


def test_a_fifo_swapped_in_for_a_file_cannot_hang_the_upload(s3, arena, job, tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: the drain's upload must not wait on it."""
    import threading

    ck = arena.home / "ckpt"
    job_files(job, ck, {"f.bin": b"d" * 1000, "g.bin": b"e" * 10})
    job.run(f"os.mkfifo({str(ck / '.p')!r})")
    job.swap((str(ck / "f.bin"), str(ck / ".p")))
    st = store(s3, ck, tmp_path / "state")
    t = threading.Thread(target=lambda: [st.upload(settled=True) for _ in range(4)], daemon=True)
    t.start()
    t.join(120)  # the old code never returned; this one takes well under a second per upload
    job.stop()
    assert not t.is_alive(), "an upload hangs on a FIFO the job swapped in"
    job.run(f"""
if not os.path.isfile({str(ck / 'f.bin')!r}):
    exchange({str(ck / 'f.bin')!r}, {str(ck / '.p')!r})
os.unlink({str(ck / '.p')!r})
""")
    still_works(s3, job, arena, tmp_path, ck)
