"""Build the drain plan from a notice: which steps run, in what order, with how many seconds each.

Pure: (event, config, now, shutdown budget) in, :class:`Plan` out. The rules, in order of priority:

1. The persistence steps (snapshot, S3 upload, lifecycle completion) each keep a reserve that no
   earlier step may spend, so a slow workload can never starve the snapshot.
2. ``margin`` seconds before the deadline are kept free; when the reserves do not fit before the
   margin, persistence may use the margin (never the early steps).
3. The early steps (notify, wait) get what is left, each capped by its configured timeout; a step that
   cannot get all it asked for is *cut* (runs shorter), one that gets nothing is *skipped*, and the
   reason says which reserve took the time.
4. A hibernate notice may come with no lead time, so the snapshot goes first; the workload is told
   afterwards (its memory survives hibernation).
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from agent.config import Config, DrainSection
from agent.drain import profiles
from agent.drain.model import (LIFECYCLE, NOTIFY, NOTIFY_MIN, REQUEUE, RETENTION, SCHEDULER, SNAPSHOT, UPLOAD, WAIT, Plan,
                              Step)
from agent.events import REBALANCE, Event

DEFAULT_SHUTDOWN_BUDGET = 90.0  # systemd's DefaultTimeoutStopSec


def snapshot_volume_names(config: Config) -> List[str]:
    """The configured volumes the drain snapshots: EBS, writable, not multi-attach, opted in."""
    return [v.name for v in config.volumes
            if v.snapshot_on_drain and not v.instance_store and not v.multi_attach and not v.read_only]


def wait_conditions(config: Config, event_kind: str) -> List[str]:
    """What "the checkpoint is written" means for this config (agent.drain.profiles): hooks, process,
    marker, commit, ack; all must hold, or one with ``complete_mode = "any"``."""
    return profiles.for_config(config, event_kind).conditions


def notify_targets(config: Config, event_kind: str) -> List[str]:
    wl = config.drain.workload
    r = profiles.for_config(config, event_kind)
    out = []
    if wl.unit:
        out.append(f"{r.signal} to unit {wl.unit} (kill-whom={r.kill_whom})")
    if wl.pidfile:
        out.append(f"{r.signal} to the process in {wl.pidfile}" + (" and its descendants" if r.kill_whom == "all" else ""))
    n = sum(1 for h in config.hooks if event_kind in h.on)
    if n:
        out.append(f"{n} hook{'s' if n > 1 else ''}")
    if wl.webhook is not None:
        out.append(f"POST {wl.webhook.url}")
    return out


def build_plan(event: Event, config: Config, now: float, shutdown_budget: float, *,
               volumes: Optional[Sequence[str]] = None, stores: Optional[Sequence[str]] = None,
               lifecycle: Optional[bool] = None, early: bool = False, schedulers: Sequence[str] = ()) -> Plan:
    """The plan for ``event`` as of ``now`` (epoch seconds).

    ``volumes``/``stores`` name what is actually there (mounted volumes, checkpoint stores); by default
    they come from the config. ``lifecycle`` says whether the instance is in a group with a
    terminating hook (None: whenever ``[drain.lifecycle] enabled``). ``early`` builds the rebalance
    plan (``[drain] rebalance``). ``schedulers`` names the job schedulers acting on this node
    ("slurm", "ray"; see agent/schedulers): they add the ``scheduler`` and ``requeue`` steps.
    """
    d = config.drain
    if volumes is None:
        volumes = snapshot_volume_names(config)
    if stores is None:
        stores = [ck.s3 for ck in config.checkpoints]
    if lifecycle is None:
        lifecycle = d.lifecycle.enabled
    lifecycle = bool(lifecycle) and d.lifecycle.enabled

    if early or event.kind == REBALANCE:
        return _early_plan(event, config, now, list(volumes), list(stores))
    return _terminal_plan(event, config, now, shutdown_budget, list(volumes), list(stores), lifecycle, list(schedulers))


def _terminal_plan(event: Event, config: Config, now: float, shutdown_budget: float, volumes: List[str],
                   stores: List[str], lifecycle: bool, schedulers: Sequence[str] = ()) -> Plan:
    d = config.drain
    notes: List[str] = []
    if event.deadline is not None:
        deadline, source = event.deadline, "notice"
    else:
        deadline, source = now + shutdown_budget, f"shutdown budget {shutdown_budget:g} s"
    margin = d.margin

    targets = notify_targets(config, event.kind)
    waits = wait_conditions(config, event.kind)
    sched, requeue = _scheduler_steps(config, schedulers)
    if "slurm" in schedulers and config.slurm.commit_file:
        waits = waits + ["slurm-commits"]
    # Signals and starting hooks take milliseconds; only a webhook's retries need the whole notify budget.
    notify_wanted = (d.notify_timeout if d.workload.webhook is not None else min(1.0, d.notify_timeout)) if targets else 0.0
    notify = Step(NOTIFY, notify_wanted, 0.0, detail="; ".join(targets) or "nothing to notify")
    wait = Step(WAIT, d.workload.checkpoint_timeout if waits else 0.0, 0.0,
                detail=("until " + _waits_text(waits, config)) if waits else "nothing to wait for")
    snap = Step(SNAPSHOT, d.snapshot_reserve, 0.0, persist=True, reserve=d.snapshot_reserve,
                detail=_snapshot_text(list(volumes), d))
    upload = Step(UPLOAD, d.upload_reserve, 0.0, persist=True, reserve=d.upload_reserve,
                  detail=(f"final incremental upload + manifest: {', '.join(stores)}" if stores else "no S3 checkpoints"))
    retention = Step(RETENTION, 0.0, 0.0, detail=f"keep the last {d.keep_snapshots} snapshots per volume (ours only)")
    life = Step(LIFECYCLE, d.lifecycle_reserve, 0.0, persist=True, reserve=d.lifecycle_reserve,
                detail=("CompleteLifecycleAction CONTINUE" + (f" ({d.lifecycle.group}/{d.lifecycle.hook})" if d.lifecycle.group else "")
                        + f", heartbeats every {d.lifecycle.heartbeat_interval:g} s") if lifecycle else ("[drain.lifecycle] enabled = false" if not d.lifecycle.enabled
                                   else "not in an Auto Scaling group with a terminating hook"))

    for step, missing in ((snap, not volumes), (upload, not stores), (life, not lifecycle)):
        if missing:
            _skip(step, step.detail)
    if not volumes:
        _skip(retention, "no volumes to snapshot")
    for step in (notify, wait):
        if step.wanted <= 0:
            _skip(step, step.detail if step.name == WAIT or not targets else f"{step.name}_timeout is 0")

    notes.extend(f"workload: {n}" for n in profiles.for_config(config, event.kind).notes)
    if event.action == "hibernate":
        order = [snap, upload, notify, wait, retention, life]
        notes.append("hibernate: the instance may stop with no lead time, so the snapshot goes first")
    else:
        order = [notify, wait, snap, upload, retention, life]
    if sched is not None and event.action != "hibernate":
        order.insert(0, sched)
        if requeue is not None:
            order.insert(order.index(upload) + 1, requeue)

    total = deadline - now
    usable = max(0.0, total - margin)
    reserve = sum(s.reserve for s in order if s.persist and s.state != "skipped")
    early_time = max(0.0, usable - reserve)
    early_steps = [s for s in order if s.name in (SCHEDULER, NOTIFY, WAIT)]
    for step in early_steps:
        if step.state == "skipped":
            continue
        step.budget = min(step.wanted, early_time)
        if step is notify and step.budget < min(step.wanted, NOTIFY_MIN):
            # A signal costs milliseconds: notify always happens, and what follows is cut instead.
            step.budget = min(step.wanted, NOTIFY_MIN)
            step.for_time = True
            step.state = "cut"
            step.reason = (f"only {max(0.0, early_time):.1f} s before the {reserve:.1f} s reserved for persistence: "
                           f"notify still runs ({step.budget:.1f} s), the steps after it are cut")
            early_time = 0.0
            continue
        early_time -= step.budget
        if step.budget <= 0:
            _skip(step, f"no time: {usable:.1f} s usable and {reserve:.1f} s reserved for persistence")
            step.for_time = True
        elif step.budget < step.wanted:
            step.for_time = True
            step.state = "cut"
            step.reason = f"cut to {step.budget:.1f} s of {step.wanted:.1f} s: {reserve:.1f} s reserved for persistence"
    spent = sum(s.budget for s in early_steps)
    left = usable - spent
    if REQUEUE in [s.name for s in order] and requeue is not None:
        requeue.budget = min(requeue.wanted, max(0.0, left - reserve))
        if requeue.budget < requeue.wanted:
            requeue.for_time = True
            requeue.reason = "runs with the time left after the upload"
    if left < reserve:
        left = min(reserve, max(0.0, total - spent))
        if reserve:
            notes.append(f"only {max(0.0, usable - spent):.1f} s before the margin: persistence may use the margin")
    persist = [s for s in order if s.persist and s.state != "skipped"]
    for step in persist:
        step.budget = min(step.reserve, left)
        left -= step.budget
        if step.budget < step.reserve:
            step.state = "cut"
            step.for_time = True
            step.reason = (f"only {step.budget:.1f} s of its {step.reserve:.1f} s reserve fit; "
                           f"it still gets at least 1 s when it starts")
    slack_to = upload if upload.state != "skipped" else snap if snap.state != "skipped" else None
    if slack_to is not None and left > 0:
        slack_to.budget += left
        left = 0.0
    if retention.state != "skipped":
        retention.budget = min(5.0, left)
        retention.detail += "; only with time to spare"

    return Plan(event.kind, event.action, event.key, now, deadline, source, margin, order, notes)


def _scheduler_steps(config: Config, schedulers: Sequence[str]) -> Tuple[Optional[Step], Optional[Step]]:
    """The ``scheduler`` step (and ``requeue`` with ``[slurm] requeue = true``) when a job scheduler acts here."""
    if not schedulers:
        return None, None
    wanted = (2 * config.slurm.command_timeout if "slurm" in schedulers else 0.0) + \
        (config.ray.command_timeout if "ray" in schedulers else 0.0)
    parts = []
    if "slurm" in schedulers:
        parts.append(f"slurm: State=DRAIN, scancel --signal={config.slurm.signal.replace('SIG', '')} --full each job here")
    if "ray" in schedulers:
        parts.append("ray drain-node (preemption, seconds left)")
    sched = Step(SCHEDULER, wanted, 0.0, detail="; ".join(parts))
    requeue = None
    if "slurm" in schedulers and config.slurm.requeue:
        requeue = Step(REQUEUE, config.slurm.command_timeout, 0.0, detail="scontrol requeue each signalled job")
    return sched, requeue


def _early_plan(event: Event, config: Config, now: float, volumes: List[str], stores: List[str]) -> Plan:
    d = config.drain
    deadline = now + d.rebalance_budget
    if d.rebalance == "drain":
        plan = _terminal_plan(Event(event.kind, event.action, deadline, event.key, event.detected_at, event.raw),
                              config, now, d.rebalance_budget, volumes, stores, False)
        plan.deadline_source = f"rebalance budget {d.rebalance_budget:g} s"
        plan.notes.append("rebalance = \"drain\": the whole drain, but the lifecycle action is left alone")
        return plan
    snap = Step(SNAPSHOT, d.rebalance_budget, 0.0, persist=True, reserve=0.0, detail=_snapshot_text(volumes, d))
    upload = Step(UPLOAD, d.rebalance_budget, 0.0, persist=True, reserve=0.0,
                  detail=(f"early incremental upload + manifest: {', '.join(stores)}" if stores else "no S3 checkpoints"))
    retention = Step(RETENTION, 0.0, 0.0, detail=f"keep the last {d.keep_snapshots} snapshots per volume (ours only)")
    plan = Plan(event.kind, event.action, event.key, now, deadline, f"rebalance budget {d.rebalance_budget:g} s", 0.0,
                [snap, upload, retention], [])
    if d.rebalance == "none":
        for s in plan.steps:
            _skip(s, "[drain] rebalance = \"none\"")
        return plan
    plan.notes.append("rebalance = \"checkpoint\": an early checkpoint; the workload keeps running")
    if not volumes:
        _skip(snap, snap.detail)
        _skip(retention, "no volumes to snapshot")
    if not stores:
        _skip(upload, upload.detail)
    for s in (snap, upload):
        if s.state != "skipped":
            s.budget = d.rebalance_budget
    if retention.state != "skipped":
        retention.budget = 5.0
    return plan


def _skip(step: Step, reason: str) -> None:
    step.state = "skipped"
    step.reason = reason
    step.budget = 0.0


def _waits_text(waits: List[str], config: Config) -> str:
    """The workload's conditions joined as the profile's mode says; the Slurm commits always too."""
    own = [_wait_text(w, config) for w in waits if w != "slurm-commits"]
    text = (" or " if profiles.for_config(config).mode == "any" else " and ").join(own)
    if "slurm-commits" in waits:
        text = " and ".join(([f"({text})" if len(own) > 1 else text] if own else []) + [_wait_text("slurm-commits", config)])
    return text


def _wait_text(cond: str, config: Config) -> str:
    wl = config.drain.workload
    if cond == "marker":
        return f"{wl.marker} appears"
    if cond == "slurm-commits":
        return f"every node of each job writes {config.slurm.commit_file}"
    if cond == "process":
        return f"the {'unit ' + wl.unit if wl.unit else 'pidfile process'} exits"
    if cond == "commit":
        r = profiles.for_config(config)
        return f"a step in {r.commit_dir} commits with {r.commit_file}"
    if cond == "ack":
        return "the job's helper acknowledges its checkpoint"
    return "the hooks exit"


def _snapshot_text(volumes: List[str], d: DrainSection) -> str:
    if not volumes:
        return "no volumes to snapshot"
    how = "CreateSnapshots (crash-consistent)" if d.crash_consistent and len(volumes) > 1 else "CreateSnapshot"
    return f"sync, fsfreeze, {how}, thaw: {', '.join(volumes)}"


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_timeout_stop(text: str) -> Optional[float]:
    """Seconds from ``systemctl show -p TimeoutStopUSec`` output ("TimeoutStopUSec=1min 30s"); None if
    infinite, empty or unparsable (the caller then falls back to systemd's default)."""
    value = text.strip().split("=", 1)[-1].strip()
    if not value or value == "infinity":
        return None
    total = 0.0
    pos = 0
    value = value.replace(" ", "")
    while pos < len(value):
        m = _SPAN.match(value, pos)
        if not m or m.end() == pos:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total if total > 0 else None
