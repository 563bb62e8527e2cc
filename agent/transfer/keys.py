"""S3 keys -> local relative paths, refusing every key that could write outside the destination.

S3 keys are arbitrary UTF-8 strings; a local path is not. A key is mapped only when each of its
segments is a plain file name: no empty segment (``a//b``, trailing ``/``), no ``.``/``..``, no
backslash (a Windows separator, and ambiguous in tools), no NUL, no leading ``/``. Anything else is
refused with a reason, never "cleaned up": a cleaned-up key could collide with another key.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

# Names the engine uses inside a destination; a key may not claim them.
TEMP_PREFIX = ".spot-agent-tmp-"
STATE_DIR_NAME = ".spot-agent-sync"
MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class KeyVerdict:
    path: Optional[str]  # relative POSIX path, or None when refused/ignored
    reason: str = ""  # why refused
    marker: bool = False  # a zero-byte "folder/" object (S3 console folder): ignored, not an error


def split_s3_url(url: str) -> Tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix/"); the prefix is a directory."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    rest = url[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def key_to_relpath(key: str, prefix: str, size: int = -1) -> KeyVerdict:
    """Map ``key`` (which starts with ``prefix``) to a relative path, or refuse it with a reason."""
    if not key.startswith(prefix):
        return KeyVerdict(None, f"key {key!r} is outside the prefix {prefix!r}")
    rel = key[len(prefix):]
    if rel == "":
        return KeyVerdict(None, "", marker=True)  # the prefix's own folder object
    if "\x00" in rel:
        return KeyVerdict(None, f"key {key!r}: contains a NUL byte")
    if rel.startswith("/"):
        return KeyVerdict(None, f"key {key!r}: absolute path (starts with '/')")
    if "\\" in rel:
        return KeyVerdict(None, f"key {key!r}: contains a backslash")
    if rel.endswith("/"):
        if size == 0 and "//" not in rel and all(s not in (".", "..") for s in rel[:-1].split("/")):
            return KeyVerdict(None, f"key {key!r}: folder marker ignored", marker=True)
        return KeyVerdict(None, f"key {key!r}: ends with '/' (a directory name, not a file)")
    segments = rel.split("/")
    for seg in segments:
        if seg == "":
            return KeyVerdict(None, f"key {key!r}: empty path segment ('//')")
        if seg in (".", ".."):
            return KeyVerdict(None, f"key {key!r}: '{seg}' path segment")
        if len(seg.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            return KeyVerdict(None, f"key {key!r}: a path segment is longer than {MAX_NAME_BYTES} bytes")
        if seg.startswith(TEMP_PREFIX):
            return KeyVerdict(None, f"key {key!r}: uses the engine's reserved temp-file prefix {TEMP_PREFIX!r}")
    if segments[0] == STATE_DIR_NAME:
        return KeyVerdict(None, f"key {key!r}: uses the reserved state directory name {STATE_DIR_NAME!r}")
    return KeyVerdict(rel)


def relpath_to_key(rel: str, prefix: str) -> str:
    return prefix + rel


def _compile(globs: Iterable[str]) -> Optional["re.Pattern[str]"]:
    parts = [fnmatch.translate(g) for g in globs]
    if not parts:
        return None
    return re.compile("|".join(f"(?:{p})" for p in parts))


class KeyFilter:
    """``include``/``exclude`` globs (fnmatch, ``*`` matches across ``/``) on the relative path.

    A glob without ``/`` also matches the base name, so ``*.tar`` selects ``a/b/c.tar``. Exclude wins.
    An empty include list includes everything.
    """

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        include = list(include)
        exclude = list(exclude)
        self._inc_path = _compile(include)
        self._inc_base = _compile([g for g in include if "/" not in g])
        self._exc_path = _compile(exclude)
        self._exc_base = _compile([g for g in exclude if "/" not in g])
        self.active = bool(include or exclude)

    @staticmethod
    def _hit(rel: str, path_re: Optional["re.Pattern[str]"], base_re: Optional["re.Pattern[str]"]) -> bool:
        if path_re is not None and path_re.match(rel):
            return True
        if base_re is not None and base_re.match(rel.rsplit("/", 1)[-1]):
            return True
        return False

    def __call__(self, rel: str) -> bool:
        if not self.active:
            return True
        if self._inc_path is not None and not self._hit(rel, self._inc_path, self._inc_base):
            return False
        if self._exc_path is not None and self._hit(rel, self._exc_path, self._exc_base):
            return False
        return True


class ConflictDetector:
    """Finds file/directory conflicts (``x`` and ``x/y``) in a key-sorted stream, in bounded memory.

    Keys arrive in S3 order (UTF-8 byte order, which Python's str order matches). A file path ``p``
    can only be shadowed by a later path starting with ``p/``; every path between ``p`` and ``p/``
    starts with ``p`` followed by a character below ``/``, so the candidates form a short stack.
    ``check`` returns the conflicting earlier file path, or None. Out-of-order input is tolerated
    (it only loses detection, and the writer still refuses a path whose parent is a file).
    """

    def __init__(self) -> None:
        self._stack: List[str] = []

    def check(self, rel: str) -> Optional[str]:
        conflict = None
        while self._stack:
            top = self._stack[-1]
            if rel.startswith(top + "/"):
                conflict = top
                break
            if rel.startswith(top) and rel > top:
                break  # e.g. top "x", rel "x-a": "x/..." may still come
            self._stack.pop()
        if conflict is None:
            # Any deeper stack entry that is a parent dir of rel is also a conflict.
            for cand in self._stack:
                if rel.startswith(cand + "/"):
                    conflict = cand
                    break
        self._stack.append(rel)
        return conflict


def parent_dirs(rel: str) -> List[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
