"""Checkpoints out to S3 and back: upload, commit (manifest last), restore (verified), retention.

S3 layout under the configured prefix (``s3 = "s3://bucket/checkpoints/run-42/"``)::

    data/<id>/<relative path>       file contents, uploaded with an S3-verified checksum
    manifests/<id>.json             the commit record, written LAST

``<id>`` is ``YYYYMMDDTHHMMSS.ffffffZ-<6 hex>`` (UTC), so key order is time order. A checkpoint is
committed exactly when its manifest exists; an upload interrupted before that leaves the previous
manifest the newest one. Unchanged files (same size, mtime, ctime and inode as in the previous
committed manifest) are not uploaded again: the new manifest points at the object already stored.
Retention keeps the newest ``keep`` manifests and deletes only keys of our own layout that no kept
manifest references (never anything else under the prefix).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import socket
import stat as statmod
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

from botocore.exceptions import ClientError

from agent import metrics
from agent.config import CheckpointSection, TransferSection
from agent.state import StateStore
from agent.transfer import checksums, safefs
from agent.transfer.bandwidth import Limiter
from agent.transfer.checkpoint_manifest import FORMAT, ID_RE, MAX_MANIFEST_BYTES, ManifestError, describe
from agent.transfer.checkpoint_manifest import parse as parse_manifest
from agent.transfer.checkpoint_manifest import validate as validate_manifest
from agent.transfer.download import Downloader, FileOutcome
from agent.transfer.fastget import FastGetter
from agent.transfer.keys import TEMP_PREFIX, key_to_relpath, split_s3_url
from agent.transfer.planner import Download
from agent.transfer.scheduler import TaskLoop
from agent.transfer.upload import LocalFile, UploadOutcome, Uploader

log = logging.getLogger(__name__)

MANIFEST_RESERVE = 2.0  # seconds kept for writing the manifest before a deadline


@dataclass
class CommitResult:
    committed: bool
    checkpoint_id: str = ""
    files: int = 0  # files in the committed checkpoint
    bytes: int = 0  # bytes uploaded by this call (unchanged files are not re-sent)
    seconds: float = 0.0
    error: str = ""
    manifest_key: str = ""
    uploaded: int = 0  # files uploaded by this call
    reused: int = 0  # files carried over from the previous checkpoint
    incomplete: List[str] = field(default_factory=list)  # files left out: still being written, or changed
    changed: List[str] = field(default_factory=list)  # of those, the ones that changed while being read
    preempted: bool = False  # stopped because the drain's final upload took over (not a failure)
    refused: List[str] = field(default_factory=list)  # files left out for safety (hard links to others' files)


@dataclass
class RestoreResult:
    restored: bool
    checkpoint_id: str = ""
    files: int = 0
    bytes: int = 0
    skipped: int = 0  # already present locally with matching checksums
    seconds: float = 0.0
    error: str = ""
    error_messages: List[str] = field(default_factory=list)
    # Newer manifests skipped because they did not verify, newest first: [{"id": ..., "reason": ...}].
    # Non-empty means this restore fell back to an older checkpoint (or found none that verifies).
    rejected: List[Dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.restored

    @property
    def fell_back(self) -> bool:
        return bool(self.rejected) and bool(self.checkpoint_id)


def precondition_failed(exc: ClientError) -> bool:
    """A conditional write (If-None-Match: *) refused because the key exists (412, or 409 for a race)."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def new_checkpoint_id(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int((now % 1) * 1e6):06d}Z-{secrets.token_hex(3)}"


def complete_files(root: str, files: List[LocalFile], settle: float, marker: str, now: float) -> Tuple[List[LocalFile], List[str]]:
    """Split files into complete and still-being-written. Pure apart from the marker stats given in.

    With ``marker`` set, a file is complete when its directory or one above it (inside the checkpoint
    dir) holds the marker and the file is no newer than that marker. Otherwise a file is complete once
    unmodified for ``settle`` seconds (mtime and ctime: a rename or chmod resets it too).
    """
    done: List[LocalFile] = []
    pending: List[str] = []
    marker_mtime: Dict[str, Optional[int]] = {}

    def marker_of(d: str) -> Optional[int]:
        if d not in marker_mtime:
            try:
                marker_mtime[d] = os.stat(os.path.join(root, d, marker)).st_mtime_ns
            except OSError:
                marker_mtime[d] = None
        return marker_mtime[d]

    for f in files:
        if marker:
            parts = f.path.split("/")[:-1]
            dirs = ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]
            ok = False
            for d in dirs:
                m = marker_of(d)
                if m is not None:
                    ok = f.mtime_ns <= m or f.path.rsplit("/", 1)[-1] == marker
                    break
            if ok:
                done.append(f)
            else:
                pending.append(f.path)
        else:
            newest = max(f.mtime_ns, f.ctime_ns) / 1e9
            if now - newest >= settle:
                done.append(f)
            else:
                pending.append(f.path)
    return done, pending


def owner_fields(f: LocalFile) -> Dict[str, int]:
    """What a restore needs to give the file back to its owner (manifest fields uid, gid, mode)."""
    return {"uid": f.uid, "gid": f.gid, "mode": f.mode}


def entry_owner(e: dict) -> Tuple[Optional[Tuple[int, int]], Optional[int]]:
    """A validated manifest entry's ((uid, gid), mode); None for what it does not record (a manifest
    from before they were recorded): restore then uses the checkpoint dir's owner and mode 0644."""
    uid, gid = e.get("uid"), e.get("gid")
    return ((uid, gid) if isinstance(uid, int) and isinstance(gid, int) else None), e.get("mode")


def marker_groups(paths: List[str], marker: str) -> Dict[str, Optional[str]]:
    """Each path -> the directory whose marker covers it ("" for the checkpoint dir), or None. Pure.

    The nearest directory at or above the file's own that holds ``marker`` (the same rule as
    ``complete_files``), judged from the paths alone.
    """
    holders = {p.rpartition("/")[0] for p in paths if p.rpartition("/")[2] == marker}
    out: Dict[str, Optional[str]] = {}
    for p in paths:
        d: Optional[str] = p.rpartition("/")[0]
        while d is not None and d not in holders:
            d = None if d == "" else d.rpartition("/")[0]
        out[p] = d
    return out


def scan(root: str, root_fd: Optional[int] = None, refused: Optional[List[str]] = None) -> List[LocalFile]:
    """Every regular file below the checkpoint dir, walked relative to directory fds (``safefs``):
    symlinks (to files or directories), sockets and fifos are not checkpoint data and are never
    followed. A file with several hard links that the owner of its directory does not own (or in a
    directory others can write) is left out and named in ``refused``: it may be a root-only file
    linked in where fs.protected_hardlinks is off. Raises UnsafePath when ``root`` itself is a
    symlink a user could have made; FileNotFoundError when it is missing."""
    own = root_fd is None
    fd = safefs.open_root(root, what="checkpoint dir") if root_fd is None else root_fd
    out: List[LocalFile] = []
    try:
        for rel, dfd, _dirs, others in safefs.walk(fd):
            dst = os.fstat(dfd)
            shared = dst.st_mode & 0o022
            for name, st in others:
                if name.startswith(TEMP_PREFIX) or not statmod.S_ISREG(st.st_mode):
                    continue
                path = f"{rel}/{name}" if rel else name
                if st.st_nlink > 1 and (st.st_uid != dst.st_uid or shared):
                    if refused is not None:
                        refused.append(f"{path}: a hard link to a file owned by uid {st.st_uid}, not the directory's owner")
                    continue
                out.append(LocalFile(path, os.path.join(root, path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                                     st.st_dev, st.st_uid, st.st_gid, statmod.S_IMODE(st.st_mode)))
    finally:
        if own:
            os.close(fd)
    return out


STOPPED = "stopped: the drain's upload took over; nothing committed"


@dataclass
class _Selection:
    """What one upload commits: the files to send and the entries carried over unchanged."""

    todo: List[LocalFile] = field(default_factory=list)
    entries: Dict[str, dict] = field(default_factory=dict)  # path -> manifest entry
    incomplete: List[str] = field(default_factory=list)
    refused: List[str] = field(default_factory=list)


class _Send:
    """The bookkeeping of one upload's transfer phase, on the coordinating thread: the entries of the
    files that arrived, the files that changed while read, the errors, and the deadline rule."""

    def __init__(self, store: "CheckpointStore", res: CommitResult, entries: Dict[str, dict], need: int, rate: float,
                 deadline: Optional[float], stop: threading.Event) -> None:
        self.store = store
        self.res = res
        self.entries = entries
        self.need = need
        self.rate = rate  # the last upload's measured rate (bytes/s), 0 when none was measured yet
        self.deadline = deadline
        self.stop = stop
        self.errors: List[str] = []
        self.changed: List[str] = []
        self.t_start = time.monotonic()
        self._done = 0
        self._lock = threading.Lock()

    @property
    def done(self) -> int:
        with self._lock:
            return self._done

    def on_bytes(self, n: int) -> None:  # from the workers
        with self._lock:
            self._done += n

    def handle(self, out: Any) -> None:
        if isinstance(out, BaseException):
            self.errors.append(f"internal error: {out}")
        elif isinstance(out, UploadOutcome):
            if out.ok:
                f = out.file
                self.entries[f.path] = {"path": f.path, "size": f.size, "key": out.key[len(self.store.prefix):],
                                        "checksum": {"algorithm": self.store.transfer.checksum, "part_size": out.part_size, "parts": out.parts},
                                        "mtime_ns": f.mtime_ns, "ctime_ns": f.ctime_ns, "ino": f.ino, **owner_fields(f)}
                self.res.uploaded += 1
            elif out.changed and not self.stop.is_set():
                self.changed.append(out.file.path)  # busy (a log being appended): left out, the rest commits
            elif not self.stop.is_set():
                self.errors.append(out.error)

    def halted(self) -> bool:
        return self.stop.is_set() or bool(self.errors)

    def tick(self) -> None:
        """Stop when stopped from outside, or when what is left cannot arrive before the deadline."""
        if self.stop.is_set():
            if not self.errors:
                self.errors.append(STOPPED)
            return
        if self.deadline is None:
            return
        done = self.done
        remaining = self.need - done
        elapsed = time.monotonic() - self.t_start
        # A rate measured on a few bytes (a small file that happened to finish first) says
        # nothing: measure only once a part's worth has arrived.
        measured = elapsed > 0.5 and done >= min(self.need, self.store.transfer.part_size)
        r = done / elapsed if measured else self.rate
        left = self.deadline - time.time() - MANIFEST_RESERVE
        if left <= 0 or (r > 0 and remaining / r > left):
            if not self.errors:
                self.errors.append(f"deadline: stopped with {remaining} bytes not uploaded; nothing committed")
            self.stop.set()


class CheckpointStore:
    def __init__(self, s3: Any, ck: CheckpointSection, transfer: TransferSection, state_dir: str, name: str = "") -> None:
        self.s3 = s3
        self.ck = ck
        self.transfer = transfer
        self.bucket, self.prefix = split_s3_url(ck.s3)
        self.name = name or os.path.basename(os.path.normpath(ck.dir)) or ck.dir
        os.makedirs(os.path.join(state_dir, "checkpoints"), exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)
        self.state = StateStore(os.path.join(state_dir, "checkpoints", f"{safe}.json"))
        self._lock = threading.Lock()  # one upload at a time
        self._mu = threading.Lock()  # guards the two fields below
        self._running: Optional[threading.Event] = None  # the stop event of a preemptible upload holding _lock
        self._preempting = 0  # preempting uploads waiting for _lock: a new periodic one does not start
        # Manifest ids retention must keep beyond the newest `keep` (set by agent/transfer/gang.py).
        self.protected: Callable[[], Set[str]] = set
        self._logged_rejects: Dict[str, str] = {}

    # -- keys -------------------------------------------------------------------------------------
    def manifest_key(self, cid: str) -> str:
        return f"{self.prefix}manifests/{cid}.json"

    def data_key(self, cid: str, rel: str) -> str:
        return f"{self.prefix}data/{cid}/{rel}"

    def _list(self, prefix: str) -> List[str]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", ()))
        return out

    def committed_ids(self) -> List[str]:
        """Committed checkpoint ids, oldest first (our id format only)."""
        ids = []
        for key in self._list(f"{self.prefix}manifests/"):
            base = key[len(self.prefix) + len("manifests/"):]
            if base.endswith(".json") and ID_RE.match(base[:-5]):
                ids.append(base[:-5])
        return sorted(ids)

    def _read_manifest(self, cid: str) -> Optional[dict]:
        """The validated manifest of ``cid``, or None when it is missing or does not verify."""
        return self._load_manifest(cid)[0]

    def _load_manifest(self, cid: str) -> Tuple[Optional[dict], str]:
        """(validated manifest, "") or (None, why not). Never raises for what the object holds."""
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self.manifest_key(cid))
            length = int(obj.get("ContentLength") or 0)
            if length > MAX_MANIFEST_BYTES:
                obj["Body"].close()
                return None, f"manifest: {length} bytes; at most {MAX_MANIFEST_BYTES}"
            body = obj["Body"].read(MAX_MANIFEST_BYTES + 1)
        except ClientError as exc:
            return None, f"cannot read it: {exc.response.get('Error', {}).get('Code', exc)}"
        try:
            return parse_manifest(body, cid), ""
        except ManifestError as exc:
            return None, describe(exc)

    def _rejected(self, cid: str, reason: str) -> None:
        if self._logged_rejects.get(cid) != reason:  # once per manifest and reason, not every interval
            self._logged_rejects[cid] = reason
            log.warning("checkpoint %s: manifest %s does not verify, skipped: %s", self.name, self.manifest_key(cid), reason)

    def newest_verified(self) -> Tuple[Optional[dict], List[Dict[str, str]]]:
        """The newest manifest that verifies, and the newer ones skipped on the way ({"id", "reason"})."""
        skipped: List[Dict[str, str]] = []
        for cid in reversed(self.committed_ids()):
            doc, why = self._load_manifest(cid)
            if doc is not None:
                return doc, skipped
            self._rejected(cid, why)
            skipped.append({"id": cid, "reason": why})
        return None, skipped

    def latest(self) -> Optional[dict]:
        return self.newest_verified()[0]

    # -- upload + commit --------------------------------------------------------------------------
    def preempt(self) -> bool:
        """Stop the upload running now (a periodic or early one) so that the drain can take over.

        It stops between parts: queued parts are not started, parts in flight (at most
        ``transfer.concurrency``) finish in the background after the store is released, and nothing
        is committed. True when there was one to stop.
        """
        with self._mu:
            running = self._running
            if running is not None:
                running.set()
            return running is not None

    def upload(self, deadline: Optional[float] = None, reason: str = "", settled: bool = False,
               preempt: bool = False) -> CommitResult:
        """Upload what is complete and commit it.

        ``settled``: the workload has confirmed its checkpoint is written (the drain's wait step ended
        on its signal), so the settle time no longer applies; the ``marker`` rule still does, so a
        ``step-N/`` without its marker is never committed. ``preempt`` (the drain's final upload):
        stop a running upload of this store and take over, never waiting past ``deadline``. Without
        it, an upload with a deadline waits for a running one at most until that deadline.
        """
        t0 = time.monotonic()
        if preempt:
            with self._mu:
                self._preempting += 1
            self.preempt()
        try:
            wait = -1.0 if deadline is None else max(0.0, deadline - time.time() - MANIFEST_RESERVE)
            got = self._lock.acquire(timeout=wait)
        finally:
            if preempt:
                with self._mu:
                    self._preempting -= 1
        if not got:
            res = CommitResult(False, error="another upload of this checkpoint was still running at the deadline")
        else:
            stop = threading.Event()
            cleanup: List[Callable[[], None]] = []
            try:
                with self._mu:
                    if self._preempting and not preempt:
                        stop.set()  # the drain is waiting for the store: do not start
                    self._running = None if preempt else stop
                res = self._upload(deadline, reason, settled, stop, cleanup)
            finally:
                with self._mu:
                    self._running = None
                self._lock.release()
            for fn in cleanup:  # after the release: the drain does not wait for a stopped upload's parts
                try:
                    fn()
                except Exception:  # noqa: BLE001 - best effort; prune aborts leftovers later
                    log.debug("cleanup after a stopped upload failed", exc_info=True)
        res.seconds = time.monotonic() - t0
        if res.preempted:
            log.info("checkpoint %s: upload (%s) stopped, nothing committed: the drain's upload took over", self.name, reason or "-")
        metrics.CHECKPOINT_UPLOAD_BYTES.labels(checkpoint=self.name).inc(res.bytes)
        if res.committed:
            metrics.CHECKPOINT_LAST_COMMIT.labels(checkpoint=self.name).set(time.time())
        elif not res.preempted:
            metrics.CHECKPOINT_FAILURES.labels(checkpoint=self.name).inc()
        return res

    def _upload(self, deadline: Optional[float], reason: str, settled: bool, stop: threading.Event,
                cleanup: List[Callable[[], None]]) -> CommitResult:
        if stop.is_set():
            return CommitResult(False, error="stopped before it started: the drain's upload took over", preempted=True)
        try:
            checksums.new(self.transfer.checksum)
        except ValueError as exc:
            return CommitResult(False, error=str(exc))
        try:
            root_fd = safefs.open_root(self.ck.dir, what="checkpoint dir")
        except FileNotFoundError:
            return CommitResult(False, error=f"checkpoint dir {self.ck.dir} does not exist")
        except (OSError, safefs.UnsafePath) as exc:
            return CommitResult(False, error=str(exc) if isinstance(exc, safefs.UnsafePath) else f"checkpoint dir {self.ck.dir}: {exc.strerror}")
        try:
            return self._upload_from(root_fd, deadline, reason, settled, stop, cleanup)
        finally:
            os.close(root_fd)

    def _upload_from(self, root_fd: int, deadline: Optional[float], reason: str, settled: bool, stop: threading.Event,
                     cleanup: List[Callable[[], None]]) -> CommitResult:
        """Select what to send, send it, then commit: the three phases of one upload."""
        now = time.time()
        sel = self._select(root_fd, settled, now)
        if isinstance(sel, CommitResult):
            return sel
        cid = new_checkpoint_id(now)
        res = CommitResult(False, cid, incomplete=sel.incomplete, reused=len(sel.entries), refused=sel.refused)
        need = sum(f.size for f in sel.todo)
        rate = float(self.state.get("upload", {}).get("rate", 0.0))
        if deadline is not None and rate > 0 and time.time() + need / rate + MANIFEST_RESERVE > deadline:
            res.error = f"deadline: {need} bytes to upload need ~{need / rate:.1f}s at {rate / 1e6:.1f} MB/s, {deadline - time.time():.1f}s left"
            return res
        send = _Send(self, res, sel.entries, need, rate, deadline, stop)
        up = Uploader(self.s3, self.bucket, self.transfer.checksum, self.transfer.part_size, self.transfer.multipart_threshold,
                      Limiter(self.transfer.max_bandwidth, stop=stop), stop=stop, on_bytes=send.on_bytes, root_fd=root_fd)
        self._send(up, send, cid, sel.todo, cleanup)
        res.bytes = send.done
        if send.errors:
            res.error = send.errors[0] if len(send.errors) == 1 else f"{send.errors[0]} (and {len(send.errors) - 1} more)"
            return res
        elapsed = time.monotonic() - send.t_start
        if send.done >= 8 * 1024 * 1024 and elapsed > 0:
            self.state.update("upload", rate=send.done / elapsed)
        return self._seal(up, res, sel.entries, send.changed, sel.incomplete, now, reason, stop)

    def _select(self, root_fd: int, settled: bool, now: float) -> Union["_Selection", CommitResult]:
        """What this upload commits: complete files, split into those to send and those the previous
        manifest already holds unchanged (carried over as its entries); a CommitResult when nothing can."""
        refused: List[str] = []
        try:
            listed = scan(self.ck.dir, root_fd, refused)
        except (OSError, safefs.UnsafePath) as exc:
            return CommitResult(False, error=f"cannot list checkpoint dir {self.ck.dir}: {exc}")
        if settled and not self.ck.marker:
            files, incomplete = complete_files(self.ck.dir, listed, 0.0, "", now + 1.0)
        else:
            files, incomplete = complete_files(self.ck.dir, listed, 0.0 if settled else self.ck.settle, self.ck.marker, now)
        if not files:
            return CommitResult(False, error="nothing complete to upload" + (f" ({len(incomplete)} files still being written)" if incomplete else ""),
                                incomplete=incomplete, refused=refused)
        try:
            previous = self.latest()
        except Exception as exc:  # noqa: BLE001 - a listing failure means we cannot commit safely either
            return CommitResult(False, error=f"cannot list {self.ck.s3}: {exc}")
        prev = {e["path"]: e for e in (previous or {}).get("files", [])}
        sel = _Selection(incomplete=incomplete, refused=refused)
        for f in files:
            old = prev.get(f.path)
            if old and (old["size"], old["mtime_ns"], old["ctime_ns"], old["ino"]) == (f.size, f.mtime_ns, f.ctime_ns, f.ino) \
                    and old["checksum"]["algorithm"] == self.transfer.checksum:
                sel.entries[f.path] = dict(old, **owner_fields(f))  # an older manifest may lack them
            else:
                sel.todo.append(f)
        return sel

    def _send(self, up: Uploader, send: "_Send", cid: str, todo: List[LocalFile], cleanup: List[Callable[[], None]]) -> None:
        """Upload ``todo`` on the bounded pool; each part is one task. A preempted upload leaves its
        parts in flight to ``cleanup`` (run after the store is released), anything else waits for them."""
        loop = TaskLoop(self.transfer.concurrency, self.transfer.concurrency * 2, "checkpoint", send.handle,
                        tick=send.tick, halted=send.halted)

        def tasks() -> Iterator[Callable[[], Any]]:
            for f in todo:
                job = up.plan(f, self.data_key(cid, f.path))
                for i in range(len(job.ranges)):
                    yield functools.partial(up.run_part, job, i)

        def finish() -> None:
            loop.close()
            up.close()
            if send.errors:
                up.abort_all()

        try:
            if not loop.run(tasks()):
                send.tick()  # names why it halted (a stop seen only now, the deadline)
        except Exception as exc:  # noqa: BLE001
            send.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if send.errors:
                send.stop.set()
            if send.errors == [STOPPED]:
                send.res.preempted = True
                cleanup.append(finish)  # parts in flight end after the store is released
            else:
                finish()

    def _seal(self, up: Uploader, res: CommitResult, entries: Dict[str, dict], changed: List[str], incomplete: List[str],
              now: float, reason: str, stop: threading.Event) -> CommitResult:
        """Everything is in S3: leave out what changed, then commit by writing the manifest, last."""
        cid = res.checkpoint_id
        left_out = self._leave_out(changed, entries)
        res.changed = sorted(changed)
        res.incomplete = sorted(set(incomplete) | left_out)
        if not entries:
            res.error = f"nothing committed: {len(changed)} file(s) changed while they were uploaded"
            return res
        if left_out:
            log.warning("checkpoint %s: %d file(s) changed while they were uploaded and are left out of %s: %s",
                        self.name, len(left_out), cid, ", ".join(sorted(left_out)[:5]))
        doc = {"format": FORMAT, "id": cid, "created": now, "reason": reason, "host": socket.gethostname(),
               "source_dir": self.ck.dir, "files": [entries[p] for p in sorted(entries)],
               "total_bytes": sum(e["size"] for e in entries.values()), "incomplete": res.incomplete}
        try:
            validate_manifest(doc, cid)  # never commit what a restore would refuse
        except ManifestError as exc:
            res.error = f"not committed: the manifest would not verify: {exc}"
            return res
        body = json.dumps(doc, indent=1, sort_keys=True).encode()
        if stop.is_set():
            res.error, res.preempted = STOPPED, True
            return res
        err = self._commit(up, cid, body)
        if err:
            res.error = err
            return res
        res.committed = True
        res.files = len(doc["files"])
        res.manifest_key = self.manifest_key(cid)
        self.state.update("last_commit", id=cid, at=time.time(), files=res.files)
        try:
            self.prune()
        except Exception:  # noqa: BLE001 - retention is best effort; the commit stands
            pass
        return res

    def _leave_out(self, changed: List[str], entries: Dict[str, dict]) -> set:
        """Drop what must not be committed because ``changed`` files are missing from it.

        Without a marker each file stands alone. With one, a checkpoint directory is all or nothing:
        a ``step-N/`` whose marker was uploaded but one of whose files changed would restore as a
        complete-looking, torn checkpoint, so every file that marker covers is left out with it.
        """
        out = set(changed)
        if self.ck.marker and changed:
            groups = marker_groups(list(entries) + changed, self.ck.marker)
            torn = {groups[p] for p in changed if groups.get(p) is not None}
            for p in list(entries):
                if groups.get(p) in torn:
                    out.add(p)
                    del entries[p]
        return out

    def _commit(self, up: Uploader, cid: str, body: bytes) -> str:
        """Write the manifest only if no object has its key (If-None-Match: *); "" when committed.

        Two writers can then never commit the same id, and an instance that lost its turn (a zombie
        after a takeover) cannot overwrite a commit. A retry of our own PUT that had in fact landed
        also answers 412: that one is recognised by its body and counts as committed.
        """
        key = self.manifest_key(cid)
        try:
            up.put_bytes(key, body, IfNoneMatch="*", ContentType="application/json", ChecksumSHA256=checksums.of_bytes("sha256", body))
            return ""
        except ClientError as exc:
            if not precondition_failed(exc):
                return f"manifest write failed, not committed: {exc}"
        except Exception as exc:  # noqa: BLE001
            return f"manifest write failed, not committed: {exc}"
        try:
            theirs = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read(len(body) + 1)
        except Exception:  # noqa: BLE001
            theirs = b""
        if theirs == body:
            return ""
        log.error("checkpoint %s: %s already exists (written by another writer); this upload is not committed", self.name, key)
        return (f"not committed: {key} already exists (PreconditionFailed: another writer committed this id); "
                "the existing manifest was left as it is")

    # -- restore ----------------------------------------------------------------------------------
    def restore(self) -> RestoreResult:
        """Restore the newest committed checkpoint whose manifest verifies.

        A newer manifest that does not verify (corrupt, truncated, hostile) is skipped with a warning
        and counted; the result lists it in ``rejected`` and the restore falls back to the next one.
        """
        doc, rejected = self.newest_verified()
        if doc is None:
            if rejected:
                metrics.CHECKPOINT_RESTORE_FALLBACKS.labels(checkpoint=self.name).inc()
                log.error("checkpoint %s: none of the %d manifests under %s verifies; nothing restored",
                          self.name, len(rejected), self.ck.s3)
                return RestoreResult(False, error=f"no committed checkpoint under {self.ck.s3} verifies "
                                     f"(newest {rejected[0]['id']}: {rejected[0]['reason']})", rejected=rejected)
            return RestoreResult(False, error=f"no committed checkpoint under {self.ck.s3}")
        if rejected:
            metrics.CHECKPOINT_RESTORE_FALLBACKS.labels(checkpoint=self.name).inc()
            log.warning("checkpoint %s: restoring %s, an older checkpoint: %d newer manifest(s) did not verify (newest %s: %s)",
                        self.name, doc["id"], len(rejected), rejected[0]["id"], rejected[0]["reason"])
        res = self.restore_doc(doc)
        res.rejected = rejected
        return res

    def restore_doc(self, doc: dict) -> RestoreResult:
        """Restore the files of one committed manifest (a gang restores its shard at a chosen step)."""
        t0 = time.monotonic()
        res = RestoreResult(False, doc["id"])
        # A checkpoint dir that restore has to create belongs to the (first) file owner it records.
        first = next((o for o, _m in map(entry_owner, doc["files"]) if o is not None), None)
        try:
            root_fd = safefs.open_root(self.ck.dir, create=True, owner=first, what="checkpoint dir")
        except (OSError, safefs.UnsafePath) as exc:
            res.error = str(exc) if isinstance(exc, safefs.UnsafePath) else f"checkpoint dir {self.ck.dir}: {exc.strerror}"
            res.error_messages.append(res.error)
            res.seconds = time.monotonic() - t0
            return res
        try:
            return self._restore_into(root_fd, doc, res, t0)
        finally:
            os.close(root_fd)

    def _restore_into(self, root_fd: int, doc: dict, res: RestoreResult, t0: float) -> RestoreResult:
        stop = threading.Event()
        dl = Downloader(self.s3, self.bucket, self.ck.dir, Limiter(self.transfer.max_bandwidth, stop=stop),
                        self.transfer.part_size, self.transfer.multipart_threshold, stop=stop,
                        fast=FastGetter.create(self.s3, self.transfer.concurrency + 4) if self.transfer.engine == "auto" else None,
                        root_fd=root_fd, inherit_owner=True)

        def handle(out: Any) -> None:
            if isinstance(out, FileOutcome):
                if out.ok:
                    if out.adopted:
                        res.skipped += 1
                    else:
                        res.files += 1
                        res.bytes += out.item.size
                else:
                    res.error_messages.append(out.error)
            elif isinstance(out, BaseException):
                res.error_messages.append(f"internal error: {out}")

        loop = TaskLoop(self.transfer.concurrency, self.transfer.concurrency * 2, "restore", handle)

        def tasks() -> Iterator[Callable[[], Any]]:
            for e in doc["files"]:
                verdict = key_to_relpath(e.get("path", ""), "")
                cs = e.get("checksum") or {}
                if verdict.path is None or verdict.path != e.get("path") or not str(e.get("key", "")).startswith("data/"):
                    res.error_messages.append(f"manifest entry {e.get('path')!r} refused: {verdict.reason or 'bad key'}")
                    continue
                owner, mode = entry_owner(e)
                try:
                    item = Download(self.prefix + e["key"], verdict.path, int(e["size"]), "", True, "restore")
                    job = dl.job(item, int(cs.get("part_size") or 0), list(cs.get("parts") or []), cs.get("algorithm", "sha256"), owner, mode)
                except (KeyError, ValueError, TypeError) as exc:
                    res.error_messages.append(f"manifest entry {e.get('path')!r} refused: {exc}")
                    continue
                for i in range(len(job.chunks)):
                    yield functools.partial(dl.run_chunk, job, i)

        try:
            loop.run(tasks())
        finally:
            loop.close()
        res.seconds = time.monotonic() - t0
        if res.error_messages:
            res.error = res.error_messages[0] + (f" (and {len(res.error_messages) - 1} more)" if len(res.error_messages) > 1 else "")
        else:
            res.restored = True
        return res

    # -- retention --------------------------------------------------------------------------------
    def prune(self) -> List[str]:
        ids = self.committed_ids()
        if len(ids) <= self.ck.keep:
            kept, dropped = ids, []
        else:
            kept, dropped = ids[-self.ck.keep:], ids[: -self.ck.keep]
        protected = self.protected() if dropped else set()  # a gang's complete steps need their shard's manifest
        if protected:
            kept = sorted(set(kept) | (set(dropped) & protected))
            dropped = [c for c in dropped if c not in protected]
        if not kept:
            return []
        referenced = set()
        for cid in kept:
            doc = self._read_manifest(cid)
            if doc is None:
                return []  # cannot tell what a kept checkpoint needs: delete nothing
            referenced.update(self.prefix + e["key"] for e in doc["files"])
        newest = kept[-1]
        doomed = [self.manifest_key(c) for c in dropped]
        for key in self._list(f"{self.prefix}data/"):
            cid = key[len(self.prefix) + 5:].split("/", 1)[0]
            # Only our layout, never what a kept manifest uses, never a newer upload still in flight.
            if ID_RE.match(cid) and cid < newest and key not in referenced:
                doomed.append(key)
        deleted: List[str] = []
        for i in range(0, len(doomed), 1000):
            batch = doomed[i:i + 1000]
            resp = self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            failed = {e["Key"] for e in resp.get("Errors", [])}
            deleted.extend(k for k in batch if k not in failed)
        try:
            ups = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix=f"{self.prefix}data/").get("Uploads", [])
            for u in ups:
                cid = u["Key"][len(self.prefix) + 5:].split("/", 1)[0]
                if ID_RE.match(cid) and cid < newest:
                    self.s3.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
        except Exception:  # noqa: BLE001 - best effort
            pass
        return deleted
