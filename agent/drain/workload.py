"""Tell the workload to checkpoint, then wait until it has.

Telling: a signal to a systemd unit (``systemctl kill``) or to the process named by a pidfile, the hook
commands, and an HTTP webhook retried until it answers 2xx or the notify budget ends. Each channel's
failure is reported and never stops the others, nor the drain.

Waiting: every configured condition must hold (hooks exited, the process exited, the marker file
appeared after the notice) or the budget runs out. A workload that ignores us costs its wait budget,
never the persistence that follows.
"""

from __future__ import annotations

import json
import logging
import os
import signal as _signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import psutil
import requests

from agent.config import HookSection, WorkloadSection
from agent.events import Event
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


def signal_number(name: str) -> int:
    return int(getattr(_signal, name if name.startswith("SIG") else f"SIG{name}"))


def read_pidfile(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            pid = int(fh.read().split()[0])
        return pid if pid > 1 else None
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Workload:
    def __init__(self, section: WorkloadSection, hooks: List[HookSection], runner: Runner,
                 session: Optional[requests.Session] = None) -> None:
        self.section = section
        self.hooks = hooks
        self.runner = runner
        self.session = session or requests.Session()
        self._hook_thread: Optional[threading.Thread] = None
        self.hook_results: List[HookResult] = []

    # -- notify -------------------------------------------------------------------------------------
    def notify(self, event: Event, budget: float, hooks_budget: float, body: Dict[str, Any],
               with_hooks: bool = True) -> NotifyResult:
        """``with_hooks`` False: the caller runs the hooks itself (the supervisor does for a rebalance)."""
        started = time.monotonic()
        out = NotifyResult()
        wl = self.section
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
        wl = self.section
        show = self.runner.run(["systemctl", "show", "-p", "MainPID", "--value", wl.unit], timeout=5, check=False)
        if show.ok and show.stdout.strip().isdigit() and int(show.stdout.strip()) > 0:
            out.pid = int(show.stdout.strip())
        res = self.runner.run(["systemctl", "kill", f"--signal={wl.signal}", f"--kill-whom={wl.kill_whom}", wl.unit],
                              timeout=5, check=False)
        if res.ok:
            out.done.append(f"sent {wl.signal} to {wl.unit}")
        else:
            out.errors.append(f"signal {wl.unit}: {res.error_line()}")

    def _signal_pidfile(self, out: NotifyResult) -> None:
        wl = self.section
        pid = read_pidfile(wl.pidfile)
        if pid is None:
            out.errors.append(f"pidfile {wl.pidfile}: no readable pid")
            return
        try:
            os.kill(pid, signal_number(wl.signal))
            out.pid = out.pid or pid
            out.done.append(f"sent {wl.signal} to pid {pid}")
        except ProcessLookupError:
            out.errors.append(f"pidfile {wl.pidfile}: pid {pid} is not running")
        except PermissionError:
            out.errors.append(f"pidfile {wl.pidfile}: not allowed to signal pid {pid}")

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
    def wait(self, conditions: List[str], budget: float, since: float, pid: Optional[int]) -> WaitResult:
        """Wait until every condition holds; ``since`` (epoch) is when the workload was told."""
        deadline = time.monotonic() + max(0.0, budget)
        notes: List[str] = []
        pending = list(conditions)
        if "hooks" in pending and self._hook_thread is None:
            pending.remove("hooks")
            notes.append("the hooks were not started by this drain (earlier process, or the supervisor): not awaited")
        if "process" in pending and pid is None:
            pending.remove("process")
            notes.append("no process to wait for")
        while True:
            for cond in list(pending):
                if cond == "hooks" and self._hook_thread is not None and not self._hook_thread.is_alive():
                    pending.remove(cond)
                elif cond == "process" and pid is not None and not alive(pid):
                    pending.remove(cond)
                elif cond == "marker" and self._marker_since(since):
                    pending.remove(cond)
            if not pending:
                return WaitResult(True, [], notes)
            if time.monotonic() >= deadline:
                return WaitResult(False, pending, notes)
            time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))

    def _marker_since(self, since: float) -> bool:
        try:
            # 1 s of slack: coarse mtime granularity on some filesystems
            return os.stat(self.section.marker).st_mtime >= since - 1.0
        except OSError:
            return False

    def join_hooks(self, timeout: float) -> None:
        if self._hook_thread is not None:
            self._hook_thread.join(timeout)
