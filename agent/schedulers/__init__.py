"""The job schedulers the cluster already runs (Slurm, Ray), as the drain's ``scheduler`` and ``requeue`` steps.

One notice on one node must reach the whole multi-node job, so before the workload is told anything:

- Slurm: this node is drained (``State=DRAIN``, a reason naming the notice and its deadline), and
  every job with an allocation here gets the configured signal on all its nodes (``scancel
  --signal=SIG --full``); the wait step then waits for each (job, node) commit file, and the
  ``requeue`` step (``[slurm] requeue = true``) requeues the jobs after the checkpoint is persisted.
- Ray: this node is drained through Ray's API with the preemption reason and the seconds left.

On a rebalance recommendation, optionally: the Slurm node is drained only (no new jobs) and resumed
after ``rebalance_resume_after`` seconds if no interruption followed; the Ray node is drained.

What is found out before a notice (is this a Slurm node, our Ray node id) is found in
:meth:`Schedulers.prepare`, when the drainer is built; the drain only runs the commands.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from agent.schedulers.ray import Ray, reason_message
from agent.schedulers.slurm import Slurm, SlurmJob, SlurmParseError, drain_reason, pending_commits

log = logging.getLogger(__name__)

SECTION = "schedulers"
REBALANCE_REASON = "spot-agent: rebalance recommendation"
POLL = 0.1


class Schedulers:
    def __init__(self, config: Any, runner: Any, state: Any, clock: Any, default_ray_name: str = "",
                 slurm: Optional[Slurm] = None, ray: Optional[Ray] = None) -> None:
        self.config = config
        self.state = state
        self.clock = clock
        self.slurm: Optional[Slurm] = slurm
        self.ray: Optional[Ray] = ray
        if self.slurm is None and config.slurm.enabled:
            self.slurm = Slurm(config.slurm, runner)
        if self.ray is None and config.ray.enabled:
            self.ray = Ray(config.ray, runner, default_ray_name)
        self.slurm_active = False
        self.notes: List[str] = []
        self._terminal = threading.Event()
        self._timer: Optional[threading.Timer] = None

    # -- preparation -----------------------------------------------------------------------------
    def prepare(self) -> "Schedulers":
        if self.slurm is not None:
            ok, why = self.slurm.present()
            self.slurm_active = ok
            if ok:
                log.info("Slurm: %s; a terminal notice drains it and signals its jobs (SIG%s)", why,
                         self.config.slurm.signal.replace("SIG", ""))
            else:
                log.info("Slurm: not acting (%s)", why)
                self.notes.append(f"slurm: {why}")
        if self.ray is not None:
            ok, why = self.ray.lookup()
            if ok:
                log.info("Ray: node %s at %s", why[:12], self.config.ray.address)
            else:
                log.warning("Ray: node lookup failed (retried at drain time): %s", why)
        self._resume_pending_rebalance()
        return self

    def active(self) -> List[str]:
        out = []
        if self.slurm is not None and self.slurm_active:
            out.append("slurm")
        if self.ray is not None:
            out.append("ray")
        return out

    def waits_for_commits(self) -> bool:
        return "slurm" in self.active() and bool(self.config.slurm.commit_file)

    def requeues(self) -> bool:
        return "slurm" in self.active() and self.config.slurm.requeue

    def detail(self) -> str:
        parts = []
        if "slurm" in self.active():
            sig = self.config.slurm.signal.replace("SIG", "")
            parts.append(f"slurm: drain {self.slurm.node}, SIG{sig} to its jobs on all their nodes")  # type: ignore[union-attr]
        if self.ray is not None:
            parts.append("ray: drain-node (preemption, deadline)")
        return "; ".join(parts)

    # -- the terminal drain ----------------------------------------------------------------------
    def interrupted(self) -> None:
        """A terminal drain started: no rebalance resume may follow."""
        self._terminal.set()
        self._cancel_timer()

    def terminal(self, kind: str, action: str, deadline: Optional[float], rec: Dict[str, Any],
                 save: Any = lambda: None) -> Tuple[str, str]:
        """Drain the node and signal the jobs; ``rec`` (the drain record's ``scheduler`` part) remembers
        what was signalled, so a resumed drain never signals a job twice."""
        self.interrupted()
        now = self.clock.time()
        done, errors = [], []
        if "slurm" in self.active():
            assert self.slurm is not None
            ok, msg = self.slurm.drain(drain_reason(kind, action, deadline, now))
            (done if ok else errors).append(f"slurm: {msg}")
            try:
                jobs = self.slurm.jobs_here()
            except SlurmParseError as exc:
                jobs = []
                errors.append(f"slurm: cannot list jobs: {exc}")
            known = {j["job_id"] for j in rec.get("jobs", [])}
            rec.setdefault("jobs", []).extend(j.to_dict() for j in jobs if j.job_id not in known)
            signalled = set(rec.setdefault("signalled", []))
            for job in [SlurmJob.from_dict(j) for j in rec["jobs"]]:
                if job.job_id in signalled:
                    continue
                rec["signalled"].append(job.job_id)
                rec.setdefault("signalled_at", now)
                save()
                ok, msg = self.slurm.signal(job)
                (done if ok else errors).append(f"slurm: {msg}")
            if not rec["jobs"]:
                done.append(f"slurm: no jobs on {self.slurm.node}")
        if self.ray is not None:
            left = None if deadline is None else deadline - self.clock.time()
            ok, msg = self.ray.drain(reason_message(kind, action, left), left)
            (done if ok else errors).append(msg)
        save()
        if errors:
            return "failed", "; ".join(errors + done)
        return "ok", "; ".join(done)

    def wait_commits(self, rec: Dict[str, Any], budget: float, since: float) -> Tuple[bool, str]:
        """Wait (up to ``budget``) for every signalled job's commit file on each of its nodes."""
        if not self.waits_for_commits() or not rec.get("jobs"):
            return True, ""
        jobs = [SlurmJob.from_dict(j) for j in rec["jobs"] if j["job_id"] in set(rec.get("signalled", []))]
        since = float(rec.get("signalled_at") or since)
        end = time.monotonic() + max(0.0, budget)
        while True:
            try:
                pending = pending_commits(self.config.slurm.commit_file, jobs, since)
            except SlurmParseError as exc:
                return False, f"slurm: {exc}"
            if not pending.missing:
                n = sum(len(j.nodes) for j in jobs)
                return True, f"slurm: {n} commit file(s) of {len(jobs)} job(s) written"
            if time.monotonic() >= end:
                return False, f"slurm: late: {pending.late_text()}"
            time.sleep(POLL)

    def requeue(self, rec: Dict[str, Any], save: Any = lambda: None) -> Tuple[str, str]:
        if not self.requeues():
            return "skipped", "[slurm] requeue = false: the job requeues itself"
        assert self.slurm is not None
        done, errors = [], []
        requeued = rec.setdefault("requeued", [])
        for job in [SlurmJob.from_dict(j) for j in rec.get("jobs", [])]:
            if job.job_id in requeued or job.job_id not in rec.get("signalled", []):
                continue
            if not job.requeue:
                done.append(f"job {job.job_id} does not allow requeue (sbatch --no-requeue)")
                continue
            ok, msg = self.slurm.requeue(job)
            if ok:
                requeued.append(job.job_id)
                save()
            (done if ok else errors).append(msg)
        if errors:
            return "failed", "; ".join(errors + done)
        return "ok", "; ".join(done) or "no jobs to requeue"

    # -- rebalance -------------------------------------------------------------------------------
    def rebalance(self, kind: str) -> List[str]:
        """The rebalance actions that are configured; returns what was done (for the log)."""
        out = []
        if self._terminal.is_set():
            return out
        if "slurm" in self.active() and self.config.slurm.rebalance_drain:
            assert self.slurm is not None
            ok, msg = self.slurm.drain(REBALANCE_REASON)
            out.append(f"slurm: {msg}")
            if ok:
                self.state.update(SECTION, rebalance_drained_at=self.clock.time())
                self._schedule_resume(self.config.slurm.rebalance_resume_after)
        if self.ray is not None and self.config.ray.on_rebalance:
            ok, msg = self.ray.drain(reason_message(kind, "", None), None)
            out.append(msg)
        for line in out:
            log.info("rebalance: %s", line)
        return out

    def _schedule_resume(self, after: float) -> None:
        self._cancel_timer()
        if self.config.slurm.rebalance_resume_after <= 0:
            return
        self._timer = threading.Timer(max(0.0, after), self.resume_if_quiet)
        self._timer.daemon = True
        self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _resume_pending_rebalance(self) -> None:
        at = (self.state.get(SECTION, {}) or {}).get("rebalance_drained_at")
        if at and "slurm" in self.active() and self.config.slurm.rebalance_resume_after > 0:
            self._schedule_resume(self.config.slurm.rebalance_resume_after - (self.clock.time() - float(at)))

    def resume_if_quiet(self) -> Tuple[bool, str]:
        """Resume the node drained for a rebalance, unless an interruption followed or someone else
        drained it since (their reason is not ours)."""
        if self._terminal.is_set() or self.slurm is None:
            return False, "an interruption followed"
        try:
            info = self.slurm.node_info()
        except SlurmParseError as exc:
            log.warning("rebalance resume: %s", exc)
            return False, str(exc)
        if not info.get("Reason", "").startswith(REBALANCE_REASON):
            self.state.update(SECTION, rebalance_drained_at=None)
            return False, f"node drained for another reason ({info.get('Reason', '')[:80]!r}): left alone"
        ok, msg = self.slurm.resume()
        if ok:
            self.state.update(SECTION, rebalance_drained_at=None)
        log.info("rebalance: no interruption followed: %s", msg)
        return ok, msg

    def close(self) -> None:
        self._cancel_timer()
