"""Decide, object by object, what a dataset sync must do. Pure: no I/O, streaming, bounded memory.

The S3 listing and the local manifest are both sorted by key (S3 lists in UTF-8 byte order; the
manifest is an SQLite table whose BINARY collation is the same order), so planning is a merge join:
one pass, O(1) state, whatever the number of keys. The local tree is consulted through an injected
``stat`` for the keys we would skip, because a manifest row only proves what we wrote, not what is
there now.

A file is skipped only when the manifest says we downloaded exactly this object version (same size
and ETag) and the local file is still the one we wrote (same size and mtime). Size and mtime alone
would miss a same-size update in S3 (the ``aws s3 sync`` trap). A local file of the right size that
the manifest does not vouch for is marked ``verify``: the downloader hashes it against the ETag and
adopts it when it matches (after a crash between rename and manifest write, or a tree filled by
another tool) instead of fetching it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Union

from agent.transfer.keys import ConflictDetector, KeyFilter, key_to_relpath


class RemoteObject(NamedTuple):
    key: str
    size: int
    etag: str


class ManifestEntry(NamedTuple):
    key: str
    path: str
    size: int
    etag: str
    mtime_ns: int


class LocalStat(NamedTuple):
    size: int
    mtime_ns: int
    is_file: bool


@dataclass(frozen=True)
class Download:
    key: str
    path: str
    size: int
    etag: str
    verify: bool  # a local file of this size exists: hash it first, adopt it if it matches
    reason: str  # "new", "changed", "local-modified", "unverified"


@dataclass(frozen=True)
class Skip:
    key: str
    path: str
    size: int


@dataclass(frozen=True)
class Refuse:
    key: str
    reason: str
    marker: bool = False  # a folder marker: reported as a note, not an error


@dataclass(frozen=True)
class Stale:
    """A manifest row whose key is no longer listed (or no longer selected)."""

    entry: ManifestEntry


@dataclass(frozen=True)
class Filtered:
    key: str


Action = Union[Download, Skip, Refuse, Stale, Filtered]
StatFn = Callable[[str], Optional[LocalStat]]


def decide(obj: RemoteObject, path: str, entry: Optional[ManifestEntry], st: Optional[LocalStat]) -> Union[Download, Skip]:
    if st is None:
        return Download(obj.key, path, obj.size, obj.etag, False, "new" if entry is None else "missing")
    if not st.is_file:
        return Download(obj.key, path, obj.size, obj.etag, False, "not-a-file")
    if entry is not None and entry.size == obj.size and entry.etag == obj.etag:
        if st.size == obj.size and st.mtime_ns == entry.mtime_ns:
            return Skip(obj.key, path, obj.size)
        return Download(obj.key, path, obj.size, obj.etag, st.size == obj.size, "local-modified")
    reason = "changed" if entry is not None else "unverified"
    return Download(obj.key, path, obj.size, obj.etag, st.size == obj.size, reason)


def plan(
    remote: Iterable[RemoteObject],
    manifest: Iterable[ManifestEntry],
    stat: StatFn,
    prefix: str,
    key_filter: Optional[KeyFilter] = None,
    lookup: Optional[Callable[[str], Optional[ManifestEntry]]] = None,
) -> Iterator[Action]:
    """Yield one action per listed object, plus ``Stale`` for manifest rows no longer listed.

    ``lookup`` serves keys that arrive out of order (an S3-compatible store that does not sort):
    the merge then falls back to a point lookup for that key instead of mis-planning it.
    """
    key_filter = key_filter or KeyFilter()
    conflicts = ConflictDetector()
    mit = iter(manifest)
    pending: Optional[ManifestEntry] = next(mit, None)
    last_key: Optional[str] = None
    for obj in remote:
        entry: Optional[ManifestEntry] = None
        if last_key is not None and obj.key < last_key:
            entry = lookup(obj.key) if lookup else None
        else:
            last_key = obj.key
            while pending is not None and pending.key < obj.key:
                yield Stale(pending)
                pending = next(mit, None)
            if pending is not None and pending.key == obj.key:
                entry = pending
                pending = next(mit, None)
        verdict = key_to_relpath(obj.key, prefix, obj.size)
        if verdict.path is None:
            if verdict.reason or not verdict.marker:
                yield Refuse(obj.key, verdict.reason, verdict.marker)
            if entry is not None:
                yield Stale(entry)
            continue
        path = verdict.path
        if not key_filter(path):
            yield Filtered(obj.key)
            if entry is not None:
                yield Stale(entry)
            continue
        clash = conflicts.check(path)
        if clash is not None:
            yield Refuse(obj.key, f"key {obj.key!r}: file/directory conflict: {clash!r} is a file in this listing, so {path!r} cannot be created under it")
            if entry is not None:
                yield Stale(entry)
            continue
        yield decide(obj, path, entry, stat(path))
    while pending is not None:
        yield Stale(pending)
        pending = next(mit, None)
