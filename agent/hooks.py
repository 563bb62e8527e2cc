"""Run the configured hook commands for an event.

Each hook runs in its own session (process group), so a timeout kills everything it started, not just
the first process: a checkpoint script that forks a helper must not outlive its budget and hold the
drain. Output goes to the log line by line, tagged with the hook, decoded as UTF-8 with replacement:
a strict decoder dies on the first bad byte, the pipe fills and the hook hangs until its timeout. Hooks
of one event run in parallel, because each spends the same deadline.

The executable is checked again just before it runs, component by component (``agent.trust``), and the
path that check resolved (no symlinks left) is what is executed: a path that passed at load time and was
changed since is refused, not run. What is left between that check and exec can only be used by root.
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from agent import metrics
from agent.config import HookSection
from agent.events import Event
from agent.imds.parse import escape_nul
from agent.trust import UntrustedPath, resolve_trusted

log = logging.getLogger(__name__)

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL to the hook's process group


@dataclass
class HookResult:
    index: int
    argv: List[str]
    returncode: Optional[int]  # None when killed for running out of time
    timed_out: bool
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.error


def hook_label(hook: HookSection) -> str:
    """The metrics label: the executable's name (bounded by the config)."""
    return os.path.basename(hook.command[0])


def _deadline_iso(event: Event) -> str:
    try:
        return event.deadline_iso
    except (ValueError, OverflowError, OSError):  # a deadline no datetime can hold: say nothing
        return ""


def hook_env(event: Event, hook: HookSection) -> Dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "SPOT_AGENT_EVENT": event.kind,
        "SPOT_AGENT_ACTION": event.action,
        "SPOT_AGENT_DEADLINE": "" if event.deadline is None else str(int(event.deadline)),
        "SPOT_AGENT_DEADLINE_ISO": _deadline_iso(event),
    }
    env.update(hook.env)
    # exec refuses a NUL anywhere in the environment: the hook would not run at all. IMDS strings are
    # escaped (and counted) by the parser already; this is the last line for any other source.
    return {escape_nul(k): escape_nul(v) for k, v in env.items()}


def _pump(stream, label: str, level: int) -> None:
    for line in iter(stream.readline, ""):
        log.log(level, "hook %s: %s", label, line.rstrip("\n"), extra={"journal": {"HOOK": label}})
    stream.close()


def _kill_group(proc: subprocess.Popen, label: str) -> None:
    pgid = proc.pid  # start_new_session made the hook the leader of its own group
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone while children in its group are not: SIGKILL the group regardless.
    log.error("hook %s: process group %d did not die", label, pgid)


def run_hook(hook: HookSection, index: int, event: Event, budget: Optional[float] = None) -> HookResult:
    timeout = hook.timeout if budget is None else max(0.0, min(hook.timeout, budget))
    label = hook_label(hook)
    started = time.monotonic()
    metrics.HOOK_RUNS.labels(hook=label).inc()
    kwargs = {}
    if hook.user:
        try:
            pw = pwd.getpwnam(hook.user)
        except KeyError:
            metrics.HOOK_FAILURES.labels(hook=label).inc()
            return HookResult(index, hook.command, None, False, 0.0, f"hooks[{index}].user: no such user {hook.user!r}")
        kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    env = hook_env(event, hook)
    if hook.user:
        env.setdefault("HOME", pwd.getpwnam(hook.user).pw_dir)
    try:
        executable = resolve_trusted(hook.command[0], kind="file")
    except UntrustedPath as exc:
        metrics.HOOK_FAILURES.labels(hook=label).inc()
        error = f"hooks[{index}].command: refusing an unsafe hook executable: {exc}"
        log.error("hook %s: %s", label, error, extra={"journal": {"HOOK": label}})
        return HookResult(index, hook.command, None, False, time.monotonic() - started, error)
    log.info("hook %s: starting for %s", label, event.kind,
             extra={"journal": {"HOOK": label, "EVENT_KIND": event.kind}})
    try:
        proc = subprocess.Popen(hook.command, executable=executable, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                                errors="replace", env=env, start_new_session=True, cwd="/", **kwargs)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in argv; never a silent no-run
        metrics.HOOK_FAILURES.labels(hook=label).inc()
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        error = f"hooks[{index}].command: {reason}: {hook.command[0]}"
        log.error("hook %s: cannot start: %s", label, error, extra={"journal": {"HOOK": label}})
        return HookResult(index, hook.command, None, False, time.monotonic() - started, error)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, label, logging.INFO), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, label, logging.WARNING), daemon=True)]
    for t in pumps:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        log.warning("hook %s: timed out after %.1fs; killing its process group", label, timeout,
                    extra={"journal": {"HOOK": label}})
        _kill_group(proc, label)
    for t in pumps:
        t.join(timeout=1.0)
    seconds = time.monotonic() - started
    rc = None if timed_out else proc.returncode
    result = HookResult(index, hook.command, rc, timed_out, seconds)
    metrics.HOOK_SECONDS.labels(hook=label).observe(seconds)
    if not result.ok:
        metrics.HOOK_FAILURES.labels(hook=label).inc()
        log.warning("hook %s: failed (%s) after %.2fs", label,
                    "timeout" if timed_out else f"exit {rc}", seconds, extra={"journal": {"HOOK": label}})
    else:
        log.info("hook %s: done in %.2fs", label, seconds, extra={"journal": {"HOOK": label}})
    return result


def matching(hooks: List[HookSection], kind: str) -> List[int]:
    return [i for i, h in enumerate(hooks) if kind in h.on]


def run_hooks(hooks: List[HookSection], event: Event, budget: Optional[float] = None) -> List[HookResult]:
    """Run every hook whose ``on`` names the event's kind, in parallel; return when all are done."""
    indexes = matching(hooks, event.kind)
    results: List[Optional[HookResult]] = [None] * len(indexes)

    def one(slot: int, i: int) -> None:
        results[slot] = run_hook(hooks[i], i, event, budget)

    threads = [threading.Thread(target=one, args=(slot, i), name=f"hook-{i}", daemon=True)
               for slot, i in enumerate(indexes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]
