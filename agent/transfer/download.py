"""One object -> one local file: temp file in the same directory, verified, then renamed.

A reader of the destination sees the old file or the new one, never a partial one (rename is atomic
within a filesystem, hence the temp file in the target directory). The temp name is derived from the
target name, so a run that resumes after a crash replaces its predecessor's leftovers.

The destination belongs to the job, which may swap any name in it for a symlink at any time: every
directory is opened (or created) relative to its parent's fd with O_NOFOLLOW (``safefs``), the temp
file is created O_EXCL|O_NOFOLLOW in that directory fd (a planted link or hard link is unlinked, never
written through), and the rename happens within the same directory fd. Nothing outside the tree the
destination fd was opened on is ever written.

Large objects are split into ranged GETs run in parallel, each writing at its offset (``pwrite``);
the worker that finishes the last range verifies and renames. Every GET carries ``If-Match: <ETag>``,
so an object replaced mid-download fails loudly instead of producing a mix of two versions.

Verification: the size always; the MD5 ETag when the object has one (single-part, not SSE-KMS/SSE-C),
hashed while streaming for single GETs and by re-reading the (page-cached) file for ranged ones.
Multipart ETags are not a content hash we can recompute without the original part sizes, so those
objects are verified by size, by the HTTP length of every range, and by botocore's response checksum
when S3 returns one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat as statmod
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from agent.transfer import safefs
from agent.transfer.bandwidth import Limiter
from agent.transfer.keys import TEMP_PREFIX
from agent.transfer.planner import Download
from agent.transfer.retry import backoff, is_transient


class Stopped(Exception):
    pass


class DiskFull(Exception):
    pass


class LocalError(Exception):
    """A problem with the destination tree (conflict, permissions): not retried."""


class RemoteError(Exception):
    """The object cannot be fetched as listed (changed, gone, refused): not retried."""


@dataclass
class FileOutcome:
    item: Download
    ok: bool
    adopted: bool = False
    mtime_ns: int = 0
    error: str = ""
    fatal: bool = False  # the destination is full: stop starting new files


MAX_RANGE = 64 * 1024 * 1024


def range_size(size: int, part_size: int, concurrency: int, large_files: int, cap: int = MAX_RANGE) -> int:
    """Bytes per ranged GET: all large files together should use about ``concurrency`` streams.

    More ranges than streams only add requests (each a first-byte latency on S3, and on some local
    S3 servers a full copy of the object per range); fewer leave connections idle. Never below
    ``part_size``; at most ``cap`` (64 MiB) so one slow or broken range costs little to redo.
    """
    streams = max(1, concurrency // max(1, min(large_files, concurrency)))
    want = -(-size // streams)
    return max(part_size, min(want, max(cap, part_size)))


def temp_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return TEMP_PREFIX + hashlib.sha1(base.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def plain_md5_etag(etag: str) -> Optional[str]:
    e = etag.strip('"').lower()
    if len(e) == 32 and all(c in "0123456789abcdef" for c in e):
        return e
    return None


def md5_file(path: str, limit: int = -1, fd: Optional[int] = None) -> str:
    h = hashlib.md5()
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while True:
            buf = os.pread(fd, 4 * 1024 * 1024, off)
            if not buf:
                break
            h.update(buf)
            off += len(buf)
    finally:
        if own:
            os.close(fd)
    return h.hexdigest()


class _Job:
    def __init__(self, item: Download, chunks: List[Tuple[int, int]], expect: Optional[List[str]] = None,
                 algorithm: str = "sha256") -> None:
        self.item = item
        self.expect = expect  # base64 checksum of each chunk (the upload's parts), verified as it lands
        self.algorithm = algorithm
        self.chunks = chunks
        self.lock = threading.Lock()
        self.remaining = len(chunks)
        self.prepared = False
        self.done: Optional[FileOutcome] = None  # set when adopted or failed before all chunks ran
        self.error = ""
        self.fatal = False
        self.fd = -1
        self.temp = ""
        self.md5 = hashlib.md5() if len(chunks) == 1 else None
        self.verify_md5 = expect is None and plain_md5_etag(item.etag) is not None
        self.parent_fd = -1  # the directory the temp file was created in (and is renamed within)
        self.owner: Optional[Tuple[int, int]] = None  # (uid, gid) to give the file, from a manifest
        self.mode: Optional[int] = None  # permission bits to give it


class Downloader:
    def __init__(self, s3: Any, bucket: str, dest: str, limiter: Limiter, part_size: int, threshold: int,
                 attempts: int = 6, stop: Optional[threading.Event] = None,
                 on_bytes: Optional[Callable[[int], None]] = None, fast: Any = None,
                 root_fd: int = -1, inherit_owner: bool = False) -> None:
        """``root_fd``: ``dest`` opened by ``safefs.open_root`` (the caller keeps it open and closes
        it); all writes happen below it. ``inherit_owner``: a file without an owner from the manifest
        (and the directories made for it) gets the owner of ``dest`` instead of root."""
        self.s3 = s3
        self.fast = fast  # a FastGetter, or None for plain get_object
        self.bucket = bucket
        self.dest = os.path.abspath(dest)
        self.limiter = limiter
        self.part_size = part_size
        self.threshold = threshold
        self.attempts = attempts
        self.stop = stop or threading.Event()
        self.on_bytes = on_bytes or (lambda n: None)
        self.root_fd = root_fd
        self.default_owner: Optional[Tuple[int, int]] = None
        if inherit_owner:
            st = os.fstat(root_fd)
            self.default_owner = (st.st_uid, st.st_gid)
        self.retries = 0
        self.concurrency = 16  # set by the coordinator, with large_files, to size the ranges
        self.large_files = 1

    # -- planning a file into chunk tasks -------------------------------------------------------
    def job(self, item: Download, part_size: int = 0, expect: Optional[List[str]] = None, algorithm: str = "sha256",
            owner: Optional[Tuple[int, int]] = None, mode: Optional[int] = None) -> _Job:
        """``part_size``/``expect``: fetch in exactly these parts and check each part's checksum.
        ``owner``: (uid, gid) the file and the directories created for it get; ``mode``: its
        permission bits (setuid/setgid never applied)."""
        if expect is not None:
            step = part_size or max(1, item.size)
            chunks = [(s, min(s + step, item.size) - 1) for s in range(0, item.size, step)] or [(0, -1)]
            if len(chunks) != len(expect):
                raise ValueError(f"{item.key}: manifest lists {len(expect)} part checksums for {len(chunks)} parts")
            job = _Job(item, chunks, expect, algorithm)
            job.owner, job.mode = owner, mode
            return job
        if item.size < self.threshold or item.size <= self.part_size:
            return _Job(item, [(0, item.size - 1)])
        step = range_size(item.size, self.part_size, self.concurrency, self.large_files)
        chunks = [(s, min(s + step, item.size) - 1) for s in range(0, item.size, step)]
        return _Job(item, chunks)

    def run_chunk(self, job: _Job, index: int) -> Optional[FileOutcome]:
        """Fetch one chunk; returns the file's outcome if this call finished the file."""
        try:
            with job.lock:
                skip = job.done is not None or bool(job.error)
                if not skip and not job.prepared:
                    adopted = self._prepare(job)
                    if adopted is not None:
                        job.done = adopted
                        skip = True
            if skip:
                return self._release(job)
            start, end = job.chunks[index]
            self._fetch(job, start, end, ranged=len(job.chunks) > 1)
        except DiskFull as exc:
            job.error, job.fatal = str(exc), True
        except (LocalError, RemoteError, Stopped) as exc:
            job.error = job.error or (str(exc) or "stopped")
        except Exception as exc:  # noqa: BLE001 - reported per key, never aborts the sync
            job.error = job.error or f"{type(exc).__name__}: {exc}"
        return self._release(job)

    def _release(self, job: _Job) -> Optional[FileOutcome]:
        with job.lock:
            job.remaining -= 1
            if job.remaining > 0:
                return None
        if job.done is not None and not job.prepared:
            return job.done
        if job.error:
            self._discard(job)
            return FileOutcome(job.item, False, error=f"{job.item.key}: {job.error}", fatal=job.fatal)
        if job.done is not None:
            return job.done
        try:
            return self._finish(job)
        except DiskFull as exc:
            self._discard(job)
            return FileOutcome(job.item, False, error=f"{job.item.key}: {exc}", fatal=True)
        except Exception as exc:  # noqa: BLE001
            self._discard(job)
            return FileOutcome(job.item, False, error=f"{job.item.key}: {exc}")

    # -- the local side ---------------------------------------------------------------------
    def _owner_of(self, job: _Job) -> Optional[Tuple[int, int]]:
        return job.owner if job.owner is not None else self.default_owner

    def _open_parent(self, job: _Job) -> int:
        """The file's directory as an fd, created (0755, the file's owner) where missing."""
        head = job.item.path.rpartition("/")[0]
        try:
            return safefs.open_dirs(self.root_fd, head, create=True, mode=0o755, owner=self._owner_of(job))
        except safefs.UnsafePath as exc:
            raise LocalError(f"{exc}, so {job.item.path!r} cannot be created") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left on the destination filesystem ({self.dest}) creating {head}/") from None
            raise LocalError(f"cannot create directory {head}/: {exc.strerror}") from None

    def _prepare(self, job: _Job) -> Optional[FileOutcome]:
        item = job.item
        name = item.path.rpartition("/")[2]
        job.parent_fd = pfd = self._open_parent(job)
        try:
            st: Optional[os.stat_result] = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            st = None
        if st is not None and statmod.S_ISDIR(st.st_mode):
            raise LocalError(f"file/directory conflict: local {item.path!r} is a directory")
        if item.verify and st is not None and statmod.S_ISREG(st.st_mode) and st.st_size == item.size:
            adopted = self._adopt(job, pfd, name)
            if adopted is not None:
                return adopted
        job.temp = temp_name(item.path)
        try:
            os.unlink(job.temp, dir_fd=pfd)  # a crashed run's leftover, or a link the job planted
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LocalError(f"cannot remove the old temp file in {os.path.dirname(item.path) or '.'}/: {exc.strerror}") from None
        try:
            job.fd = os.open(job.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left on the destination filesystem ({self.dest})") from None
            raise LocalError(f"cannot create a temp file in {os.path.dirname(item.path) or '.'}/: {exc.strerror}") from None
        job.prepared = True
        if item.size > 0:
            try:
                os.posix_fallocate(job.fd, 0, item.size)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DiskFull(f"no space left on the destination filesystem ({self.dest}) for {item.size} bytes") from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise LocalError(f"cannot allocate {item.path}: {exc.strerror}") from None
        return None

    def _adopt(self, job: _Job, pfd: int, name: str) -> Optional[FileOutcome]:
        """The local file already holds the object's bytes (checked by hash, read through one fd)."""
        try:
            fd = os.open(name, safefs.O_READ, dir_fd=pfd)
        except OSError:
            return None  # swapped for a link, or gone: download it
        try:
            st = os.fstat(fd)
            if not statmod.S_ISREG(st.st_mode) or st.st_size != job.item.size:
                return None
            if job.expect is not None:
                same = self._local_parts(fd, job) == job.expect
            else:
                want = plain_md5_etag(job.item.etag)
                same = want is not None and md5_file("", fd=fd) == want
            if same and safefs.unchanged(fd, safefs.Identity.of(st)):
                self._close_parent(job)
                return FileOutcome(job.item, True, adopted=True, mtime_ns=st.st_mtime_ns)
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _local_parts(fd: int, job: _Job) -> List[str]:
        from agent.transfer import checksums

        out = []
        for start, end in job.chunks:
            h = checksums.new(job.algorithm)
            off = start
            while off <= end:
                buf = os.pread(fd, min(4 * 1024 * 1024, end - off + 1), off)
                if not buf:
                    break
                h.update(buf)
                off += len(buf)
            out.append(checksums.b64(h.digest()))
        return out

    @staticmethod
    def _close_parent(job: _Job) -> None:
        if job.parent_fd >= 0:
            try:
                os.close(job.parent_fd)
            except OSError:
                pass
            job.parent_fd = -1

    def _discard(self, job: _Job) -> None:
        if job.fd >= 0:
            try:
                os.close(job.fd)
            except OSError:
                pass
            job.fd = -1
        if job.temp and job.parent_fd >= 0:
            try:
                os.unlink(job.temp, dir_fd=job.parent_fd)
            except OSError:
                pass
        self._close_parent(job)

    def _finish(self, job: _Job) -> FileOutcome:
        item = job.item
        st = os.fstat(job.fd)
        if st.st_size != item.size:
            raise RemoteError(f"size mismatch after download: {st.st_size} != {item.size}")
        if job.verify_md5:
            want = plain_md5_etag(item.etag)
            got = job.md5.hexdigest() if job.md5 is not None else md5_file("", fd=job.fd)
            if got != want:
                raise RemoteError(f"checksum mismatch: MD5 {got} != ETag {want}")
        owner = self._owner_of(job)
        try:
            if owner is not None:
                os.fchown(job.fd, owner[0], owner[1])
            if job.mode is not None:
                os.fchmod(job.fd, job.mode & 0o1777)  # never a setuid/setgid bit from a manifest
        except OSError as exc:
            raise LocalError(f"cannot set owner/mode: {exc.strerror}") from None
        mtime_ns = os.fstat(job.fd).st_mtime_ns
        os.close(job.fd)
        job.fd = -1
        name = item.path.rpartition("/")[2]
        try:
            try:
                if statmod.S_ISDIR(os.lstat(name, dir_fd=job.parent_fd).st_mode):
                    raise LocalError(f"file/directory conflict: local {item.path!r} is a directory")
            except FileNotFoundError:
                pass
            os.rename(job.temp, name, src_dir_fd=job.parent_fd, dst_dir_fd=job.parent_fd)
        except OSError as exc:
            raise LocalError(f"cannot rename into place: {exc.strerror}") from None
        self._close_parent(job)
        return FileOutcome(item, True, mtime_ns=mtime_ns)

    # -- the remote side --------------------------------------------------------------------
    def _fetch(self, job: _Job, start: int, end: int, ranged: bool) -> None:
        from botocore.exceptions import ClientError

        item = job.item
        pos = [start]  # advanced by _copy as bytes land, so a retry resumes where the body broke off
        attempt = 0
        hasher = None
        if job.expect is not None:
            from agent.transfer import checksums

            hasher = checksums.new(job.algorithm)
        while True:
            if self.stop.is_set():
                raise Stopped("stopped")
            if job.error:
                return
            try:
                rng = f"bytes={pos[0]}-{end}" if (ranged or pos[0] > start) and item.size > 0 else ""
                fast = self.fast
                if fast is not None:
                    try:
                        meta, body = fast.get(self.bucket, item.key, rng, item.etag)
                    except ClientError as exc:
                        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                        if status in (301, 307, 400, 403):
                            # A redirect or a signature/region complaint: let botocore (which follows
                            # region redirects and knows every auth quirk) serve the rest of this run.
                            self.fast = None
                            continue
                        raise
                    sse, ssec = meta["sse"], meta["ssec"]
                else:
                    kwargs = {"Bucket": self.bucket, "Key": item.key}
                    if item.etag:
                        kwargs["IfMatch"] = item.etag
                    if rng:
                        kwargs["Range"] = rng
                    resp = self.s3.get_object(**kwargs)
                    sse, ssec = resp.get("ServerSideEncryption", ""), resp.get("SSECustomerAlgorithm", "")
                    body = resp["Body"]
                if sse in ("aws:kms", "aws:kms:dsse") or ssec:
                    job.verify_md5 = False  # the ETag is not an MD5 of the content
                try:
                    self._copy(job, body, pos, end, hasher)
                finally:
                    body.close()
                if pos[0] <= end:
                    raise _Truncated(f"body ended at byte {pos[0]}, expected {end + 1}")
                if hasher is not None:
                    from agent.transfer.checksums import b64

                    idx = job.chunks.index((start, end))
                    got = b64(hasher.digest())
                    if got != job.expect[idx]:
                        raise RemoteError(f"checksum mismatch in bytes {start}-{end}: {job.algorithm} {got} != manifest {job.expect[idx]}; refusing the object")
                return
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412"):
                    raise RemoteError("the object changed during the sync (ETag no longer matches); the next sync fetches it") from None
                if code in ("NoSuchKey", "404"):
                    raise RemoteError("the object was deleted during the sync") from None
                if code in ("AccessDenied", "403"):
                    raise RemoteError("access denied") from None
                if not is_transient(exc):
                    raise RemoteError(f"{code}: {exc}") from None
                last: BaseException = exc
            except (DiskFull, LocalError, Stopped, RemoteError):
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if not (isinstance(exc, _Truncated) or is_transient(exc)):
                    raise
                last = exc
            attempt += 1
            self.retries += 1
            if attempt >= self.attempts:
                raise RemoteError(f"gave up after {attempt} attempts: {type(last).__name__}: {last}")
            if self.stop.wait(backoff(attempt)):
                raise Stopped("stopped")

    def _copy(self, job: _Job, body: Any, pos: List[int], end: int, hasher: Any = None) -> None:
        chunk = self.limiter.chunk
        while pos[0] <= end:
            offset = pos[0]
            if self.stop.is_set():
                raise Stopped("stopped")
            data = body.read(min(chunk, end - offset + 1))
            if not data:
                break
            self.limiter.consume(len(data))
            try:
                os.pwrite(job.fd, data, offset)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(f"no space left on the destination filesystem ({self.dest})") from None
                raise LocalError(f"write failed: {exc.strerror}") from None
            if job.md5 is not None:
                job.md5.update(data)
            if hasher is not None:
                hasher.update(data)
            pos[0] = offset + len(data)
            self.on_bytes(len(data))


class _Truncated(Exception):
    pass
