"""Walk, read and create inside a directory tree the job owns, without ever leaving it.

The agent is root; the checkpoint and dataset directories belong to the job, which may swap any name
in them for a symlink at any moment (``renameat2(RENAME_EXCHANGE)`` in a loop). Path strings are
therefore resolved once, to a directory fd, and everything below is reached relative to fds, one
component at a time, with ``O_NOFOLLOW``: a name that is (or becomes) a symlink fails with ELOOP
instead of leading elsewhere. This is how the kernel's own tools (``rm -r``, ``find``, ``tar``) do it.

Only the configured root path itself may contain symlinks, and only trusted ones: a link owned by
root in a directory only root can change (or a sticky one), e.g. ``/data -> /mnt/nvme`` set up by
the image. A link that a non-root user could have made or replaced is refused, with the path named.

A file is read through one fd whose ``Identity`` (dev, ino, size, mtime, ctime) is compared with
what the listing saw, before the first byte and after the last: the bytes read are the bytes of the
inode that was listed, unmodified in between (a write moves mtime/ctime, which the job cannot reset).
"""

from __future__ import annotations

import errno
import os
import stat as statmod
from typing import Iterator, List, NamedTuple, Optional, Tuple

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO swapped in cannot hang us
MAX_LINKS = 40  # like the kernel's limit on symlinks followed in one lookup
MAX_DEPTH = 400  # deeper trees are refused rather than recursed into (fds and stack per level)

Owner = Tuple[int, int]  # (uid, gid)


class UnsafePath(Exception):
    """A path the agent refuses to use (a symlink it must not follow, a non-directory, too deep)."""


class Identity(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Identity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _only_root_can_change(dir_fd: int) -> bool:
    st = os.fstat(dir_fd)
    return st.st_uid == 0 and (not st.st_mode & 0o022 or bool(st.st_mode & statmod.S_ISVTX))


def _mkdir_open(dir_fd: int, name: str, mode: int, owner: Optional[Owner]) -> Tuple[int, bool]:
    """Open directory ``name`` under ``dir_fd``, creating it if missing. Returns (fd, created)."""
    created = False
    try:
        fd = os.open(name, O_DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        try:
            os.mkdir(name, mode, dir_fd=dir_fd)
            created = True
        except FileExistsError:
            pass
        fd = os.open(name, O_DIR, dir_fd=dir_fd)
    if created:
        try:
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, mode)  # not the umask's idea of the mode
        except OSError:
            os.close(fd)
            raise
    return fd, created


def open_root(path: str, create: bool = False, mode: int = 0o755, owner: Optional[Owner] = None, what: str = "") -> int:
    """Open the absolute ``path`` as a directory fd (caller closes it).

    Symlinks are followed only when trusted (see the module doc); anything else that is not a real
    directory raises ``UnsafePath`` naming ``what`` and the path. ``create`` makes missing
    directories (``mode``; the last one gets ``owner``). FileNotFoundError when missing and not
    ``create``.
    """
    label = f"{what} {path}" if what else path
    if not os.path.isabs(path):
        raise UnsafePath(f"{label}: not an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: List[str] = []
    fd = os.open("/", O_DIR)
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == "..":
                os.close(fd)
                fd = -1
                done = done[:-1]
                top = os.open("/", O_DIR)
                try:
                    fd = open_dirs(top, "/".join(done))
                finally:
                    os.close(top)
                continue
            try:
                if create:
                    nfd, _ = _mkdir_open(fd, name, mode, owner if not parts else None)
                else:
                    nfd = os.open(name, O_DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                here = "/" + "/".join(done + [name])
                st = os.lstat(name, dir_fd=fd)
                if not statmod.S_ISLNK(st.st_mode):
                    raise UnsafePath(f"{label}: {here} is not a directory") from None
                if st.st_uid != 0 or not _only_root_can_change(fd):
                    who = f"owned by uid {st.st_uid}" if st.st_uid != 0 else "in a directory others can change"
                    raise UnsafePath(f"{label}: {here} is a symlink {who}; refusing to follow it") from None
                links += 1
                if links > MAX_LINKS:
                    raise UnsafePath(f"{label}: too many levels of symlinks") from None
                target = os.readlink(name, dir_fd=fd)
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", O_DIR)
                    done = []
                continue
            os.close(fd)
            fd = nfd
            done.append(name)
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def open_dirs(dir_fd: int, rel: str, create: bool = False, mode: int = 0o755, owner: Optional[Owner] = None) -> int:
    """Open the relative directory ``rel`` ("" = ``dir_fd`` itself, dup'ed) below ``dir_fd`` one
    component at a time with O_NOFOLLOW; ``create`` makes missing ones (``mode``, ``owner``).
    Raises UnsafePath for a symlink or a non-directory in the way."""
    fd = os.dup(dir_fd)
    sofar: List[str] = []
    try:
        for name in (p for p in rel.split("/") if p):
            sofar.append(name)
            if name in (".", ".."):
                raise UnsafePath(f"{rel!r}: '{name}' path segment")
            try:
                if create:
                    nfd, _ = _mkdir_open(fd, name, mode, owner)
                else:
                    nfd = os.open(name, O_DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                try:
                    st = os.lstat(name, dir_fd=fd)
                except OSError:
                    raise exc from None
                here = "/".join(sofar)
                if statmod.S_ISLNK(st.st_mode):
                    raise UnsafePath(f"local path {here!r} is a symlink; refusing to go through it") from None
                raise UnsafePath(f"file/directory conflict: local {here!r} is not a directory") from None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def split(rel: str) -> Tuple[str, str]:
    """'a/b/c' -> ('a/b', 'c')."""
    head, _, tail = rel.rpartition("/")
    return head, tail


def open_listed(root_fd: int, rel: str, expect: Identity) -> int:
    """Open the regular file ``rel`` for reading, without following any symlink, and check that it
    is still the inode the listing saw, unchanged (``expect``). Raises UnsafePath otherwise."""
    head, name = split(rel)
    parent = open_dirs(root_fd, head) if head else root_fd
    try:
        try:
            fd = os.open(name, O_READ, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath("it was replaced by a symlink after it was listed") from None
            raise
    finally:
        if parent != root_fd:
            os.close(parent)
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            raise UnsafePath("it is no longer a regular file")
        if Identity.of(st) != expect:
            raise UnsafePath("it changed or was replaced after it was listed")
        return fd
    except BaseException:
        os.close(fd)
        raise


def unchanged(fd: int, expect: Identity) -> bool:
    return Identity.of(os.fstat(fd)) == expect


class Entry(NamedTuple):
    name: str
    st: os.stat_result  # lstat: a symlink is reported as a symlink


def walk(root_fd: int, topdown: bool = True, same_dev: bool = False) -> Iterator[Tuple[str, int, List[str], List[Entry]]]:
    """Like os.fwalk, but every directory is opened with O_NOFOLLOW relative to its parent's fd.

    Yields ``(rel, dir_fd, dirs, others)``: ``rel`` is "" for the root, ``dirs`` the names of real
    subdirectories (sorted; prune it in place when topdown), ``others`` every non-directory (lstat;
    sorted). ``dir_fd`` is valid only until the generator resumes. ``same_dev``: do not descend into
    another filesystem (a mount point is left out of ``dirs``). A subdirectory replaced by a symlink
    while we walk is skipped; one deeper than MAX_DEPTH raises UnsafePath.
    """
    dev = os.fstat(root_fd).st_dev
    yield from _walk(root_fd, "", topdown, dev if same_dev else None, 0)


def _walk(fd: int, rel: str, topdown: bool, dev: Optional[int], depth: int) -> Iterator[Tuple[str, int, List[str], List[Entry]]]:
    if depth > MAX_DEPTH:
        raise UnsafePath(f"local path {rel!r}: deeper than {MAX_DEPTH} directories")
    dirs: List[str] = []
    others: List[Entry] = []
    with os.scandir(fd) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if statmod.S_ISDIR(st.st_mode):
                if dev is None or st.st_dev == dev:
                    dirs.append(entry.name)
            else:
                others.append(Entry(entry.name, st))
    dirs.sort()
    others.sort()
    if topdown:
        yield rel, fd, dirs, others
    for name in dirs:
        try:
            sub = os.open(name, O_DIR, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                continue  # replaced by a symlink or a file, or gone, since the listing
            raise
        try:
            if dev is not None and os.fstat(sub).st_dev != dev:
                continue
            yield from _walk(sub, f"{rel}/{name}" if rel else name, topdown, dev, depth + 1)
        finally:
            os.close(sub)
    if not topdown:
        yield rel, fd, dirs, others
