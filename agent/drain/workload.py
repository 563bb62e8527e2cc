"""Tell the workload to checkpoint, then wait until it has.

Telling: the notice file (``notice.json``, for jobs that poll), a signal to a systemd unit
(``systemctl kill``) or to the process named by a pidfile (its main process, or with ``kill_whom =
"all"`` every process of the unit or of the pidfile's process tree at the same moment), the hook
commands, and an HTTP webhook retried until it answers 2xx or the notify budget ends. Each channel's
failure is reported and never stops the others, nor the drain. Which signal to whom comes from the
profile (``agent.drain.profiles``) unless the config says otherwise.

Waiting: the configured conditions (hooks exited, the process exited, the marker file appeared after
the notice, a step directory committed, the job's helper acknowledged) must all hold, or with
``complete_mode = "any"`` one of them, or the budget runs out. A workload that ignores us costs its
wait budget, never the persistence that follows.
"""

from __future__ import annotations

import json
import logging
import os
import signal as _signal
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import psutil
import requests

from agent.config import HookSection, WorkloadSection
from agent.drain import profiles
from agent.drain.jobchannel import JobChannel, notice_document
from agent.events import TERMINAL_KINDS, Event
from agent.hooks import HookResult, matching, run_hooks
from agent.runner import Runner

log = logging.getLogger(__name__)

POLL = 0.02


@dataclass
class NotifyResult:
    done: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    pid: Optional[int] = None  # the process whose exit means "checkpoint written"


@dataclass
class WaitResult:
    met: bool
    pending: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    checkpoint: str = ""  # the step directory committed, or the path the job acknowledged


def signal_number(name: str) -> int:
    return int(getattr(_signal, name if name.startswith("SIG") else f"SIG{name}"))


def read_pidfile(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            pid = int(fh.read().split()[0])
        return pid if pid > 1 else None
    except (OSError, ValueError, IndexError):
        return None


def _uid_of(pid: int) -> Optional[int]:
    try:
        return int(psutil.Process(pid).uids().real)
    except psutil.Error:
        return None


def alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


MAX_STEP_DIRS = 4096  # entries of commit_dir looked at; a job-writable dir may hold anything
MAX_STEP_FILES = 65536


def _newest_change(dir_fd: int, depth: int, budget: List[int]) -> Optional[float]:
    """Newest mtime/ctime of the directory and everything under it (never following a link)."""
    st = os.fstat(dir_fd)
    newest = max(st.st_mtime, st.st_ctime)
    for entry in os.scandir(dir_fd):
        budget[0] -= 1
        if budget[0] < 0:
            return None
        est = entry.stat(follow_symlinks=False)
        newest = max(newest, est.st_mtime, est.st_ctime)
        if stat.S_ISDIR(est.st_mode) and depth > 0:
            try:
                sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                inner = _newest_change(sub, depth - 1, budget)
            finally:
                os.close(sub)
            if inner is None:
                return None
            newest = max(newest, inner)
    return newest


def committed_step(commit_dir: str, commit_file: str, incomplete_file: str, since: float, settle: float,
                   now: float, before: Optional[Dict[str, int]] = None) -> Tuple[Optional[str], str]:
    """(the newest step directory committed after ``since`` whose files stopped changing ``settle``
    seconds ago, "") or (None, what is still missing). ``commit_dir`` itself counts as a step too.
    ``before``: the commits seen when the job was told (path -> commit file mtime_ns); those are
    not new, however close to the notice they were written.

    The directory is the job's: entries are opened relative to directory fds with O_NOFOLLOW, a
    symlinked step or commit file never counts, and the scan is bounded."""
    try:
        top = os.open(commit_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        return None, f"{commit_dir}: {exc.strerror}"
    waiting = ""
    best: Optional[Tuple[float, str]] = None
    try:
        names: List[Optional[str]] = [None]
        for i, entry in enumerate(os.scandir(top)):
            if i >= MAX_STEP_DIRS:
                break
            if entry.is_dir(follow_symlinks=False):
                names.append(entry.name)
        for name in names:
            try:
                fd = top if name is None else os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
            except OSError:
                continue
            try:
                try:
                    cst = os.stat(commit_file, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(cst.st_mode) or cst.st_mtime < since - 1.0:
                    continue  # no commit, a link, or a step committed before the notice
                path = commit_dir if name is None else os.path.join(commit_dir, name)
                if before is not None and before.get(path) == cst.st_mtime_ns:
                    continue  # there already when the job was told
                if incomplete_file:
                    try:
                        os.stat(incomplete_file, dir_fd=fd, follow_symlinks=False)
                        waiting = f"{path} still holds {incomplete_file}"
                        continue
                    except OSError:
                        pass
                newest = _newest_change(fd, 0 if name is None else 2, [MAX_STEP_FILES])
                if newest is None:
                    waiting = f"{path}: too many files"
                    continue
                if now - newest < settle:
                    waiting = f"{path} committed, files changed {now - newest:.1f} s ago"
                    continue
                if best is None or cst.st_mtime > best[0]:
                    best = (cst.st_mtime, path)
            finally:
                if fd != top:
                    os.close(fd)
    finally:
        os.close(top)
    if best is not None:
        return best[1], ""
    return None, waiting or f"no step in {commit_dir} committed with {commit_file} since the notice"


def existing_commits(commit_dir: str, commit_file: str) -> Dict[str, int]:
    """The steps committed now (path -> the commit file's mtime_ns), recorded when the job is told."""
    out: Dict[str, int] = {}
    try:
        top = os.open(commit_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return out
    try:
        names = [None] + [e.name for i, e in zip(range(MAX_STEP_DIRS), os.scandir(top)) if e.is_dir(follow_symlinks=False)]
        for name in names:
            rel = commit_file if name is None else os.path.join(name, commit_file)
            try:
                st = os.stat(rel, dir_fd=top, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[commit_dir if name is None else os.path.join(commit_dir, name)] = st.st_mtime_ns
    finally:
        os.close(top)
    return out


def process_tree(pid: int) -> List[int]:
    """The process and its descendants, collected before any is signalled (the "same moment")."""
    try:
        proc = psutil.Process(pid)
        return [pid] + [c.pid for c in proc.children(recursive=True)]
    except psutil.Error:
        return [pid]


class Workload:
    def __init__(self, section: WorkloadSection, hooks: List[HookSection], runner: Runner,
                 session: Optional[requests.Session] = None, *, socket_path: str = "/run/spot-agent/agent.sock",
                 checkpoint_dirs: Sequence[str] = ()) -> None:
        self.section = section
        self.hooks = hooks
        self.runner = runner
        self.session = session or requests.Session()
        self._hook_thread: Optional[threading.Thread] = None
        self.hook_results: List[HookResult] = []
        self.checkpoint_dirs = [os.path.normpath(d) for d in checkpoint_dirs]
        self.resolved = profiles.resolve(section, socket_path=socket_path, checkpoint_dirs=checkpoint_dirs,
                                         has_hooks=bool(hooks))
        r = self.resolved
        self.channel = JobChannel(r.notice_file, r.ack_dir, r.env_file)
        self._notice_key = ""
        self._job_uid: Optional[int] = None
        self._commits_before: Optional[Dict[str, int]] = None  # None after a restart: the mtime rule alone

    def prepare(self) -> List[str]:
        """Before any notice: the env file for the unit, the notice and ack directories."""
        return self.channel.prepare(profiles.render_env(self.resolved.env))

    def conditions(self, event_kind: str) -> List[str]:
        has_hooks = bool(matching(self.hooks, event_kind))
        return profiles.conditions(self.section, has_hooks, self.resolved.commit_dir, self.resolved.commit_file)[0]

    def notice_for(self, event: Event, deadline: Optional[float], save_by: Optional[float], now: float,
                   terminal: Optional[bool] = None) -> Dict[str, Any]:
        r = self.resolved
        terminal = event.kind in TERMINAL_KINDS if terminal is None else terminal
        return notice_document(event.kind, event.action, event.key, deadline, now, terminal,
                               save_by, {"dir": r.commit_dir, "commit_file": r.commit_file, "profile": r.profile,
                                         "complete": self.conditions(event.kind), "mode": r.mode,
                                         "ack_dir": r.ack_dir})

    def publish(self, event: Event, deadline: Optional[float], save_by: Optional[float] = None,
                terminal: Optional[bool] = None) -> Optional[str]:
        """The notice file for ``event``; acks left from an earlier notice are cleared first.
        ``terminal``: the job is to checkpoint and stop (a drain's notify step says so for any kind)."""
        if event.key != self._notice_key:
            self.channel.clear_acks()
        self._notice_key = event.key
        return self.channel.publish(self.notice_for(event, deadline, save_by, time.time(), terminal))

    def withdraw(self) -> None:
        self._notice_key = ""
        self.channel.withdraw()

    # -- notify -------------------------------------------------------------------------------------
    def notify(self, event: Event, budget: float, hooks_budget: float, body: Dict[str, Any],
               with_hooks: bool = True) -> NotifyResult:
        """``with_hooks`` False: the caller runs the hooks itself (the supervisor does for a rebalance)."""
        started = time.monotonic()
        out = NotifyResult()
        wl = self.section
        r = self.resolved
        if r.commit_dir and r.commit_file:  # what is committed now is not the answer to this notice
            self._commits_before = existing_commits(r.commit_dir, r.commit_file)
        # the file first: a job that reacts to the signal can read the deadline at once
        deadline = body.get("deadline") if isinstance(body.get("deadline"), (int, float)) else event.deadline
        why = self.publish(event, deadline, time.time() + max(0.0, hooks_budget), terminal=True)
        if why:
            out.errors.append(why)
        else:
            out.done.append(f"notice in {self.resolved.notice_file}")
        if with_hooks and matching(self.hooks, event.kind):
            self._start_hooks(event, hooks_budget)
            out.done.append(f"started {len(matching(self.hooks, event.kind))} hook(s)")
        if wl.unit:
            self._signal_unit(out)
        if wl.pidfile:
            self._signal_pidfile(out)
        if wl.webhook is not None:
            left = budget - (time.monotonic() - started)
            self._webhook(body, left, out)
        return out

    def _start_hooks(self, event: Event, budget: float) -> None:
        def go() -> None:
            self.hook_results = run_hooks(self.hooks, event, budget)

        self._hook_thread = threading.Thread(target=go, name="drain-hooks", daemon=True)
        self._hook_thread.start()

    def _signal_unit(self, out: NotifyResult) -> None:
        wl, r = self.section, self.resolved
        show = self.runner.run(["systemctl", "show", "-p", "MainPID", "--value", wl.unit], timeout=5, check=False)
        if show.ok and show.stdout.strip().isdigit() and int(show.stdout.strip()) > 0:
            out.pid = int(show.stdout.strip())
            self._job_uid = _uid_of(out.pid)
        res = self.runner.run(["systemctl", "kill", f"--signal={r.signal}", f"--kill-whom={r.kill_whom}", wl.unit],
                              timeout=5, check=False)
        if res.ok:
            out.done.append(f"sent {r.signal} to {wl.unit} ({r.kill_whom})")
        else:
            out.errors.append(f"signal {wl.unit}: {res.error_line()}")

    def _signal_pidfile(self, out: NotifyResult) -> None:
        wl, r = self.section, self.resolved
        pid = read_pidfile(wl.pidfile)
        if pid is None:
            out.errors.append(f"pidfile {wl.pidfile}: no readable pid")
            return
        targets = process_tree(pid) if r.kill_whom == "all" else [pid]
        sent = 0
        for target in targets:
            try:
                os.kill(target, signal_number(r.signal))
                sent += 1
            except ProcessLookupError:
                if target == pid:
                    out.errors.append(f"pidfile {wl.pidfile}: pid {pid} is not running")
                    return
            except PermissionError:
                if target == pid:
                    out.errors.append(f"pidfile {wl.pidfile}: not allowed to signal pid {pid}")
                    return
        out.pid = out.pid or pid
        self._job_uid = self._job_uid if self._job_uid is not None else _uid_of(pid)
        out.done.append(f"sent {r.signal} to pid {pid}" + (f" and {sent - 1} descendant(s)" if len(targets) > 1 else ""))

    def _webhook(self, body: Dict[str, Any], budget: float, out: NotifyResult) -> None:
        hook = self.section.webhook
        assert hook is not None
        deadline = time.monotonic() + max(0.0, budget)
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **hook.headers}
        attempt, delay, last = 0, 0.1, ""
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                resp = self.session.post(hook.url, data=data, headers=headers, timeout=min(hook.timeout, left))
                if 200 <= resp.status_code < 300:
                    out.done.append(f"webhook answered {resp.status_code} (attempt {attempt})")
                    return
                last = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            left = deadline - time.monotonic()
            if left <= delay:
                break
            time.sleep(delay)
            delay = min(1.0, delay * 2)
        out.errors.append(f"webhook {hook.url}: gave up after {attempt} attempt(s): {last or 'no time'}")

    # -- wait ---------------------------------------------------------------------------------------
    def wait(self, conditions: List[str], budget: float, since: float, pid: Optional[int],
             mode: Optional[str] = None) -> WaitResult:
        """Wait until every condition holds (``mode`` "any": one of them); ``since`` (epoch) is when
        the workload was told."""
        mode = mode or self.resolved.mode
        deadline = time.monotonic() + max(0.0, budget)
        notes: List[str] = []
        pending = list(conditions)
        if "hooks" in pending and self._hook_thread is None:
            pending.remove("hooks")
            notes.append("the hooks were not started by this drain (earlier process, or the supervisor): not awaited")
        if "process" in pending and pid is None:
            pending.remove("process")
            notes.append("no process to wait for")
        if self._job_uid is None and pid is not None:
            self._job_uid = _uid_of(pid)
        if mode == "any" and not pending and conditions:
            return WaitResult(False, [], notes + ["none of the conditions can hold"])
        checkpoint, waiting = "", ""
        met: List[str] = []
        while True:
            for cond in list(pending):
                done = False
                if cond == "hooks" and self._hook_thread is not None and not self._hook_thread.is_alive():
                    done = True
                elif cond == "process" and pid is not None and not alive(pid):
                    done = True
                elif cond == "marker" and self._marker_since(since):
                    done = True
                elif cond == "commit":
                    path, waiting = self._commit_since(since)
                    if path:
                        done, checkpoint = True, path
                elif cond == "ack":
                    acks = self.channel.acks(self._notice_key, since, self._job_uid)
                    if acks:
                        done, checkpoint = True, checkpoint or acks[-1].path
                if done:
                    pending.remove(cond)
                    met.append(cond)
            if not pending or (mode == "any" and met):
                if checkpoint:
                    notes.append(f"checkpoint {checkpoint}" + self._outside(checkpoint))
                if mode == "any":
                    notes.insert(0, f"{met[0]} done")
                return WaitResult(True, [], notes, checkpoint)
            if time.monotonic() >= deadline:
                if waiting and "commit" in pending:
                    notes.append(waiting)
                notes.extend(f"ack refused: {why}" for why in self.channel.refused[:3])
                return WaitResult(False, pending, notes)
            time.sleep(min(POLL * 5 if "commit" in pending else POLL, max(0.0, deadline - time.monotonic())))

    def _outside(self, path: str) -> str:
        """A note when the acknowledged checkpoint is not under a directory the agent uploads."""
        roots = [d for d in [self.resolved.commit_dir, *self.checkpoint_dirs] if d]
        if not roots or any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
            return ""
        return " (outside the checkpoint dirs: only a snapshot of its volume keeps it)"

    def _commit_since(self, since: float) -> Tuple[Optional[str], str]:
        r = self.resolved
        return committed_step(r.commit_dir, r.commit_file, r.incomplete_file, since, r.commit_settle, time.time(),
                              self._commits_before)

    def _marker_since(self, since: float) -> bool:
        try:
            # 1 s of slack: coarse mtime granularity on some filesystems
            return os.stat(self.section.marker).st_mtime >= since - 1.0
        except OSError:
            return False

    def join_hooks(self, timeout: float) -> None:
        if self._hook_thread is not None:
            self._hook_thread.join(timeout)
