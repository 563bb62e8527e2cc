"""Slurm: drain this node, signal every job that runs here on all its nodes, requeue after the checkpoint.

A multi-node job only has a usable checkpoint when every rank saved the same step, so a spot notice on
one node must reach the whole job: ``scancel --signal=SIG --full JOB`` delivers the signal to the batch
shell and every step on every node of the job at once (Lightning's SIGUSR1 convention, ``#SBATCH
--signal`` users). The node is drained first so nothing new lands on it while it goes.

Every command goes through the injectable :class:`agent.runner.Runner`; everything Slurm prints is
parsed by the pure functions below, as untrusted input (node names and job ids are validated before
they become arguments or parts of a path; a malformed answer is an error line, never an exception
inside the drain).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import socket
import stat as statmod
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from agent.runner import Runner

log = logging.getLogger(__name__)

NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_JOB_ID = 2 ** 32 - 1
MAX_HOSTS = 65536  # a hostlist that expands past this is refused, not expanded
REASON_MAX = 200


class SlurmParseError(ValueError):
    """Slurm's output did not look like what Slurm prints (one line, says what was wrong)."""


@dataclass
class SlurmJob:
    job_id: int
    name: str
    nodes: List[str]
    state: str
    requeue: bool = True  # the job allows requeue (sbatch --requeue / JobRequeue=1)
    batch_host: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"job_id": self.job_id, "name": self.name, "nodes": list(self.nodes), "state": self.state,
                "requeue": self.requeue, "batch_host": self.batch_host}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SlurmJob":
        return cls(int(data["job_id"]), str(data.get("name", "")), [str(n) for n in data.get("nodes", [])],
                   str(data.get("state", "")), bool(data.get("requeue", True)), str(data.get("batch_host", "")))


# -- pure parsing ---------------------------------------------------------------------------------
def expand_hostlist(expr: str, limit: int = MAX_HOSTS) -> List[str]:
    """Slurm's hostlist syntax (``n[1-3,7],gpu-[01-02]``) to names, as ``scontrol show hostnames`` does.

    Bounded: more than ``limit`` names, a nested or unbalanced bracket, or a name that is not a valid
    node name raises :class:`SlurmParseError`."""
    if not isinstance(expr, str):
        raise SlurmParseError(f"hostlist is not a string: {type(expr).__name__}")
    expr = expr.strip()
    if not expr or expr in ("(null)", "None"):
        return []
    out: List[str] = []
    for part in _split_top(expr):
        m = re.match(r"^([^\[\]]*)(?:\[([^\[\]]+)\]([^\[\]]*))?$", part)
        if not m:
            raise SlurmParseError(f"bad hostlist element {part[:80]!r}")
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3) or ""
        if ranges is None:
            names = [prefix]
        else:
            names = []
            for rng in ranges.split(","):
                lo, _, hi = rng.partition("-")
                if not lo.isdigit() or (hi and not hi.isdigit()):
                    raise SlurmParseError(f"bad hostlist range {rng[:40]!r}")
                hi = hi or lo
                a, b = int(lo), int(hi)
                if b < a or b - a + 1 + len(out) + len(names) > limit:
                    raise SlurmParseError(f"hostlist range {rng[:40]!r} is reversed or too large")
                width = len(lo)
                names.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(a, b + 1))
        for n in names:
            if not NODE_RE.match(n):
                raise SlurmParseError(f"not a node name: {n[:80]!r}")
        out.extend(names)
        if len(out) > limit:
            raise SlurmParseError(f"hostlist expands to more than {limit} names")
    return out


def _split_top(expr: str) -> List[str]:
    parts, depth, cur = [], 0, []
    for ch in expr:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmParseError("nested brackets in hostlist")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmParseError("unbalanced ']' in hostlist")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise SlurmParseError("unbalanced '[' in hostlist")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _job_state(value: Any) -> str:
    # 22.05 prints a string; 23.02+ a list of flags ("RUNNING", "COMPLETING").
    if isinstance(value, str):
        return value.upper()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(v.upper() for v in value)
    raise SlurmParseError(f"job_state is {type(value).__name__}, not a string or a list of strings")


def _job_id(value: Any) -> int:
    # 23.02+ may wrap numbers as {"set": true, "number": N}.
    if isinstance(value, dict):
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_JOB_ID:
        raise SlurmParseError(f"job_id {value!r} is not a job id")
    return value


def parse_squeue_json(text: str, node: str) -> List[SlurmJob]:
    """The running jobs with an allocation on ``node``, from ``squeue --json`` output.

    Raises :class:`SlurmParseError` when the document is not squeue's; a single malformed job entry
    is skipped with a warning (one bad entry must not hide the others from the signal)."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise SlurmParseError(f"squeue --json: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise SlurmParseError("squeue --json: no 'jobs' array")
    out: List[SlurmJob] = []
    for i, entry in enumerate(doc["jobs"]):
        try:
            if not isinstance(entry, dict):
                raise SlurmParseError("not an object")
            state = _job_state(entry.get("job_state", ""))
            if "RUNNING" not in state.split(",") and "COMPLETING" not in state.split(","):
                continue
            nodes = expand_hostlist(entry.get("nodes", "") or "")
            if node not in nodes:
                continue
            name = entry.get("name", "")
            name = name if isinstance(name, str) else ""
            requeue = entry.get("requeue", True)
            batch_host = entry.get("batch_host", "")
            out.append(SlurmJob(_job_id(entry.get("job_id")), name[:128], nodes, state,
                                requeue if isinstance(requeue, bool) else True,
                                batch_host if isinstance(batch_host, str) and NODE_RE.match(batch_host or "x") else ""))
        except SlurmParseError as exc:
            log.warning("squeue --json: jobs[%d] skipped: %s", i, exc)
    return out


def parse_scontrol_node(text: str) -> Dict[str, str]:
    """``scontrol --oneliner show node NAME`` as key/value pairs; ``Reason`` (which may contain spaces
    and ``=``) is everything after ``Reason=``. Raises :class:`SlurmParseError` without a NodeName."""
    text = text.strip()
    reason = ""
    if " Reason=" in text:
        text, reason = text.split(" Reason=", 1)
    out: Dict[str, str] = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    if "NodeName" not in out:
        raise SlurmParseError("scontrol show node: no NodeName in the answer")
    if reason:
        out["Reason"] = reason.strip()
    return out


def node_state_flags(info: Dict[str, str]) -> List[str]:
    """``State=IDLE+DRAIN`` -> ["IDLE", "DRAIN"]."""
    return [s for s in info.get("State", "").upper().split("+") if s]


def drain_reason(kind: str, action: str, deadline: Optional[float], now: float) -> str:
    """The node's drain reason: names the notice and its deadline (what an operator sees in sinfo -R)."""
    what = kind + (f"/{action}" if action else "")
    if deadline is not None:
        iso = _dt.datetime.fromtimestamp(deadline, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = f"spot-agent: {what}, deadline {iso} ({max(0.0, deadline - now):.0f}s)"
    else:
        text = f"spot-agent: {what}, no deadline given"
    return re.sub(r"[^\x20-\x7e]", "?", text)[:REASON_MAX]


def commit_path(template: str, job: SlurmJob, node: str) -> str:
    """The commit file of ``job`` on ``node``; both were validated (digits, a node name), so the path
    cannot climb out of the template's directory."""
    if not NODE_RE.match(node):
        raise SlurmParseError(f"not a node name: {node[:80]!r}")
    return template.replace("{job_id}", str(job.job_id)).replace("{node}", node)


def commit_written(path: str, since: float) -> bool:
    """The commit file exists as a regular file (not a link the job planted) and is no older than the
    signal."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return statmod.S_ISREG(st.st_mode) and st.st_mtime >= since - 1.0


# -- the commands ---------------------------------------------------------------------------------
class Slurm:
    """This node's view of Slurm, through ``runner``. Nothing here raises into the drain for a bad
    answer: methods return (ok, message)."""

    def __init__(self, section: Any, runner: Runner, hostname: Optional[str] = None) -> None:
        self.section = section
        if section.conf and type(runner) is Runner:
            # Slurm's tools read SLURM_CONF; a test or recording runner is used as given.
            runner = Runner(dict(runner.env or {}, SLURM_CONF=section.conf))
        self.runner = runner
        self.node = section.node or os.environ.get("SLURMD_NODENAME", "") or (hostname or socket.gethostname()).split(".")[0]
        self.timeout = section.command_timeout

    def _cmd(self, tool: str) -> str:
        base = self.section.bin_dir
        return os.path.join(base, tool) if base else tool

    def present(self) -> Tuple[bool, str]:
        """Is this a Slurm node? (``enabled = "auto"``): scontrol exists and knows this node."""
        if not self.section.bin_dir and shutil.which("scontrol") is None:
            return False, "scontrol not found"
        if not NODE_RE.match(self.node):
            return False, f"node name {self.node!r} is not a Slurm node name"
        res = self.runner.run([self._cmd("scontrol"), "--oneliner", "show", "node", self.node], timeout=self.timeout, check=False)
        if not res.ok:
            return False, res.error_line()
        try:
            parse_scontrol_node(res.stdout)
        except SlurmParseError as exc:
            return False, str(exc)
        return True, f"Slurm node {self.node}"

    def node_info(self) -> Dict[str, str]:
        res = self.runner.run([self._cmd("scontrol"), "--oneliner", "show", "node", self.node], timeout=self.timeout, check=False)
        if not res.ok:
            raise SlurmParseError(res.error_line())
        return parse_scontrol_node(res.stdout)

    def drain(self, reason: str) -> Tuple[bool, str]:
        res = self.runner.run([self._cmd("scontrol"), "update", f"NodeName={self.node}", "State=DRAIN", f"Reason={reason}"],
                              timeout=self.timeout, check=False)
        return (True, f"node {self.node} drained") if res.ok else (False, res.error_line())

    def resume(self) -> Tuple[bool, str]:
        res = self.runner.run([self._cmd("scontrol"), "update", f"NodeName={self.node}", "State=RESUME"],
                              timeout=self.timeout, check=False)
        return (True, f"node {self.node} resumed") if res.ok else (False, res.error_line())

    def jobs_here(self) -> List[SlurmJob]:
        res = self.runner.run([self._cmd("squeue"), "--json", f"--nodelist={self.node}"], timeout=self.timeout, check=False)
        if not res.ok:
            raise SlurmParseError(res.error_line())
        return parse_squeue_json(res.stdout, self.node)

    def signal(self, job: SlurmJob) -> Tuple[bool, str]:
        sig = self.section.signal[3:] if self.section.signal.startswith("SIG") else self.section.signal
        res = self.runner.run([self._cmd("scancel"), f"--signal={sig}", "--full", str(job.job_id)],
                              timeout=self.timeout, check=False)
        return (True, f"SIG{sig} to job {job.job_id} on {','.join(job.nodes)}") if res.ok else (False, res.error_line())

    def requeue(self, job: SlurmJob) -> Tuple[bool, str]:
        res = self.runner.run([self._cmd("scontrol"), "requeue", str(job.job_id)], timeout=self.timeout, check=False)
        return (True, f"job {job.job_id} requeued") if res.ok else (False, res.error_line())


@dataclass
class CommitWait:
    """Which (job, node) commit files are still missing."""

    missing: List[Tuple[int, str, str]] = field(default_factory=list)  # (job id, node, path)

    def late_text(self) -> str:
        return "; ".join(f"job {j} on {n}: no commit file {p}" for j, n, p in self.missing)


def pending_commits(template: str, jobs: Sequence[SlurmJob], since: float) -> CommitWait:
    out = CommitWait()
    for job in jobs:
        for node in job.nodes:
            path = commit_path(template, job, node)
            if not commit_written(path, since):
                out.missing.append((job.job_id, node, path))
    return out
