"""Can anyone but root change what this path means? Walked one component at a time, with ``lstat``.

Why not ``realpath`` then ``stat``: that checks where a link points *now*. A user-owned symlink to
``/bin/true`` passes, and is re-pointed later; a root-owned link into a user's directory passes too.
Here every component of the path, and of every link target, is looked at where it is: owned by a
trusted uid (root; or the agent's own uid when it does not run as root), and no directory on the way
writable by group or others unless it is sticky (in a sticky directory such as ``/tmp`` only an
entry's owner can rename or remove it, and every entry on the path must be trusted-owned anyway).
The file itself must not be writable by group or others.

Such a path cannot be changed by an unprivileged user at all, so the time between this check and
the use of the path is only open to root. Callers still re-check right before use (a hook just
before exec) and use the resolved path the check returns, which has no symlinks left to follow.
"""

from __future__ import annotations

import os
import stat
from typing import FrozenSet, Iterable, List, Optional, Tuple

MAX_LINKS = 40  # as the kernel: more than this many links on one path is a loop


class UntrustedPath(ValueError):
    """The one-line reason a path cannot be trusted."""


def trusted_uids() -> FrozenSet[int]:
    return frozenset({0, os.geteuid()})


def _owner_ok(where: str, st: os.stat_result, uids: Iterable[int]) -> None:
    if st.st_uid not in uids:
        raise UntrustedPath(f"{where} is owned by uid {st.st_uid}, not root")


def resolve_trusted(path: str, uids: Optional[Iterable[int]] = None, allow_final_link: bool = True,
                    kind: str = "") -> str:
    """Return ``path`` with every symlink resolved, or raise :class:`UntrustedPath` naming the culprit.

    ``allow_final_link`` False: the last component itself must not be a symlink (a state directory:
    a link there could be re-created pointing elsewhere by whoever owns its target's parent).
    ``kind`` "dir" or "file" checks what the path ends in.
    """
    allowed = frozenset(uids) if uids is not None else trusted_uids()
    if not os.path.isabs(path):
        raise UntrustedPath(f"{path!r} is not an absolute path")
    try:
        st = os.lstat("/")
    except OSError as exc:  # pragma: no cover - / always exists
        raise UntrustedPath(f"/: cannot stat: {exc.strerror}") from None
    _owner_ok("/", st, allowed)
    current = "/"
    current_st = st
    names = [p for p in path.split("/") if p]
    # (component, is the configured path's own last component)
    pending: List[Tuple[str, bool]] = [(p, i == len(names) - 1) for i, p in enumerate(names)]
    links = 0
    while pending:
        name, last = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)  # current has no links in it: this is the real parent
            current_st = os.lstat(current)
            continue
        # Entering ``current`` to look up ``name``: nobody else may be able to replace entries in it.
        if current_st.st_mode & 0o022 and not current_st.st_mode & stat.S_ISVTX:
            raise UntrustedPath(f"directory {current} is writable by group or others "
                                f"(mode {stat.S_IMODE(current_st.st_mode):o})")
        candidate = os.path.join(current, name)
        try:
            st = os.lstat(candidate)
        except OSError as exc:
            raise UntrustedPath(f"{candidate}: cannot stat: {exc.strerror}") from None
        _owner_ok(candidate, st, allowed)
        if stat.S_ISLNK(st.st_mode):
            if last and not allow_final_link:
                raise UntrustedPath(f"{candidate} is a symlink")
            links += 1
            if links > MAX_LINKS:
                raise UntrustedPath(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if os.path.isabs(target):
                current, current_st = "/", os.lstat("/")
            pending = [(p, False) for p in target.split("/") if p] + pending
            continue
        if pending and not stat.S_ISDIR(st.st_mode):
            raise UntrustedPath(f"{candidate} is not a directory")
        current, current_st = candidate, st
    mode = current_st.st_mode
    if mode & 0o022:
        raise UntrustedPath(f"{current} is writable by group or others (mode {stat.S_IMODE(mode):o})")
    if kind == "dir" and not stat.S_ISDIR(mode):
        raise UntrustedPath(f"{current} is not a directory")
    if kind == "file" and not stat.S_ISREG(mode):
        raise UntrustedPath(f"{current} is not a regular file")
    return current


def untrusted_reason(path: str, uids: Optional[Iterable[int]] = None, allow_final_link: bool = True,
                     kind: str = "") -> Optional[str]:
    """The reason ``path`` cannot be trusted, or None."""
    try:
        resolve_trusted(path, uids, allow_final_link, kind)
    except UntrustedPath as exc:
        return str(exc)
    return None
