"""Dataset pre-warm: make a local directory hold exactly the objects under an S3 prefix.

Coordinator (this module, one thread): list -> plan (streamed into the on-disk plan) -> download
through the bounded pool -> record each completed file in the manifest -> optional delete. Workers
(``download``) only move bytes. ``sync_dataset`` never raises for a per-object problem; it returns a
``SyncResult`` whose messages name each failed key. It raises only for programming errors.
"""

from __future__ import annotations

import fcntl
import os
import stat as statmod
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, List, Optional

from agent.config import DatasetSection, TransferSection
from agent.transfer import safefs
from agent.transfer.bandwidth import Limiter
from agent.transfer.download import Downloader, FileOutcome
from agent.transfer.fastget import FastGetter
from agent.transfer.keys import STATE_DIR_NAME, TEMP_PREFIX, KeyFilter, split_s3_url
from agent.transfer.manifest import LocalManifest, manifest_path
from agent.transfer.planner import Download, Filtered, LocalStat, RemoteObject, Refuse, Skip, Stale, plan
from agent.transfer.progress import RateMeter, SyncProgress, eta
from agent.transfer.scheduler import BoundedExecutor

MAX_MESSAGES = 1000

__all__ = ["sync_dataset", "SyncResult", "SyncProgress"]


@dataclass
class SyncResult:
    files: int = 0  # files downloaded
    bytes: int = 0  # bytes downloaded
    skipped: int = 0  # already up to date (including adopted local files)
    errors: int = 0
    error_messages: List[str] = field(default_factory=list)
    deleted: int = 0
    seconds: float = 0.0
    adopted: int = 0  # local files proven identical by hash and recorded without downloading
    notes: List[str] = field(default_factory=list)  # not errors: folder markers ignored
    stopped: bool = False
    retries: int = 0

    @property
    def ok(self) -> bool:
        return self.errors == 0 and not self.stopped

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_messages) < MAX_MESSAGES:
            self.error_messages.append(message)
        elif len(self.error_messages) == MAX_MESSAGES:
            self.error_messages.append("... more errors not shown")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _lstat(root_fd: int) -> Callable[[str], Optional[LocalStat]]:
    """What the planner sees of a local path: relative to the destination's fd, the last component
    not followed. (Only decides skip or download; writes go through ``safefs`` and refuse links.)"""

    def stat(rel: str) -> Optional[LocalStat]:
        try:
            st = os.stat(rel, dir_fd=root_fd, follow_symlinks=False)
        except OSError:
            return None
        return LocalStat(st.st_size, st.st_mtime_ns, statmod.S_ISREG(st.st_mode))

    return stat


def list_objects(s3: Any, bucket: str, prefix: str) -> Iterator[RemoteObject]:
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": 1000}):
        for obj in page.get("Contents", ()):
            yield RemoteObject(obj["Key"], int(obj["Size"]), obj.get("ETag", ""))


def _remove_leftover_temps(root_fd: int) -> int:
    removed = 0
    for rel, dfd, dirs, others in safefs.walk(root_fd, same_dev=True):
        if rel == "" and STATE_DIR_NAME in dirs:
            dirs.remove(STATE_DIR_NAME)
        for name, _st in others:
            if name.startswith(TEMP_PREFIX):
                try:
                    os.unlink(name, dir_fd=dfd)
                    removed += 1
                except OSError:
                    pass
    return removed


class _Lock:
    def __init__(self, path: str) -> None:
        self.fh = open(path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise RuntimeError("another sync of this dataset is running (lock held on " + path + ")") from None

    def release(self) -> None:
        self.fh.close()


def sync_dataset(s3: Any, ds: DatasetSection, transfer: TransferSection, state_dir: str,
                 progress: Optional[Callable[[SyncProgress], None]] = None,
                 stop: Optional[threading.Event] = None, label: str = "") -> SyncResult:
    from agent import metrics

    t0 = time.monotonic()
    result = SyncResult()
    stop = stop or threading.Event()
    name = label or ds.dest
    dest = os.path.abspath(ds.dest)
    try:
        bucket, prefix = split_s3_url(ds.source)
    except ValueError as exc:
        result.error(str(exc))
        return result
    try:
        root_fd = safefs.open_root(dest, create=True, what="dataset dest")
    except (OSError, safefs.UnsafePath) as exc:
        result.error(str(exc) if isinstance(exc, safefs.UnsafePath) else f"dataset dest {dest}: {exc.strerror}")
        metrics.DATASET_ERRORS.labels(dataset=name).inc()
        return result
    try:
        mpath = manifest_path(state_dir, ds.source, dest)
        os.makedirs(os.path.dirname(mpath), exist_ok=True)
        lock = _Lock(mpath + ".lock")
    except (OSError, RuntimeError) as exc:
        os.close(root_fd)
        result.error(f"{ds.dest}: {exc}")
        metrics.DATASET_ERRORS.labels(dataset=name).inc()
        return result
    manifest = LocalManifest(mpath, ds.source, dest)
    try:
        clean = manifest.db.execute("SELECT value FROM meta WHERE name = 'clean'").fetchone()
        if clean is not None and clean[0] == "0":
            _remove_leftover_temps(root_fd)  # the last run died mid-flight
        manifest.db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', '0')")
        _run(s3, ds, transfer, bucket, prefix, dest, root_fd, manifest, result, progress, stop, t0)
        if not result.stopped:
            manifest.db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', '1')")
    finally:
        manifest.close()
        lock.release()
        os.close(root_fd)
    result.seconds = time.monotonic() - t0
    metrics.DATASET_BYTES.labels(dataset=name).inc(result.bytes)
    metrics.DATASET_OBJECTS.labels(dataset=name).inc(result.files)
    metrics.DATASET_SKIPPED.labels(dataset=name).inc(result.skipped)
    if result.errors:
        metrics.DATASET_ERRORS.labels(dataset=name).inc(result.errors)
    if result.ok:
        metrics.DATASET_LAST_SUCCESS.labels(dataset=name).set(time.time())
        metrics.DATASET_PROGRESS.labels(dataset=name).set(1)
    return result


def _run(s3: Any, ds: DatasetSection, transfer: TransferSection, bucket: str, prefix: str, dest: str, root_fd: int,
         manifest: LocalManifest, result: SyncResult, progress: Optional[Callable[[SyncProgress], None]],
         stop: threading.Event, t0: float) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from agent import metrics

    name = ds.dest
    # -- plan ------------------------------------------------------------------------------------
    if ds.delete:
        manifest.start_remote()
    downloads: List[Download] = []
    stale: list = []
    remote_paths: List[str] = []
    need = 0
    large = 0
    files_total = 0
    bytes_total = 0
    skipped_bytes = 0
    listing_ok = True
    try:
        actions = plan(list_objects(s3, bucket, prefix), manifest.entries(), _lstat(root_fd), prefix,
                       KeyFilter(ds.include, ds.exclude), lookup=manifest.lookup)
        for act in actions:
            if isinstance(act, Download):
                downloads.append(act)
                files_total += 1
                bytes_total += act.size
                need += act.size
                if act.size >= transfer.multipart_threshold and act.size > transfer.part_size:
                    large += 1
                if ds.delete:
                    remote_paths.append(act.path)
                if len(downloads) >= 1000:
                    manifest.add_plan(downloads)
                    downloads.clear()
            elif isinstance(act, Skip):
                result.skipped += 1
                files_total += 1
                bytes_total += act.size
                skipped_bytes += act.size
                if ds.delete:
                    remote_paths.append(act.path)
            elif isinstance(act, Stale):
                stale.append(act.entry)
                if len(stale) >= 1000:
                    manifest.add_stale(stale)
                    stale.clear()
            elif isinstance(act, Refuse):
                if act.marker:
                    result.skipped += 1
                    if len(result.notes) < MAX_MESSAGES:
                        result.notes.append(act.reason)
                else:
                    result.error(act.reason)
            elif isinstance(act, Filtered):
                pass
            if len(remote_paths) >= 1000:
                manifest.add_remote(remote_paths)
                remote_paths.clear()
            if stop.is_set():
                result.stopped = True
                return
    except (ClientError, BotoCoreError) as exc:
        listing_ok = False
        result.error(f"cannot list {ds.source}: {exc}")
    manifest.add_plan(downloads)
    manifest.add_stale(stale)
    if remote_paths:
        manifest.add_remote(remote_paths)
    del downloads, stale, remote_paths
    if not listing_ok:
        return
    manifest.drop_stale_rows()

    # -- space check: a clear error up front instead of a thousand ENOSPCs -----------------------
    try:
        vfs = os.statvfs(root_fd)
        free = vfs.f_bavail * vfs.f_frsize
    except OSError:
        free = -1
    if free >= 0 and need > free:
        result.error(f"not enough space in {dest}: the sync needs {need} bytes, {free} are free")
        return

    # -- download -----------------------------------------------------------------------------
    done_bytes = [skipped_bytes]
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            done_bytes[0] += n

    limiter = Limiter(transfer.max_bandwidth, stop=stop)
    fast = FastGetter.create(s3, transfer.concurrency + 4) if transfer.engine == "auto" else None
    dl = Downloader(s3, bucket, dest, limiter, transfer.part_size, transfer.multipart_threshold, stop=stop, on_bytes=on_bytes, fast=fast,
                    root_fd=root_fd)
    dl.concurrency, dl.large_files = transfer.concurrency, large
    pool = BoundedExecutor(transfer.concurrency, transfer.concurrency * 2, "dataset")
    meter = RateMeter()
    files_done = [result.skipped]
    last_report = [0.0]

    def report(force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - last_report[0] < 0.25:
            return
        last_report[0] = now
        with lock:
            b = done_bytes[0]
        meter.add(now, b)
        r = meter.rate()
        p = SyncProgress(b, bytes_total, files_done[0], files_total, r, eta(bytes_total - b, r))
        metrics.DATASET_PROGRESS.labels(dataset=name).set(p.ratio)
        if progress is not None:
            progress(p)

    fatal = [False]

    def handle(out: Any) -> None:
        if isinstance(out, BaseException):
            result.error(f"internal error: {type(out).__name__}: {out}")
            return
        assert isinstance(out, FileOutcome)
        files_done[0] += 1
        if out.ok:
            manifest.record(out.item.key, out.item.path, out.item.size, out.item.etag, out.mtime_ns)
            if out.adopted:
                result.adopted += 1
                result.skipped += 1
                on_bytes(out.item.size)
            else:
                result.files += 1
                result.bytes += out.item.size
        elif out.error == f"{out.item.key}: stopped" or (stop.is_set() and out.error.endswith("stopped")):
            result.stopped = True
        else:
            result.error(out.error)
            if out.fatal and not fatal[0]:
                fatal[0] = True
                stop.set()

    report(force=True)
    try:
        for item in manifest.plan_items():
            if stop.is_set():
                break
            job = dl.job(item)
            for i in range(len(job.chunks)):
                while not pool.submit(dl.run_chunk, job, i, timeout=0.1):
                    for out in pool.drain():
                        handle(out)
                    manifest.maybe_flush()
                    report()
            for out in pool.drain():
                handle(out)
            report()
        while not pool.idle():
            for out in pool.drain(timeout=0.1):
                handle(out)
            manifest.maybe_flush()
            report()
    finally:
        pool.shutdown()
        for out in pool.drain():
            handle(out)
        manifest.flush()
        result.retries = dl.retries
    if fatal[0]:
        result.stopped = False  # a full disk is an error, not a stop request
        _remove_leftover_temps(root_fd)
        return
    if stop.is_set():
        result.stopped = True
        return
    report(force=True)

    # -- delete -------------------------------------------------------------------------------
    if ds.delete and result.errors == 0:
        result.deleted = _delete_extraneous(root_fd, manifest, KeyFilter(ds.include, ds.exclude))


def _delete_extraneous(root_fd: int, manifest: LocalManifest, key_filter: KeyFilter) -> int:
    """Remove local files the listing did not have. Files outside include/exclude are out of scope.

    Walks relative to directory fds (``safefs.walk``): a directory swapped for a symlink is never
    entered, every unlink is relative to the fd of the directory that was listed, and another
    filesystem mounted inside the destination is never entered (st_dev)."""
    deleted = 0
    for rel_root, dfd, dirs, others in safefs.walk(root_fd, topdown=False, same_dev=True):
        if rel_root.split("/")[0] == STATE_DIR_NAME:
            continue
        for fname, _st in others:
            rel = f"{rel_root}/{fname}" if rel_root else fname
            if fname.startswith(TEMP_PREFIX) or not key_filter(rel):
                continue
            if not manifest.is_remote(rel):
                try:
                    os.unlink(fname, dir_fd=dfd)
                    deleted += 1
                except OSError:
                    pass
        for d in dirs:  # already emptied (bottom-up): remove it unless S3 still has files under it
            rel = f"{rel_root}/{d}" if rel_root else d
            if rel == STATE_DIR_NAME or manifest.has_remote_under(rel):
                continue
            try:
                os.rmdir(d, dir_fd=dfd)
            except OSError:
                pass
    return deleted
