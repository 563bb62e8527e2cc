"""Run the drain plan step by step, inside the deadline, and survive being killed in the middle.

Each step is recorded in the state file (section ``drain``, key ``run``) before it starts and after it
ends. A restarted agent (:meth:`Drainer.resume_if_pending`, or :meth:`Drainer.run` with the same
notice) skips the finished steps and resumes the interrupted one: a snapshot already requested is found
by its notice tag instead of being taken twice, and a completed lifecycle action is never completed
again.

Everything that can be prepared before a notice is prepared in ``__init__``: the Auto Scaling
group/hook discovery, the shutdown budget (TimeoutStopSec), the HTTP session, the imports. After the
notice the drain only plans (pure), writes state, and calls out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from agent import hostfacts, metrics
from agent.aws import Clients
from agent.clock import Clock
from agent.config import Config
from agent.drain import lifecycle as lc
from agent.drain import snapshots as snaps
from agent.drain.planner import (DEFAULT_SHUTDOWN_BUDGET, build_plan, parse_timeout_stop, snapshot_volume_names,
                                wait_conditions)
from agent.drain.crashpoint import crash_point
from agent.drain.freeze import boot_id, frozen_call, thaw_leftovers  # noqa: F401 - thaw_leftovers re-exported
from agent.drain.model import (LIFECYCLE, NOTIFY, PERSIST_STEPS, RETENTION, RETENTION_MIN, SNAPSHOT, UPLOAD, WAIT,
                              DrainReport, Plan, StepReport)
from agent.drain.workload import Workload
from agent.events import MESSAGE_IDS, Event
from agent.fleet import RebalanceTracker
from agent.hostfacts import HostFacts
from agent.identity import InstanceIdentity
from agent.runner import Runner
from agent.schedulers import Schedulers
from agent.state import StateStore
from agent.volumes.model import MountedVolume

log = logging.getLogger(__name__)

SECTION = "drain"
FINAL = ("ok", "skipped", "cut", "failed")
WAIT_SLICE = 0.5  # the wait step re-reads the deadline this often (a later notice may move it)

__all__ = ["Drainer", "DrainReport", "StepReport", "thaw_leftovers"]


def _event_from(data: Dict[str, Any]) -> Event:
    return Event(data["kind"], data.get("action", ""), data.get("deadline"), data["key"], data.get("detected_at", 0.0),
                 dict(data.get("raw", {}) or {}), bool(data.get("cancelled", False)))


class Drainer:
    def __init__(self, config: Config, clients: Clients, identity: InstanceIdentity, state: StateStore,
                 runner: Runner, clock: Clock, mounted: Callable[[], Dict[str, MountedVolume]],
                 checkpoint_stores: List[Any], progress: Callable[[str], None] = lambda s: None,
                 host: Optional[HostFacts] = None) -> None:
        self.config = config
        self.host = host or hostfacts.default()
        self.clients = clients
        self.identity = identity
        self.state = state
        self.runner = runner
        self.clock = clock
        self.mounted = mounted
        self.stores = list(checkpoint_stores)
        self.progress = progress
        self.workload = self._new_workload()
        self._tighter: Optional[Event] = None  # a later notice with an earlier deadline (tighten)
        self._tighter_lock = threading.Lock()
        # Slurm/Ray on this node: detected and looked up now, never after the notice.
        self.schedulers = Schedulers(config, runner, state, clock, default_ray_name=getattr(identity, "local_ipv4", "") or "").prepare()
        self.rebalances = RebalanceTracker(state, clock, config.fleet.rebalance_window)
        self.shutdown_budget = self._read_shutdown_budget()
        self._lock = threading.Lock()  # one terminal drain at a time
        self._early_lock = threading.Lock()  # one early (rebalance) checkpoint at a time
        self._freeze_lock = threading.Lock()  # one frozen window at a time (early and final never overlap)
        self._store_locks = [threading.Lock() for _ in self.stores]
        self._terminating = threading.Event()  # an early checkpoint stops between steps once this is set
        self._target: Optional[lc.LifecycleTarget] = None
        self._target_known = False  # discovery answered (with a target or with "none")
        self.timeline: List[Tuple[str, float]] = []
        self._notes: List[str] = []
        if config.drain.lifecycle.enabled:
            self.discover_lifecycle()

    # -- preparation (before any notice) -------------------------------------------------------------
    def _new_workload(self) -> Workload:
        """Built at start and again after a reload changed the workload or hooks (reconfigure)."""
        config = self.config
        self._workload_config = (config.drain.workload, list(config.hooks))
        workload = Workload(config.drain.workload, config.hooks, self.runner, socket_path=config.agent.socket,
                            checkpoint_dirs=[c.dir for c in config.checkpoints])
        workload.prepare()  # the unit's env file, the notice and ack directories
        return workload

    def reconfigure(self) -> None:
        """After a reload (the daemon rebinds ``config.hooks``/``config.drain``): everything built from
        them is rebuilt, so the next drain's hooks, workload, budgets and lifecycle target all come
        from the new config, never half from the old one."""
        if (self.config.drain.workload, list(self.config.hooks)) != self._workload_config:
            self.workload = self._new_workload()
        self.shutdown_budget = self._read_shutdown_budget()
        lcfg = self.config.drain.lifecycle
        if (lcfg.group, lcfg.hook, lcfg.enabled) != getattr(self, "_lifecycle_config", None):
            self._target, self._target_known = None, False
            if lcfg.enabled:
                threading.Thread(target=self.discover_lifecycle, name="lifecycle-discovery", daemon=True).start()

    def _read_shutdown_budget(self) -> float:
        if self.config.drain.shutdown_budget > 0:
            return self.config.drain.shutdown_budget
        if self.host.under_systemd():
            res = self.runner.run(["systemctl", "show", "-p", "TimeoutStopUSec", "spot-agent.service"],
                                  timeout=5, check=False)
            seconds = parse_timeout_stop(res.stdout) if res.ok else None
            if seconds:
                return seconds
        return DEFAULT_SHUTDOWN_BUDGET

    def discover_lifecycle(self, autoscaling: Any = None) -> Optional[lc.LifecycleTarget]:
        """Find (once) the Auto Scaling group and terminating hook; cached, retried after an error."""
        if self._target_known:
            return self._target
        lcfg = self.config.drain.lifecycle
        self._lifecycle_config = (lcfg.group, lcfg.hook, lcfg.enabled)
        try:
            self._target = lc.discover(autoscaling or self.clients.autoscaling, self.identity.instance_id,
                                       lcfg.group, lcfg.hook)
            self._target_known = True
        except Exception as exc:  # noqa: BLE001 - retried when the drain reaches the lifecycle step
            log.warning("Auto Scaling lifecycle discovery failed (will retry at drain time): %s", exc)
        return self._target

    # -- public interface ----------------------------------------------------------------------------
    def plan(self, event: Event, early: bool = False) -> Plan:
        lifecycle = self._target is not None or not self._target_known
        volumes = self._volume_names()
        return build_plan(event, self.config, self.clock.time(), self.shutdown_budget, volumes=volumes,
                          stores=[self._store_name(i, s) for i, s in enumerate(self.stores)] if self.stores else [],
                          lifecycle=lifecycle, early=early, schedulers=self.schedulers.active())

    def dry_run(self, event: Event) -> str:
        text = self.plan(event).render()
        if self.config.drain.lifecycle.enabled:
            if self._target is not None:
                text += f"\n  lifecycle target: group {self._target.group}, hook {self._target.hook}"
            elif self._target_known:
                text += "\n  lifecycle target: none (not in an Auto Scaling group with a terminating hook)"
            else:
                text += "\n  lifecycle target: unknown (discovery failed; retried at drain time)"
        return text

    def run(self, event: Event) -> DrainReport:
        """Drain for ``event``: once per termination. The same notice again returns the first report."""
        self._terminating.set()
        self.schedulers.interrupted()
        self.rebalances.interrupted(event.kind)
        with self._lock:
            rec = self._record()
            if rec and not rec.get("finished") and self._abandon_if_stale(rec):
                rec = self._record()
            # The same notice again in the same boot gets the first report. A finished drain from an
            # earlier boot (a stopped spot instance started again, or the "shutdown" key of the last
            # poweroff) is history: this termination drains afresh.
            if (rec and rec.get("key") == event.key and rec.get("finished")
                    and (not rec.get("boot_id") or rec.get("boot_id") == self.host.boot_id())):
                return DrainReport.from_dict(rec["report"])
            if rec and not rec.get("finished"):
                if rec.get("key") != event.key:
                    log.warning("resuming the unfinished drain for %s before anything else", rec.get("kind"))
                return self._execute(rec, "run", resumed=True)
            rec = self._new_record(event, early=False)
            return self._execute(rec, "run", resumed=False)

    def tighten(self, event: Event) -> bool:
        """A later notice with an earlier deadline than the running drain's: the steps still ahead (and
        the wait running now) are re-budgeted to it before they start. True when it is earlier."""
        if event.deadline is None:
            return False
        with self._tighter_lock:
            current = self._tighter.deadline if self._tighter is not None else None
            rec = self._record()
            planned = (rec or {}).get("plan", {}).get("deadline") if rec and not rec.get("finished") else None
            known = min(d for d in (current, planned, float("inf")) if d is not None)
            if event.deadline >= known:
                return False
            self._tighter = event
        return True

    def _apply_tighter(self, plan: Plan, rec: Dict[str, Any], slot: str) -> None:
        with self._tighter_lock:
            tighter = self._tighter
        if slot != "run" or tighter is None or tighter.deadline is None or tighter.deadline >= plan.deadline:
            return
        old = plan.deadline
        plan.deadline = tighter.deadline
        plan.deadline_source = f"{tighter.kind} notice (re-planned)"
        plan.notes.append(f"re-planned: {tighter.kind} moved the deadline {old - tighter.deadline:.1f} s earlier")
        rec["plan"] = plan.to_dict()
        self._save(slot, rec)
        log.warning("drain re-planned: deadline %s (%s), %.1f s earlier", tighter.deadline_iso, tighter.kind,
                    old - tighter.deadline, extra={"journal": {"EVENT_KIND": tighter.kind, "DRAIN_STEP": "plan"}})

    def early(self, event: Event) -> DrainReport:
        """The rebalance plan (``[drain] rebalance``): by default an early checkpoint, workload untouched.

        Runs beside the daemon's other work; a termination drain starting meanwhile makes it stop
        after its current step (the frozen window and each store's upload are never concurrent)."""
        if not self._early_lock.acquire(blocking=False):
            return DrainReport(event.kind, True, [StepReport("early", "skipped", 0.0, "an early checkpoint is already running")])
        try:
            rec = self._new_record(event, early=True)
            return self._execute(rec, "early", resumed=False)
        finally:
            self._early_lock.release()

    def rebalance_seen(self, event: Event) -> List[str]:
        """A rebalance recommendation: start the rebalance-to-interruption clock (agent/fleet) and run
        the Slurm/Ray actions configured for it (agent/schedulers)."""
        self.rebalances.rebalance()
        return self.schedulers.rebalance(event.kind)

    def pending_event(self) -> Optional[Event]:
        """The event of a drain a killed agent left unfinished (the daemon re-dispatches it)."""
        rec = self._record()
        if rec and not rec.get("finished") and not self._abandon_if_stale(rec):
            return _event_from(rec["event"])
        return None

    def _abandon_if_stale(self, rec: Dict[str, Any]) -> bool:
        """A drain left unfinished by an earlier boot (the instance stopped or rebooted) is over: its
        notice is gone. Close it, so a new boot never completes an old lifecycle action."""
        current = self.host.boot_id()
        if not rec.get("boot_id") or not current or rec["boot_id"] == current:
            return False
        log.warning("a drain for %s was interrupted by a stop or reboot; not resuming it", rec.get("kind"))
        plan = Plan.from_dict(rec["plan"])
        for step in plan.steps:
            rec["steps"].setdefault(step.name, {"state": "failed", "seconds": 0.0, "reason": "interrupted by a reboot"})
            if rec["steps"][step.name].get("state") == "running":
                rec["steps"][step.name] = {"state": "failed", "seconds": 0.0, "reason": "interrupted by a reboot"}
        report = self._report(plan, rec, resumed=False)
        report.ok = False
        rec["finished"] = True
        rec["report"] = report.to_dict()
        self._save("run", rec)
        return True

    def resume_if_pending(self) -> Optional[DrainReport]:
        rec = self._record()
        if not rec or rec.get("finished") or self._abandon_if_stale(rec):
            return None
        self._terminating.set()
        with self._lock:
            rec = self._record()
            if not rec or rec.get("finished"):
                return None
            log.warning("resuming an interrupted drain for %s", rec.get("kind"),
                        extra={"journal": {"EVENT_KIND": rec.get("kind", "")}})
            return self._execute(rec, "run", resumed=True)

    # -- records -------------------------------------------------------------------------------------
    def _record(self, slot: str = "run") -> Optional[Dict[str, Any]]:
        return (self.state.get(SECTION, {}) or {}).get(slot)

    def _save(self, slot: str, rec: Dict[str, Any]) -> None:
        self.state.update(SECTION, **{slot: rec})

    def _new_record(self, event: Event, early: bool) -> Dict[str, Any]:
        plan = self.plan(event, early=early)
        log.info("%s", plan.render(), extra={"journal": {"EVENT_KIND": event.kind, "DRAIN_STEP": "plan",
                                                          "MESSAGE_ID": MESSAGE_IDS.get(event.kind, "")}})
        return {"key": event.key, "kind": event.kind, "event": event.to_dict(), "plan": plan.to_dict(),
                "started": self.clock.time(), "steps": {}, "snapshots": {}, "snapshot_requested": {},
                "checkpoint_ids": {}, "lifecycle_completed": False, "lifecycle_attempted": False,
                "notified_at": None, "pid": None, "finished": False, "boot_id": self.host.boot_id()}

    # -- execution -----------------------------------------------------------------------------------
    def _execute(self, rec: Dict[str, Any], slot: str, resumed: bool) -> DrainReport:
        plan = Plan.from_dict(rec["plan"])
        event = _event_from(rec["event"])
        self.timeline = [("drain-start", self.clock.time())]
        if slot == "run":
            metrics.set_state("draining")
        done = {n for n, s in rec["steps"].items() if s.get("state") in FINAL}
        beats: Optional[lc.Heartbeats] = None
        life = plan.step(LIFECYCLE)
        if life is not None and not life.structural_skip and not rec.get("lifecycle_completed") and self._target:
            beats = lc.Heartbeats(self.clients.drain_autoscaling or self.clients.autoscaling, self._target,
                                  self.identity.instance_id, self.config.drain.lifecycle.heartbeat_interval,
                                  clock=self.clock).start()
        self._beats = beats
        if slot == "run" and not resumed and (self.config.drain.workload, list(self.config.hooks)) != self._workload_config:
            self.workload = self._new_workload()
        try:
            for step in plan.steps:
                if step.name in done:
                    continue
                self._apply_tighter(plan, rec, slot)
                if slot == "early" and self._terminating.is_set():
                    rec["steps"][step.name] = {"state": "skipped", "seconds": 0.0,
                                               "reason": "a termination drain started"}
                    continue
                self._run_step(plan, step.name, event, rec, slot, done)
                crash_point(step.name)
        finally:
            if beats is not None:
                beats.stop()
        report = self._report(plan, rec, resumed)
        rec["finished"] = True
        rec["report"] = report.to_dict()
        self._save(slot, rec)
        if slot == "run":
            with self._tighter_lock:
                self._tighter = None  # it belonged to this termination, not to a later one
        self._finish_metrics(report, slot)
        self.progress(report.summary())
        level = logging.INFO if report.ok else logging.ERROR
        log.log(level, "%s", report.summary(), extra={"journal": {
            "EVENT_KIND": report.kind, "DRAIN_STEP": "done", "DRAIN_OK": int(report.ok),
            "DRAIN_MARGIN": f"{report.margin_seconds:.1f}", "MESSAGE_ID": MESSAGE_IDS.get(report.kind, "")}})
        return report

    def _run_step(self, plan: Plan, name: str, event: Event, rec: Dict[str, Any], slot: str, done: set) -> None:
        step = plan.step(name)
        assert step is not None
        now = self.clock.time()
        entry: Dict[str, Any]
        if step.structural_skip:
            entry = {"state": "skipped", "seconds": 0.0, "reason": step.reason}
        else:
            budget = plan.budget_at(name, now, done)
            if not step.persist and (budget <= 0 or (name == RETENTION and budget < RETENTION_MIN)):
                entry = {"state": "skipped", "seconds": 0.0,
                         "reason": "no time left before the persistence reserves" if name != RETENTION
                         else "no time to spare for retention"}
            else:
                interrupted = rec["steps"].get(name, {}).get("state") == "running"
                rec["steps"][name] = {"state": "running", "started_at": now, "budget": budget}
                self._save(slot, rec)
                self.progress(f"draining: {name} ({budget:.0f} s budget)")
                t0 = time.monotonic()
                try:
                    state, reason = getattr(self, f"_step_{name}")(plan, event, rec, slot, budget, interrupted)
                except Exception as exc:  # noqa: BLE001 - one failed step must not stop the persistence after it
                    log.exception("drain step %s failed", name,
                                  extra={"journal": {"EVENT_KIND": event.kind, "DRAIN_STEP": name}})
                    state, reason = "failed", f"{type(exc).__name__}: {exc}"
                if budget < step.wanted and not step.persist:
                    reason = (f"budget cut to {budget:.1f} s of {step.wanted:.1f} s; " + reason).rstrip("; ")
                entry = {"state": state, "seconds": round(time.monotonic() - t0, 4), "reason": reason,
                         "budget": budget}
                metrics.DRAIN_STEP_SECONDS.labels(step=name).observe(entry["seconds"])
        rec["steps"][name] = entry
        self._save(slot, rec)
        done.add(name)
        log.log(logging.WARNING if entry["state"] == "failed" else logging.INFO,
                "drain step %s: %s%s", name, entry["state"], f" ({entry['reason']})" if entry["reason"] else "",
                extra={"journal": {"EVENT_KIND": event.kind, "DRAIN_STEP": name, "DRAIN_STEP_STATE": entry["state"],
                                   "DRAIN_STEP_SECONDS": entry["seconds"]}})

    # -- steps: each returns (state, reason) ----------------------------------------------------------
    def _step_notify(self, plan: Plan, event: Event, rec: Dict[str, Any], slot: str, budget: float,
                     interrupted: bool) -> Tuple[str, str]:
        rec["notified_at"] = self.clock.time()
        self._save(slot, rec)
        self.timeline.append(("notify", self.clock.time()))
        hooks_budget = budget + plan.budget_at(WAIT, self.clock.time(), {NOTIFY}) if plan.step(WAIT) else budget
        body = {"event": {k: v for k, v in event.to_dict().items() if k != "raw"},
                "instance_id": self.identity.instance_id, "run": self.config.agent.run or self.identity.instance_id,
                "deadline": plan.deadline, "budget_seconds": round(hooks_budget, 1)}
        res = self.workload.notify(event, budget, hooks_budget, body, with_hooks=slot != "early")
        self.timeline.append(("workload-signalled", self.clock.time()))
        rec["pid"] = res.pid
        if res.errors:
            return "failed", "; ".join(res.errors + res.done)
        return "ok", "; ".join(res.done)

    def _step_scheduler(self, plan: Plan, event: Event, rec: Dict[str, Any], slot: str, budget: float,
                        interrupted: bool) -> Tuple[str, str]:
        """Slurm/Ray (agent/schedulers): drain this node, signal every job here on all its nodes."""
        sched = rec.setdefault("scheduler", {})
        state, reason = self.schedulers.terminal(event.kind, event.action, plan.deadline, sched,
                                                 save=lambda: self._save(slot, rec))
        self.timeline.append(("scheduler-signalled", self.clock.time()))
        return state, reason

    def _step_requeue(self, plan: Plan, event: Event, rec: Dict[str, Any], slot: str, budget: float,
                      interrupted: bool) -> Tuple[str, str]:
        return self.schedulers.requeue(rec.setdefault("scheduler", {}), save=lambda: self._save(slot, rec))

    def _step_wait(self, plan: Plan, event: Event, rec: Dict[str, Any], slot: str, budget: float,
                   interrupted: bool) -> Tuple[str, str]:
        conds = wait_conditions(self.config, event.kind)
        since = rec.get("notified_at") or rec.get("started") or self.clock.time()
        # In slices, so a tighter deadline arriving meanwhile (tighten) cuts the wait it is in.
        end = time.monotonic() + budget
        while True:
            left = end - time.monotonic()
            res = self.workload.wait(conds, max(0.0, min(WAIT_SLICE, left)), since, rec.get("pid"))
            if res.met or not res.pending or left <= WAIT_SLICE:
                break  # met, cannot be met, or out of budget
            self._apply_tighter(plan, rec, slot)
            allowed = plan.budget_at(WAIT, self.clock.time(), {NOTIFY} | set(rec["steps"]) - {WAIT})
            end = min(end, time.monotonic() + allowed)
        if self.schedulers.waits_for_commits():
            met, note = self.schedulers.wait_commits(rec.get("scheduler", {}), max(0.0, end - time.monotonic()), since)
            res.met = res.met and met
            res.notes.append(note)
            if not met:
                res.pending.append("slurm commit files")
        self.timeline.append(("checkpoint-written" if res.met else "wait-ended", self.clock.time()))
        notes = "; ".join(res.notes)
        if res.met:
            return "ok", notes
        return "cut", f"budget of {budget:.1f} s ran out waiting for: {', '.join(res.pending)}" + (f"; {notes}" if notes else "")

    def _snapshot_targets(self, plan: Plan) -> Tuple[List[MountedVolume], List[str]]:
        wanted = self._volume_names()
        required = {v.name: v.required for v in self.config.volumes}
        mounted = self.mounted() or {}
        targets, problems = [], []
        for name in wanted:
            mv = mounted.get(name)
            if mv is None:
                if required.get(name, True):
                    problems.append(f"{name}: not mounted")
                else:
                    self._notes.append(f"{name}: not mounted (required = false)")
            elif not mv.volume_id:
                problems.append(f"{name}: no EBS volume id")
            else:
                targets.append(mv)
        return targets, problems

    def _step_snapshot(self, plan: Plan, event: Event, rec: Dict[str, Any], slot: str, budget: float,
                       interrupted: bool) -> Tuple[str, str]:
        started = time.monotonic()
        self._notes = []
        ec2 = self.clients.budgeted(budget, self.clock, "drain snapshot").ec2
        targets, problems = self._snapshot_targets(plan)
        notice = snaps.notice_tag(self.identity.instance_id, event.key, rec.get("boot_id", ""))
        run = self.config.agent.run or self.identity.instance_id
        description = f"spot-agent {event.kind} {event.key}"[:255]
        todo: List[MountedVolume] = []
        for mv in targets:
            if mv.name in rec["snapshots"]:
                continue
            known = (rec.get("snapshot_ids") or {}).get(mv.name)
            if known:  # CreateSnapshots answered before a restart; only the per-volume tags are missing
                tags = self._tags(mv.name, event, run, rec.get("boot_id", ""))
                snaps.tag(ec2, [known], {k: tags[k] for k in (snaps.TAG_VOLUME, snaps.TAG_VOLUME_NAME, "Name")})
                rec["snapshots"][mv.name] = known
                self._save(slot, rec)
                continue
            if rec["snapshot_requested"].get(mv.name) or interrupted:
                # requested before a restart: EC2 may not show it (or its tags) for a few seconds
                existing = snaps.find_existing_waiting(ec2, mv.volume_id, notice, min(snaps.FIND_WAIT, budget / 3),
                                                       self.clock)
                if existing:
                    rec["snapshots"][mv.name] = existing
                    self._save(slot, rec)
                    log.info("snapshot of %s already requested before a restart: %s", mv.name, existing)
                    continue
            todo.append(mv)
        warnings: List[str] = []
        wanted = len(todo)
        todo = self._space_snapshots(plan, todo, budget - (time.monotonic() - started), warnings)
        spaced_out = wanted - len(todo)
        if todo and self.config.drain.crash_consistent and len(todo) > 1:
            warnings += self._snapshot_together(todo, event, rec, slot, notice, run, description, budget, started, ec2)
        else:
            for mv in todo:
                left = budget - (time.monotonic() - started)
                try:
                    warnings += self._snapshot_one(mv, event, rec, slot, run, description, max(1.0, left), ec2)
                except Exception as exc:  # noqa: BLE001 - the other volumes still get theirs
                    metrics.SNAPSHOT_FAILURES.labels(volume=mv.name).inc()
                    problems.append(f"{mv.name}: {type(exc).__name__}: {exc}")
        reason = "; ".join(problems + warnings + self._notes)
        if problems:
            return "failed", reason
        if spaced_out and not rec["snapshots"]:
            return "skipped", reason  # left to the S3 upload, for EC2's per-volume snapshot rate
        return "ok", reason

    def _space_snapshots(self, plan: Plan, todo: List[MountedVolume], budget: float,
                         notes: List[str]) -> List[MountedVolume]:
        """EC2's one snapshot per volume per 15 s (a rebalance snapshot just before): wait out the rest
        when it fits, else leave the volume to the S3 upload and say so. Returns the volumes to snapshot."""
        upload = plan.step(UPLOAD)
        s3_follows = bool(self.stores) and upload is not None and not upload.structural_skip
        times = (self.state.get(SECTION, {}) or {}).get("snapshot_times", {}) or {}
        wait, keep = 0.0, []
        for mv in todo:
            d = snaps.plan_spacing(mv.name, times.get(mv.volume_id), self.clock.time(), budget, s3_follows,
                                   spacing=self.config.drain.snapshot_spacing)
            if d.skip:
                notes.append(d.reason)
                continue
            if d.wait > wait:
                wait = d.wait
                if d.reason:
                    notes.append(d.reason)
            keep.append(mv)
        if keep and wait > 0:
            log.info("snapshot: waiting %.1f s for EC2's per-volume snapshot spacing", wait)
            self.progress(f"draining: snapshot waits {wait:.1f} s (EC2: one snapshot per volume per 15 s)")
            self.clock.sleep(wait)
        return keep

    def _snapshot_requested(self, volume_ids: List[str]) -> None:
        """Remember when each volume's CreateSnapshot went out (the next one is spaced from it)."""
        times = dict((self.state.get(SECTION, {}) or {}).get("snapshot_times", {}) or {})
        now = self.clock.time()
        for vid in volume_ids:
            times[vid] = now
        self.state.update(SECTION, snapshot_times=times)

    def _tags(self, mv_name: str, event: Event, run: str, boot: str) -> Dict[str, str]:
        return snaps.snapshot_tags(self.identity.instance_id, mv_name, run, event.kind, event.detected_at, event.key,
                                   boot)

    def _snapshot_one(self, mv: MountedVolume, event: Event, rec: Dict[str, Any], slot: str, run: str,
                      description: str, budget: float, ec2: Any) -> List[str]:
        tags = self._tags(mv.name, event, run, rec.get("boot_id", ""))
        rec["snapshot_requested"][mv.name] = True
        self._save(slot, rec)

        def call() -> str:
            self.timeline.append((f"snapshot-requested:{mv.name}", self.clock.time()))
            self._snapshot_requested([mv.volume_id])
            sid = snaps.create_snapshot(ec2, mv.volume_id, tags, description)
            rec["snapshots"][mv.name] = sid  # saved at once: a crash from here on finds it without a describe
            self._save(slot, rec)
            return sid

        with self._freeze_lock:
            res = frozen_call([(mv.name, mv.mountpoint)], call, runner=self.runner, state=self.state,
                              freeze_timeout=self.config.drain.freeze_timeout, budget=budget,
                              never_freeze=self.config.agent.state_dir)
        self.timeline.append((f"thawed:{mv.name}", self.clock.time()))
        rec["snapshots"][mv.name] = res.value
        rec.setdefault("frozen_seconds", {})[mv.name] = round(res.frozen_seconds, 4)
        rec.setdefault("freeze_breakdown", {})[mv.name] = {
            "freeze": round(res.freeze_seconds, 4), "call": round(res.call_seconds, 4), "thaw": round(res.thaw_seconds, 4)}
        self._save(slot, rec)
        metrics.SNAPSHOTS.labels(volume=mv.name).inc()
        if res.frozen:
            metrics.FREEZE_SECONDS.labels(volume=mv.name).set(res.frozen_seconds)
        log.info("snapshot %s of %s (%s), frozen %.3f s", res.value, mv.name, mv.volume_id, res.frozen_seconds,
                 extra={"journal": {"EVENT_KIND": event.kind, "DRAIN_STEP": SNAPSHOT, "VOLUME": mv.name,
                                    "SNAPSHOT_ID": res.value, "FROZEN_SECONDS": f"{res.frozen_seconds:.4f}"}})
        return [f"{mv.name}: {w}" if not w.startswith(mv.name) else w for w in res.warnings]

    def _snapshot_together(self, todo: List[MountedVolume], event: Event, rec: Dict[str, Any], slot: str,
                           notice: str, run: str, description: str, budget: float, started: float,
                           ec2: Any) -> List[str]:
        ours = [mv.volume_id for mv in todo]
        exclude = [v for v in snaps.attached_volume_ids(ec2, self.identity.instance_id) if v not in ours]
        per_volume = (snaps.TAG_VOLUME, snaps.TAG_VOLUME_NAME, "Name")
        common = {k: v for k, v in self._tags("", event, run, rec.get("boot_id", "")).items() if k not in per_volume}
        for mv in todo:
            rec["snapshot_requested"][mv.name] = True
        self._save(slot, rec)

        def call() -> Dict[str, str]:
            self.timeline.append(("snapshot-requested:*", self.clock.time()))
            self._snapshot_requested(ours)
            got = snaps.create_snapshots(ec2, self.identity.instance_id, ours, exclude, common, description)
            rec["snapshot_ids"] = {mv.name: got[mv.volume_id] for mv in todo if mv.volume_id in got}
            self._save(slot, rec)
            return got

        left = max(1.0, budget - (time.monotonic() - started))
        with self._freeze_lock:
            res = frozen_call([(mv.name, mv.mountpoint) for mv in todo], call, runner=self.runner, state=self.state,
                              freeze_timeout=self.config.drain.freeze_timeout, budget=left,
                              never_freeze=self.config.agent.state_dir)
        self.timeline.append(("thawed:*", self.clock.time()))
        by_volume: Dict[str, str] = res.value or {}
        warnings = list(res.warnings)
        for mv in todo:
            sid = by_volume.get(mv.volume_id)
            if not sid:
                metrics.SNAPSHOT_FAILURES.labels(volume=mv.name).inc()
                warnings.append(f"{mv.name}: CreateSnapshots returned no snapshot for {mv.volume_id}")
                continue
            tags = self._tags(mv.name, event, run, rec.get("boot_id", ""))
            snaps.tag(ec2, [sid], {k: tags[k] for k in per_volume})
            rec["snapshots"][mv.name] = sid
            metrics.SNAPSHOTS.labels(volume=mv.name).inc()
            if res.frozen:
                metrics.FREEZE_SECONDS.labels(volume=mv.name).set(res.frozen_seconds)
            rec.setdefault("frozen_seconds", {})[mv.name] = round(res.frozen_seconds, 4)
        self._save(slot, rec)
        missing = [mv.name for mv in todo if mv.name not in rec["snapshots"]]
        if missing:
            raise RuntimeError("; ".join(warnings))
        return warnings

    def _step_upload(self, plan: Plan, event: Event, rec: Dict[str, Any], slot: str, budget: float,
                     interrupted: bool) -> Tuple[str, str]:
        deadline = self.clock.time() + budget
        errors, notes = [], []
        # The workload confirmed its checkpoint (hooks or process exited, marker written): take every
        # file now, not only those past the settle time, or the checkpoint just written is left out.
        settled = (rec.get("steps", {}).get(WAIT) or {}).get("state") == "ok"
        for i, store in enumerate(self.stores):
            name = self._store_name(i, store)
            if name in rec["checkpoint_ids"]:
                continue
            lock = self._store_locks[i]
            final = slot == "run"
            if final:  # the final upload never waits behind a periodic or early one: it stops it
                getattr(store, "preempt", lambda: False)()
            # the final upload waits (within its budget) for an early one of the same store to end
            if not lock.acquire(timeout=max(0.0, deadline - self.clock.time()) if final else 0):
                errors.append(f"{name}: another upload of this checkpoint was still running")
                continue
            try:
                result = store.upload(deadline=deadline, reason=f"drain:{event.kind}", settled=settled, preempt=final)
            finally:
                lock.release()
            if getattr(result, "committed", False):
                rec["checkpoint_ids"][name] = str(getattr(result, "checkpoint_id", ""))
                self._save(slot, rec)
                notes.append(f"{name}: {result.checkpoint_id} ({getattr(result, 'files', 0)} files, "
                             f"{getattr(result, 'bytes', 0)} bytes)")
            else:
                errors.append(f"{name}: {getattr(result, 'error', '') or 'not committed'}")
        self.timeline.append(("upload-committed" if not errors else "upload-ended", self.clock.time()))
        if errors:
            return "failed", "; ".join(errors + notes)
        return "ok", "; ".join(notes)

    def _step_retention(self, plan: Plan, event: Event, rec: Dict[str, Any], slot: str, budget: float,
                        interrupted: bool) -> Tuple[str, str]:
        end = time.monotonic() + budget
        ec2 = self.clients.budgeted(budget, self.clock, "drain retention").ec2
        deleted: List[str] = []
        for name in sorted(rec["snapshots"]):
            if time.monotonic() >= end:
                return "cut", f"out of time; deleted {len(deleted)}"
            deleted += snaps.apply_retention(ec2, name, self.config.drain.keep_snapshots,
                                             run=self.config.agent.run or self.identity.instance_id)
        return "ok", f"deleted {len(deleted)} old snapshot(s)" if deleted else ""

    def _step_lifecycle(self, plan: Plan, event: Event, rec: Dict[str, Any], slot: str, budget: float,
                        interrupted: bool) -> Tuple[str, str]:
        if rec.get("lifecycle_completed"):
            return "ok", "completed before a restart"
        aws = self.clients.budgeted(budget, self.clock, "drain lifecycle")
        target = self.discover_lifecycle(aws.autoscaling)
        if target is None:
            if self._target_known:
                return "skipped", "not in an Auto Scaling group with a terminating hook"
            return "failed", "Auto Scaling discovery failed"
        if getattr(self, "_beats", None) is not None:
            self._beats.pause()
        attempted_before = bool(rec.get("lifecycle_attempted")) and interrupted
        rec["lifecycle_attempted"] = True
        self._save(slot, rec)
        completed, reason = lc.complete(aws.autoscaling, target, self.identity.instance_id)
        if not completed and attempted_before:
            completed, reason = True, "completed by the interrupted attempt"
        if completed:
            rec["lifecycle_completed"] = True
            self._save(slot, rec)
            metrics.LIFECYCLE_COMPLETIONS.inc()
            self.timeline.append(("lifecycle-completed", self.clock.time()))
            return "ok", reason or f"CONTINUE sent to {target.group}/{target.hook}"
        return "skipped", reason

    # -- helpers -------------------------------------------------------------------------------------
    def _volume_names(self) -> List[str]:
        return snapshot_volume_names(self.config)

    def _store_name(self, index: int, store: Any) -> str:
        name = getattr(store, "name", "") or ""
        if not name and index < len(self.config.checkpoints):
            name = self.config.checkpoints[index].s3
        return name or f"checkpoints[{index}]"

    def _report(self, plan: Plan, rec: Dict[str, Any], resumed: bool) -> DrainReport:
        steps = [StepReport(n, rec["steps"][n]["state"], rec["steps"][n].get("seconds", 0.0),
                            rec["steps"][n].get("reason", "")) for n in plan.names() if n in rec["steps"]]
        ok = all(s.state != "failed" for s in steps if s.name in PERSIST_STEPS)
        return DrainReport(kind=rec["kind"], ok=ok, steps=steps, snapshots=dict(rec["snapshots"]),
                           checkpoint_ids=dict(rec["checkpoint_ids"]),
                           lifecycle_completed=bool(rec.get("lifecycle_completed")),
                           margin_seconds=round(plan.deadline - self.clock.time(), 3), resumed=resumed)

    def _finish_metrics(self, report: DrainReport, slot: str) -> None:
        persisted = [s for s in report.steps if s.name in (SNAPSHOT, UPLOAD)]
        if report.ok:
            result = "success"
        elif any(s.state == "ok" for s in persisted):
            result = "partial"
        else:
            result = "failed"
        metrics.DRAINS.labels(result=result).inc()
        metrics.DRAIN_MARGIN.set(report.margin_seconds)
        if report.ok:
            metrics.DRAIN_LAST_SUCCESS.set(self.clock.time())
        if slot == "run":
            metrics.set_state("drained" if report.ok else "failed")
