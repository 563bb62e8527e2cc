"""One local file -> one S3 object, with a checksum S3 verifies on arrival (x-amz-checksum-*).

Small files: one PUT. Large files: a multipart upload whose parts run in parallel on the shared
pool; the worker finishing the last part completes the upload, and any failed part aborts it, so no
orphaned parts are left behind. The file is opened once, relative to the checkpoint dir's fd and
without following symlinks (``safefs.open_listed``), checked to be the inode the scan listed, and read
in parts with ``pread`` from that one fd; its identity (dev, ino, size, mtime, ctime) is checked again
after the last read, so a file modified or swapped while uploading is refused, not stored torn.
The per-part checksums are returned for the manifest: restore fetches the same byte ranges and
checks each one, in parallel, without a second pass over the file.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from agent.transfer import checksums, safefs
from agent.transfer.bandwidth import Limiter
from agent.transfer.retry import backoff, is_transient


class UploadError(Exception):
    pass


class FileChanged(UploadError):
    """The file changed, shrank or went away while it was read: not an S3 failure, the file was busy."""


@dataclass
class LocalFile:
    path: str  # relative POSIX path inside the checkpoint directory
    full: str
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int = 0
    uid: int = 0
    gid: int = 0
    mode: int = 0o644  # permission bits only

    @property
    def identity(self) -> safefs.Identity:
        return safefs.Identity(self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)


@dataclass
class UploadOutcome:
    file: LocalFile
    key: str
    ok: bool
    part_size: int = 0
    parts: List[str] = field(default_factory=list)
    error: str = ""
    changed: bool = False  # refused because the file changed while it was read (see FileChanged)


class _FileUpload:
    def __init__(self, f: LocalFile, key: str, part_size: int, multipart: bool) -> None:
        self.f = f
        self.key = key
        self.part_size = part_size if multipart else max(1, f.size)
        n = max(1, -(-f.size // self.part_size))
        self.ranges = [(i * self.part_size, min(self.part_size, f.size - i * self.part_size)) for i in range(n)]
        self.multipart = multipart
        self.upload_id = ""
        self.etags: List[str] = [""] * n
        self.sums: List[str] = [""] * n
        self.remaining = n
        self.lock = threading.Lock()
        self.error = ""
        self.fd = -1  # the one fd every part reads from
        self.changed = False


class Uploader:
    def __init__(self, s3: Any, bucket: str, algorithm: str, part_size: int, threshold: int, limiter: Limiter,
                 attempts: int = 5, stop: Optional[threading.Event] = None,
                 on_bytes: Optional[Callable[[int], None]] = None, root_fd: int = -1) -> None:
        """``root_fd``: the checkpoint directory, opened by ``safefs.open_root``; every file is opened
        relative to it (the caller keeps it open until ``close``)."""
        if not checksums.available(algorithm):
            checksums.new(algorithm)  # raises the clear error
        self.s3 = s3
        self.bucket = bucket
        self.algorithm = algorithm
        self.s3_alg = checksums.S3_NAMES[algorithm]
        self.part_size = part_size
        self.threshold = threshold
        self.limiter = limiter
        self.attempts = attempts
        self.stop = stop or threading.Event()
        self.on_bytes = on_bytes or (lambda n: None)
        self.open_uploads: Dict[str, str] = {}  # key -> upload id, for abort on failure/deadline
        self._lock = threading.Lock()
        self.root_fd = root_fd
        self._open: Dict[int, _FileUpload] = {}  # id(job) -> job holding an fd, closed by close()

    def plan(self, f: LocalFile, key: str) -> _FileUpload:
        job = _FileUpload(f, key, self.part_size, f.size >= self.threshold and f.size > self.part_size)
        try:
            job.fd = safefs.open_listed(self.root_fd, f.path, f.identity)
        except (OSError, safefs.UnsafePath) as exc:
            # gone, or not the file the scan listed (replaced, renamed over): busy, not a failure
            job.changed = isinstance(exc, (FileNotFoundError, safefs.UnsafePath))
            job.error = f"not uploaded: {getattr(exc, 'strerror', None) or exc}"
            return job  # every part reports the error; nothing was created in S3
        with self._lock:
            self._open[id(job)] = job
        if job.multipart:
            resp = self._call(self.s3.create_multipart_upload, Bucket=self.bucket, Key=key, ChecksumAlgorithm=self.s3_alg)
            job.upload_id = resp["UploadId"]
            with self._lock:
                self.open_uploads[key] = job.upload_id
        return job

    def run_part(self, job: _FileUpload, index: int) -> Optional[UploadOutcome]:
        try:
            if not job.error:
                self._part(job, index)
        except Exception as exc:  # noqa: BLE001 - reported per file
            job.changed = job.changed or (not job.error and isinstance(exc, (FileChanged, FileNotFoundError)))
            job.error = job.error or str(exc)
        with job.lock:
            job.remaining -= 1
            last = job.remaining == 0
        if not last:
            return None
        if not job.error:
            try:
                self._check_unchanged(job)
                if job.multipart:
                    self._call(self.s3.complete_multipart_upload, Bucket=self.bucket, Key=job.key, UploadId=job.upload_id,
                               MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": e, f"Checksum{self.s3_alg}": c}
                                                          for i, (e, c) in enumerate(zip(job.etags, job.sums))]})
                    with self._lock:
                        self.open_uploads.pop(job.key, None)
            except Exception as exc:  # noqa: BLE001
                job.changed = isinstance(exc, (FileChanged, FileNotFoundError))
                job.error = str(exc)
        self._close(job)
        if job.error:
            self.abort(job.key)
            return UploadOutcome(job.f, job.key, False, error=f"{job.f.path}: {job.error}", changed=job.changed)
        return UploadOutcome(job.f, job.key, True, job.part_size, list(job.sums))

    def abort(self, key: str) -> None:
        with self._lock:
            upload_id = self.open_uploads.pop(key, "")
        if upload_id:
            try:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - best effort; prune aborts leftovers later
                pass

    def abort_all(self) -> None:
        with self._lock:
            keys = list(self.open_uploads)
        for k in keys:
            self.abort(k)

    def _close(self, job: _FileUpload) -> None:
        with self._lock:
            self._open.pop(id(job), None)
            fd, job.fd = job.fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        """Close the fds of files whose parts never all ran (a stop or an error cut the upload short)."""
        with self._lock:
            jobs = list(self._open.values())
        for job in jobs:
            self._close(job)

    @staticmethod
    def _check_unchanged(job: _FileUpload) -> None:
        if not safefs.unchanged(job.fd, job.f.identity):
            raise FileChanged("the file changed while it was being uploaded")

    def _part(self, job: _FileUpload, index: int) -> None:
        if self.stop.is_set():
            raise UploadError("stopped")
        offset, length = job.ranges[index]
        data = os.pread(job.fd, length, offset) if length else b""
        if len(data) != length:
            raise FileChanged("the file shrank while it was being uploaded")
        self.limiter.consume(len(data))
        if self.stop.is_set():  # the wait for bandwidth ended because the upload was stopped
            raise UploadError("stopped")
        digest = checksums.of_bytes(self.algorithm, data)
        arg = {f"Checksum{self.s3_alg}": digest}
        if job.multipart:
            resp = self._call(self.s3.upload_part, Bucket=self.bucket, Key=job.key, UploadId=job.upload_id,
                              PartNumber=index + 1, Body=data, **arg)
            job.etags[index] = resp["ETag"]
        else:
            self._call(self.s3.put_object, Bucket=self.bucket, Key=job.key, Body=data, **arg)
        job.sums[index] = digest
        self.on_bytes(len(data))

    def put_bytes(self, key: str, body: bytes, **extra: Any) -> Any:
        """One small object in one PUT, retried like every part (a checkpoint's manifest: the caller
        passes its own checksum and conditions, e.g. ``IfNoneMatch="*"``)."""
        return self._call(self.s3.put_object, Bucket=self.bucket, Key=key, Body=body, **extra)

    def _call(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                return fn(**kwargs)
            except Exception as exc:  # noqa: BLE001 - classified
                attempt += 1
                if not is_transient(exc) or attempt >= self.attempts:
                    raise
                if self.stop.wait(backoff(attempt)):
                    raise UploadError("stopped") from None
