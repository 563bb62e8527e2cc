"""The files between the agent (root) and the job (not root): the notice, the env file, the acks.

- ``notice.json``: written atomically (a temporary file in the same directory, then rename) by root
  in a root-owned directory that no one else can write, mode 0644 so the job can read it. It
  appears when the job is told of a notice and disappears when the notice is cancelled.
- ``workload.env``: the profile's environment for the workload unit (``EnvironmentFile=``), written
  at start, before any notice, the same way.
- ``ack/``: the one place the job writes. Root-owned, mode 1733 (anyone may create a file, no one
  may list it or remove another's file). The helper writes ``ack-<uid>.json``; the agent treats it
  as hostile: opened with O_NOFOLLOW|O_NONBLOCK relative to the directory's fd, a regular file of at
  most 4 KiB owned by the uid in its name (and by the workload's own uid when that is known), strict
  JSON with typed fields, and only for the notice it answers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

FORMAT = 1
MAX_ACK = 4096
ACK_NAME = re.compile(r"^ack-(\d{1,10})(?:-\d{1,10})?\.json$")


@dataclass
class Ack:
    path: str
    notice: str
    time: float
    pid: int
    uid: int
    step: Optional[int] = None


def notice_document(kind: str, action: str, key: str, deadline: Optional[float], now: float, terminal: bool,
                    save_by: Optional[float], checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """What the job reads: pure, so its shape is unit-tested."""
    left = None if deadline is None else round(max(0.0, deadline - now), 3)
    return {"format": FORMAT, "kind": kind, "action": action, "key": key, "terminal": terminal,
            "deadline": deadline,
            "deadline_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline)) if deadline is not None else None,
            "seconds_left": left, "published_at": now, "save_by": save_by, "checkpoint": checkpoint}


def parse_ack(raw: bytes, uid: int) -> Tuple[Optional[Ack], str]:
    """(the ack, "") or (None, why it was refused). Every field typed and bounded."""
    if len(raw) > MAX_ACK:
        return None, f"larger than {MAX_ACK} bytes"
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "not UTF-8 JSON"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None, f"not a format-{FORMAT} JSON object"
    path, notice, when, pid, step = (data.get("path"), data.get("notice", ""), data.get("time"), data.get("pid"),
                                     data.get("step"))
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > 1024:
        return None, "path must be an absolute path"
    if not isinstance(notice, str) or len(notice) > 256:
        return None, "notice must be a short string"
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        return None, "time must be a finite number"
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None, "pid must be a positive integer"
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        return None, "step must be a non-negative integer"
    return Ack(os.path.normpath(path), notice, float(when), pid, uid, step), ""


def _safe_dir(path: str) -> Optional[str]:
    """Why ``path`` is not a directory only root can change, or None."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != 0 and os.geteuid() == 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    return None


class JobChannel:
    def __init__(self, notice_file: str, ack_dir: str, env_file: str) -> None:
        self.notice_file = notice_file
        self.ack_dir = ack_dir
        self.env_file = env_file
        self.current: Optional[Dict[str, Any]] = None
        self.refused: List[str] = []  # why acks were refused, for the wait step's reason

    # -- preparation --------------------------------------------------------------------------------
    def prepare(self, env_text: str) -> List[str]:
        """Directories, the env file and an empty ack dir; before any notice. Problems are returned
        (and logged) but never raised: the drain works without them."""
        problems = []
        for directory in sorted({os.path.dirname(self.notice_file), os.path.dirname(self.env_file)}):
            why = self._ensure_dir(directory, 0o755, chmod=False)
            if why:
                problems.append(why)
        why = self._ensure_dir(self.ack_dir, 0o1733)
        if why:
            problems.append(why)
        else:
            self.clear_acks()
        if not problems or not any(p.startswith(os.path.dirname(self.env_file)) for p in problems):
            try:
                self._write(self.env_file, env_text.encode())
            except OSError as exc:
                problems.append(f"env file {self.env_file}: {exc.strerror or exc}")
        for p in problems:
            log.warning("workload channel: %s", p)
        return problems

    def _ensure_dir(self, path: str, mode: int, chmod: bool = True) -> Optional[str]:
        """Create ``path``, or check the one there: root's, and (unless we own its mode) writable by
        no one else."""
        created = False
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            os.mkdir(path, mode & 0o777)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            return f"{path}: {exc.strerror or exc}"
        why = _safe_dir(path)
        if why:
            return why
        if not chmod and not created:
            if os.lstat(path).st_mode & 0o022:
                return f"{path} is writable by group or others: the job could replace what the agent writes there"
            return None
        try:  # chmod what we checked: the directory itself, opened without following a link
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        except OSError as exc:
            return f"{path}: chmod: {exc.strerror or exc}"
        return None

    def _write(self, path: str, data: bytes) -> None:
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise

    # -- the notice ---------------------------------------------------------------------------------
    def publish(self, doc: Dict[str, Any]) -> Optional[str]:
        """Write notice.json; the error, if any (the signal still goes out)."""
        directory = os.path.dirname(self.notice_file)
        why = _safe_dir(directory) or (f"{directory} is writable by group or others"
                                       if os.lstat(directory).st_mode & 0o022 else None)
        if why:
            return f"notice file: {why}"
        try:
            self._write(self.notice_file, json.dumps(doc, sort_keys=True).encode() + b"\n")
        except OSError as exc:
            return f"notice file {self.notice_file}: {exc.strerror or exc}"
        self.current = doc
        return None

    def withdraw(self) -> None:
        self.current = None
        try:
            os.unlink(self.notice_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.notice_file, exc)

    # -- acknowledgements ---------------------------------------------------------------------------
    def _open_ack_dir(self) -> Optional[int]:
        try:
            return os.open(self.ack_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return None

    def clear_acks(self) -> None:
        """Remove acks left from an earlier notice (by name, inside the directory: a symlink is
        removed itself, never followed)."""
        fd = self._open_ack_dir()
        if fd is None:
            return
        try:
            for name in os.listdir(fd):
                if ACK_NAME.match(name) or name.startswith(".ack-"):
                    try:
                        os.unlink(name, dir_fd=fd)
                    except OSError:
                        pass
        finally:
            os.close(fd)

    def acks(self, notice_key: str, since: float, job_uid: Optional[int] = None) -> List[Ack]:
        """Valid acknowledgements of ``notice_key`` (or, with no key in them, written after ``since``)."""
        fd = self._open_ack_dir()
        if fd is None:
            return []
        out: List[Ack] = []
        try:
            names = sorted(os.listdir(fd))[:64]
            for name in names:
                m = ACK_NAME.match(name)
                if not m:
                    continue
                ack, why = self._read_ack(fd, name, int(m.group(1)), job_uid)
                if ack is None:
                    if why and why not in self.refused:
                        self.refused.append(why)
                    continue
                if ack.notice == notice_key or (not ack.notice and ack.time >= since - 1.0):
                    out.append(ack)
        finally:
            os.close(fd)
        return out

    def _read_ack(self, dir_fd: int, name: str, name_uid: int, job_uid: Optional[int]) -> Tuple[Optional[Ack], str]:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
        except OSError as exc:
            return None, f"{name}: cannot open ({exc.strerror})"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None, f"{name}: not a regular file"
            if st.st_uid != name_uid:
                return None, f"{name}: owned by uid {st.st_uid}, not {name_uid}"
            if job_uid is not None and st.st_uid not in (0, job_uid):
                return None, f"{name}: owned by uid {st.st_uid}, not the workload's uid {job_uid}"
            if st.st_size > MAX_ACK:
                return None, f"{name}: larger than {MAX_ACK} bytes"
            raw = os.read(fd, MAX_ACK + 1)
        finally:
            os.close(fd)
        ack, why = parse_ack(raw, st.st_uid)
        return ack, (f"{name}: {why}" if why else "")
