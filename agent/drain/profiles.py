"""Workload profiles: what torchrun, Lightning and the Hugging Face Trainer already understand.

Each framework reacts to a different signal in a different way, and shows a finished checkpoint
differently. A profile is a named set of defaults for ``[drain.workload]``; every key the user sets
wins over it. Resolution is pure (config in, :class:`Resolved` out), so the rules are unit-tested
without a process, and the drain only reads the result.

- ``generic``: SIGTERM to the main process; done when the hooks exit and the marker appears (or,
  without a marker, the process exits). The behaviour before profiles existed.
- ``torchrun``: SIGTERM to torchrun only: it forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to every worker
  within milliseconds and SIGKILLs them after ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (which the env file
  sizes from the wait budget). Done when any of: a new step directory commits with ``.metadata``
  (torch.distributed.checkpoint, written by rank 0 last), the helper acknowledges, torchrun exits.
- ``lightning``: SIGTERM to every process at once (each rank sets ``received_sigterm``; the
  helper's callback saves and stops). Done on the callback's acknowledgement or the exit.
- ``huggingface``: SIGTERM to every process at once (``enable_jit_checkpoint`` saves on it in each
  rank). Done when a new ``checkpoint-N/`` holds ``trainer_state.json`` (the Trainer writes it last)
  and no ``checkpoint-is-incomplete.txt``, on the callback's acknowledgement, or on the exit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from agent.config import WorkloadSection

if TYPE_CHECKING:  # pragma: no cover
    from agent.config import Config

GENERIC, TORCHRUN, LIGHTNING, HUGGINGFACE = "generic", "torchrun", "lightning", "huggingface"
# the signals torchrun forwards to its workers unless --signals-to-handle says otherwise
TORCHRUN_FORWARDS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
HELPER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobhelper")


@dataclass(frozen=True)
class Profile:
    name: str
    signal: str
    kill_whom: str
    complete: Tuple[str, ...]  # empty: the generic "auto" rule
    mode: str
    commit_file: str = ""
    incomplete_file: str = ""
    torch_env: bool = False  # TORCH_ELASTIC_SHUTDOWN_TIMEOUT and PET_SIGNALS_TO_HANDLE in the env file


PROFILES: Dict[str, Profile] = {
    GENERIC: Profile(GENERIC, "SIGTERM", "main", (), "all"),
    TORCHRUN: Profile(TORCHRUN, "SIGTERM", "main", ("commit", "ack", "process"), "any", ".metadata", torch_env=True),
    LIGHTNING: Profile(LIGHTNING, "SIGTERM", "all", ("ack", "process"), "any", torch_env=True),
    HUGGINGFACE: Profile(HUGGINGFACE, "SIGTERM", "all", ("commit", "ack", "process"), "any", "trainer_state.json",
                         "checkpoint-is-incomplete.txt", torch_env=True),
}


@dataclass
class Resolved:
    """What the drain does for this workload; ``notes`` say which configured conditions cannot apply."""

    profile: str
    signal: str
    kill_whom: str
    conditions: List[str]
    mode: str
    commit_dir: str
    commit_file: str
    incomplete_file: str
    commit_settle: float
    notice_file: str
    ack_dir: str
    env_file: str
    env: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def _usable(cond: str, wl: WorkloadSection, has_hooks: bool, has_process: bool, commit_dir: str,
            commit_file: str) -> Optional[str]:
    """Why ``cond`` cannot hold for this config, or None."""
    if cond == "hooks" and not has_hooks:
        return "no hooks for this event"
    if cond == "process" and not has_process:
        return "no unit or pidfile"
    if cond == "marker" and not wl.marker:
        return "no marker set"
    if cond == "commit" and not (commit_dir and commit_file):
        return "no commit_dir (nor [[checkpoints]]) or no commit_file"
    return None


def conditions(wl: WorkloadSection, has_hooks: bool, commit_dir: str, commit_file: str
               ) -> Tuple[List[str], List[str]]:
    """(conditions that apply, notes on those dropped). Order of precedence: ``complete``, then an
    explicit ``wait``, then the profile's list, then the generic ``auto`` rule."""
    profile = PROFILES[wl.profile]
    has_process = bool(wl.unit or wl.pidfile)
    notes: List[str] = []
    if wl.complete:
        wanted = list(dict.fromkeys(wl.complete))
    elif wl.wait == "none":
        return [], []
    elif wl.wait != "auto":
        wanted = [wl.wait]
    elif profile.complete:
        wanted = (["hooks"] if has_hooks else []) + (["marker"] if wl.marker else []) + list(profile.complete)
    else:  # generic auto: the hooks, and the marker if set, else the process
        wanted = (["hooks"] if has_hooks else []) + (["marker"] if wl.marker else ["process"] if has_process else [])
    out = []
    for cond in wanted:
        why = _usable(cond, wl, has_hooks, has_process, commit_dir, commit_file)
        if why is None:
            out.append(cond)
        elif wl.complete or wl.wait != "auto":
            notes.append(f"{cond}: {why}, not awaited")
    return out, notes


def shutdown_timeout(checkpoint_timeout: float) -> int:
    """torchrun's grace before SIGKILL: the drain's whole wait budget plus a second for the signal."""
    return int(math.ceil(checkpoint_timeout)) + 1


def resolve(wl: WorkloadSection, *, socket_path: str, checkpoint_dirs: Sequence[str] = (),
            has_hooks: bool = False, helper_dir: str = HELPER_DIR) -> Resolved:
    profile = PROFILES[wl.profile]
    base = os.path.dirname(socket_path) or "/"
    signal = wl.signal or profile.signal
    if not signal.startswith("SIG"):
        signal = "SIG" + signal
    commit_dir = wl.commit_dir or (checkpoint_dirs[0] if checkpoint_dirs else "")
    commit_file = wl.commit_file or profile.commit_file
    conds, notes = conditions(wl, has_hooks, commit_dir, commit_file)
    kill_whom = wl.kill_whom or profile.kill_whom
    if profile.name == TORCHRUN and kill_whom == "main" and signal not in TORCHRUN_FORWARDS:
        notes.append(f"torchrun forwards {signal} to its workers only because the env file adds it to "
                     "PET_SIGNALS_TO_HANDLE; without it, torchrun dies and orphans them")
    res = Resolved(profile.name, signal, kill_whom, conds, wl.complete_mode or profile.mode, commit_dir, commit_file,
                   profile.incomplete_file, wl.commit_settle, wl.notice_file or os.path.join(base, "notice.json"),
                   wl.ack_dir or os.path.join(base, "ack"), wl.env_file or os.path.join(base, "workload.env"),
                   notes=notes)
    res.env = environment(res, wl, profile, helper_dir)
    return res


def for_config(config: "Config", event_kind: str = "") -> Resolved:
    """:func:`resolve` with what the whole config says (socket, checkpoint dirs, hooks for the event)."""
    wl = config.drain.workload
    hooks = any(event_kind in h.on for h in config.hooks) if event_kind else bool(config.hooks)
    return resolve(wl, socket_path=config.agent.socket, checkpoint_dirs=[c.dir for c in config.checkpoints],
                   has_hooks=hooks)


def environment(res: Resolved, wl: WorkloadSection, profile: Profile, helper_dir: str) -> Dict[str, str]:
    """The env file's entries: where the helper finds the notice and acknowledges, and for torch
    launchers how long to wait before SIGKILL and which signals to forward."""
    env = {"SPOT_AGENT_NOTICE_FILE": res.notice_file, "SPOT_AGENT_ACK_DIR": res.ack_dir,
           "SPOT_AGENT_PROFILE": res.profile, "PYTHONPATH": helper_dir}
    if res.commit_dir:
        env["SPOT_AGENT_CHECKPOINT_DIR"] = res.commit_dir
    if res.commit_file:
        env["SPOT_AGENT_COMMIT_FILE"] = res.commit_file
    if profile.torch_env:
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(shutdown_timeout(wl.checkpoint_timeout))
        forwarded = list(TORCHRUN_FORWARDS)
        if res.signal not in forwarded:
            forwarded.append(res.signal)
        env["PET_SIGNALS_TO_HANDLE"] = ",".join(forwarded)
    for key, value in wl.env.items():
        if value == "":
            env.pop(key, None)
        else:
            env[key] = value
    return env


def render_env(env: Dict[str, str]) -> str:
    """systemd EnvironmentFile= syntax: one KEY=value per line, values double-quoted and escaped."""
    lines = ["# written by spot-agent at start; load with EnvironmentFile=- in the workload unit"]
    for key in sorted(env):
        value = env[key].replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
        lines.append(f'{key}="{value}"')
    return "\n".join(lines) + "\n"
