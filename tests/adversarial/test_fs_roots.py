"""Which symlinks on the configured path (checkpoint dir, dataset dest) the agent follows: only those
that root made and only root can change. Links the job made, or could replace, are refused."""

from __future__ import annotations

import os

import pytest

from agent.transfer import safefs
from tests.adversarial.conftest import JOB_GID, JOB_UID


def resolves_to(path, want) -> None:
    fd = safefs.open_root(str(path))
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(want))
    finally:
        os.close(fd)


def test_root_links_in_directories_only_root_can_change_are_followed(arena):
    real = arena.base / "mnt" / "nvme" / "ckpt"
    real.mkdir(parents=True)
    (arena.base / "data").symlink_to(arena.base / "mnt" / "nvme")  # like /data -> /mnt/nvme from the image
    resolves_to(arena.base / "data" / "ckpt", real)
    (arena.base / "rel").symlink_to("mnt/../mnt/nvme/./ckpt")  # relative, with '..' and '.'
    resolves_to(arena.base / "rel", real)
    sticky = arena.base / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: others may write, but not replace root's link
    (sticky / "ck").symlink_to(real)
    resolves_to(sticky / "ck", real)


@pytest.mark.parametrize("case", ["job-owned link", "root link in the job's directory", "job link in a sticky dir",
                                  "job link on the way"])
def test_links_a_job_made_or_could_replace_are_refused(arena, job, case):
    arena.plant("ckpt/x", 10)
    if case == "job-owned link":
        path = arena.home / "ckpt"
        job.run(f"os.symlink({str(arena.secret / 'ckpt')!r}, {str(path)!r})")
        why = "owned by uid 65534"
    elif case == "root link in the job's directory":
        path = arena.home / "ckpt"
        path.symlink_to(arena.secret / "ckpt")
        why = "in a directory others can change"
    elif case == "job link in a sticky dir":
        sticky = arena.base / "sticky"
        sticky.mkdir()
        os.chmod(sticky, 0o1777)
        path = sticky / "ckpt"
        job.run(f"os.symlink({str(arena.secret / 'ckpt')!r}, {str(path)!r})")
        why = "owned by uid 65534"
    else:
        job.run(f"os.symlink({str(arena.secret)!r}, {str(arena.home / 'run')!r})")
        path = arena.home / "run" / "ckpt"
        why = "owned by uid 65534"
    with pytest.raises(safefs.UnsafePath) as err:
        os.close(safefs.open_root(str(path), what="checkpoint dir"))
    assert str(err.value).startswith(f"checkpoint dir {path}: ") and "symlink" in str(err.value) and why in str(err.value)
    with pytest.raises(safefs.UnsafePath):
        os.close(safefs.open_root(str(path), create=True))
    arena.assert_secret_intact()


def test_open_root_creates_what_is_missing_with_the_given_owner(arena):
    path = arena.base / "vol" / "ckpt"
    fd = safefs.open_root(str(path), create=True, owner=(JOB_UID, JOB_GID))
    os.close(fd)
    assert (os.lstat(path).st_uid, os.lstat(path).st_mode & 0o7777) == (JOB_UID, 0o755)
    assert os.lstat(path.parent).st_uid == 0  # only the last component is the job's


def test_walk_skips_links_and_other_filesystems_and_open_dirs_refuses_links(arena, job):
    root = arena.home / "t"
    job.run(f"""
os.makedirs({str(root / 'a' / 'b')!r})
open({str(root / 'a' / 'b' / 'f')!r}, 'w').write('x')
os.symlink({str(arena.secret)!r}, {str(root / 'link')!r})
""")
    fd = safefs.open_root(str(root))
    try:
        seen = [(rel, dirs, [e.name for e in others]) for rel, _fd, dirs, others in safefs.walk(fd)]
        assert seen == [("", ["a"], ["link"]), ("a", ["b"], []), ("a/b", [], ["f"])]
        with pytest.raises(safefs.UnsafePath, match="'link' is a symlink"):
            safefs.open_dirs(fd, "link/x", create=True)
        with pytest.raises(safefs.UnsafePath, match="conflict"):
            safefs.open_dirs(fd, "a/b/f/x", create=True)
    finally:
        os.close(fd)
    arena.assert_secret_intact()
