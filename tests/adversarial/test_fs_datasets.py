"""The job attacks dataset syncs through the destination it owns: a symlinked dest with delete = true,
subdirectories swapped for links while files are written or deleted, and a filesystem mounted inside
the destination (never deleted across). Verdict: secret/ is untouched, and the sync works after."""

from __future__ import annotations

import os
import subprocess

import pytest

from agent.config import DatasetSection, TransferSection
from agent.transfer.datasets import sync_dataset
from tests.adversarial.conftest import tree

BUCKET = "adv-data"


@pytest.fixture
def s3(aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    return aws.s3


def put(s3, files: dict, prefix: str = "ds/") -> None:
    for rel, data in files.items():
        s3.put_object(Bucket=BUCKET, Key=prefix + rel, Body=data)


def sync(s3, dest, state, delete: bool = True):
    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(dest), delete=delete)
    return sync_dataset(s3, ds, TransferSection(concurrency=4, engine="botocore"), str(state))


def test_symlinked_dest_with_delete_deletes_and_writes_nothing_outside(s3, arena, job, tmp_path):
    for i in range(5):
        arena.plant(f"precious-{i}", 200)
    want = {"a.txt": b"alpha", "sub/b.txt": b"beta"}
    put(s3, want)
    dest = arena.home / "data"
    job.run(f"os.symlink({str(arena.secret)!r}, {str(dest)!r})")
    r = sync(s3, dest, tmp_path / "state")
    assert not r.ok
    assert any("symlink" in m and str(dest) in m for m in r.error_messages), r.error_messages
    arena.assert_secret_intact()
    # The job puts a real directory there: the sync works again.
    job.run(f"os.unlink({str(dest)!r}); os.mkdir({str(dest)!r}); open({str(dest / 'extra')!r}, 'w').write('x')")
    r = sync(s3, dest, tmp_path / "state")
    assert r.ok, r.error_messages
    assert r.deleted == 1
    assert tree(dest) == tree_of(want)
    arena.assert_secret_intact()


def tree_of(files: dict) -> dict:
    import hashlib

    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


def test_download_into_subdirs_swapped_for_links_writes_nothing_outside(s3, arena, job, tmp_path):
    arena.plant("keep", 100)
    want = {f"a/n{i:03d}": os.urandom(32) for i in range(100)}
    put(s3, want)
    dest = arena.home / "data"
    real, link = str(dest / "a"), str(dest / "swap")
    job.run(f"os.makedirs({real!r}); os.symlink({str(arena.secret)!r}, {link!r})")
    job.swap((real, link))
    for i in range(2):
        sync(s3, dest, tmp_path / f"state{i}", delete=False)  # per-file errors are fine
    job.stop()
    arena.assert_secret_intact()
    job.unswap(real, link)
    r = sync(s3, dest, tmp_path / "state-final")
    assert r.ok, r.error_messages
    assert tree(dest) == tree_of(want)
    arena.assert_secret_intact()


def test_delete_while_subdirs_are_swapped_for_links_deletes_nothing_outside(s3, arena, job, tmp_path):
    names = [f"n{i:03d}" for i in range(200)]
    for n in names:
        arena.plant(n, 16)
    put(s3, {"kept.txt": b"k"})
    dest = arena.home / "data"
    job.run(f"""
os.makedirs({str(dest / 'a')!r})
for n in {names!r}:
    open(os.path.join({str(dest / 'a')!r}, n), 'w').write('extraneous')
os.symlink({str(arena.secret)!r}, {str(dest / 'swap')!r})
""")
    job.swap((str(dest / "a"), str(dest / "swap")))
    sync(s3, dest, tmp_path / "state")
    job.stop()
    arena.assert_secret_intact()
    job.unswap(str(dest / "a"), str(dest / "swap"))
    r = sync(s3, dest, tmp_path / "state")
    assert r.ok, r.error_messages
    assert tree(dest) == tree_of({"kept.txt": b"k"})


@pytest.fixture
def mounted(tmp_path):
    """A tmpfs mounted inside a dataset destination (another filesystem: st_dev differs)."""
    mounts = []

    def mount(path):
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "adv-tmpfs", str(path)], check=True)
        mounts.append(path)

    yield mount
    for p in reversed(mounts):
        subprocess.run(["umount", "-l", str(p)], check=False)


def test_delete_never_crosses_into_another_filesystem(s3, arena, tmp_path, mounted):
    put(s3, {"a.txt": b"alpha"})
    dest = arena.base / "data"
    (dest / "local").mkdir(parents=True)
    (dest / "local" / "stale.txt").write_text("not in S3: deleted")
    mounted(dest / "scratch")
    (dest / "scratch" / "other-fs.txt").write_text("another filesystem: never deleted")
    (dest / "scratch" / "deeper").mkdir()
    (dest / "scratch" / "deeper" / "f").write_text("x")
    r = sync(s3, dest, tmp_path / "state")
    assert r.ok, r.error_messages
    assert r.deleted == 1
    assert not (dest / "local" / "stale.txt").exists()
    assert (dest / "scratch" / "other-fs.txt").read_text() == "another filesystem: never deleted"
    assert (dest / "scratch" / "deeper" / "f").exists()
    assert (dest / "a.txt").read_bytes() == b"alpha"
