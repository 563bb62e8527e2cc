"""The demo's story: a spot training job loses its instance and carries on on the next one.

First instance: boot -> checkpoint volume created and mounted -> dataset pre-warmed from S3 -> READY
-> training -> rebalance recommendation (early checkpoint) -> spot notice -> the drain (workload told,
final checkpoint, frozen-fs snapshot, S3 checkpoint, lifecycle action completed) -> terminated.
Second instance (the group's replacement): boot -> checkpoint volume restored from the newest
snapshot (and the newest S3 checkpoint, where the build has a checkpoint store) -> training resumes
from the saved step.

:func:`run_story` returns plain data (the timeline, the drain, the checks and the summary); the CLI
prints it and the e2e tests assert on it. Everything it starts is stopped in ``finally``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from agent.demo.agent_config import DemoSettings
from agent.demo.environment import (BUCKET, CHECKPOINT_PREFIX, DATASET_PREFIX, GROUP, HOOK, DemoEnvironment,
                                    tree_hashes)
from agent.demo.instance import SimInstance
from agent.demo.timeline import TEXT_HEADER, Timeline, format_mark

_PROGRESS = re.compile(r": \d+% of ")


def s3_checkpoints_unavailable() -> str:
    """Why this build cannot use S3 checkpoints ("" when it can)."""
    try:
        import agent.transfer.checkpoints  # noqa: F401
    except ImportError as exc:
        return f"agent.transfer.checkpoints cannot be imported: {exc}"
    return ""


def s3_checkpoints_available() -> bool:
    return not s3_checkpoints_unavailable()


@dataclass
class StoryOptions:
    workdir: str = ""
    keep: bool = False
    settings: DemoSettings = field(default_factory=DemoSettings)
    block_devices: Optional[bool] = None
    aws: Any = None  # a running LocalAWS to share (the tests); None: the demo starts its own
    aws_mode: str = "strict"  # the one it starts: "strict" (agent.sim.strict) or "instant" (plain moto)
    progress: Callable[[str], None] = lambda line: None


@dataclass
class Check:
    name: str
    ok: Optional[bool]  # None: does not apply to this run (said in detail)
    detail: str

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def boot_marks(messages: List[Tuple[float, str]], ready_at: float) -> List[Tuple[float, str, float]]:
    """(epoch, status line, seconds until the next line) for the daemon's boot, from its STATUS= lines.

    Pre-warm progress lines are folded into the line that started the pre-warm.
    """
    out: List[Tuple[float, str]] = []
    for at, line in messages:
        if at > ready_at or not line.startswith("STATUS="):
            continue
        text = line[len("STATUS="):]
        if _PROGRESS.search(text) or text.startswith(("ready", "draining", "drain ")) or text == "starting":
            continue
        if out and out[-1][1] == text:
            continue
        out.append((at, text))
    marks = []
    for i, (at, text) in enumerate(out):
        end = out[i + 1][0] if i + 1 < len(out) else ready_at
        marks.append((at, text, max(0.0, end - at)))
    return marks


_DRAINING = re.compile(r"^STATUS=draining: (\w+) \(")


def step_starts(messages: List[Tuple[float, str]], since: float, until: Optional[float] = None) -> Dict[str, float]:
    """When each drain step started, from the daemon's ``STATUS=draining: STEP (...)`` lines (the
    state file keeps only each finished step's duration)."""
    out: Dict[str, float] = {}
    for at, line in messages:
        if at < since or (until is not None and at > until):
            continue
        m = _DRAINING.match(line)
        if m and m.group(1) not in out:
            out[m.group(1)] = at
    return out


def drain_steps(rec: Dict[str, Any], messages: Optional[List[Tuple[float, str]]] = None,
                until: Optional[float] = None) -> List[Dict[str, Any]]:
    """The drain record's steps in the order they ran, each with its start (epoch) and duration.

    Starts come from the notify messages when given; otherwise (and for skipped steps, which send no
    status) each step starts where the one before it ended.
    """
    plan_order = [s["name"] for s in (rec.get("plan") or {}).get("steps", [])]
    steps = rec.get("steps") or {}
    cursor = float(rec.get("started") or 0.0)
    starts = step_starts(messages or [], cursor - 0.5, until)
    out = []
    for name in plan_order:
        entry = steps.get(name)
        if entry is None:
            continue
        start = float(entry.get("started_at") or starts.get(name) or cursor)
        seconds = float(entry.get("seconds") or 0.0)
        out.append({"name": name, "state": entry.get("state", ""), "start": start, "seconds": seconds,
                    "budget": entry.get("budget"), "reason": entry.get("reason", "")})
        cursor = max(cursor, start + seconds)
    return out


def describe_step(step: Dict[str, Any], early: bool = False) -> str:
    reason = step.get("reason") or ""
    what = {
        "notify": "told the workload to checkpoint",
        "wait": "waited for the workload's final checkpoint",
        "snapshot": "fsfreeze + CreateSnapshot + thaw of the checkpoint volume",
        "upload": ("early" if early else "final") + " S3 checkpoint upload + commit",
        "retention": "old snapshots past [drain] keep_snapshots deleted",
        "lifecycle": "CompleteLifecycleAction",
    }.get(step["name"], step["name"])
    return f"{'' if early else 'drain '}{step['name']}: {what}" + (f" ({reason})" if reason else "")


class Story:
    """One run of the story; ``result`` fills in as it goes, so a failure still reports what happened."""

    def __init__(self, options: StoryOptions) -> None:
        self.options = options
        self.settings = options.settings
        self.env = DemoEnvironment(workdir=options.workdir, block_devices=options.block_devices, aws=options.aws,
                                   aws_mode=options.aws_mode,
                                   keep=options.keep)
        self.t0 = time.time()
        self.timeline = Timeline(self.t0)
        self.instances: List[SimInstance] = []
        self.checks: List[Check] = []
        self.result: Dict[str, Any] = {"ok": False, "error": ""}
        s3 = self.settings.s3_checkpoints
        self.s3_checkpoints = s3_checkpoints_available() if s3 is None else bool(s3)

    # ---- helpers --------------------------------------------------------------------------------

    def say(self, lane: str, what: str, at: Optional[float] = None, seconds: Optional[float] = None,
            state: str = "") -> None:
        at = time.time() if at is None else at
        mark = self.timeline.add(at, lane, what, seconds, state)
        self.options.progress(format_mark(mark, self.t0))

    def check(self, name: str, ok: Optional[bool], detail: str) -> Check:
        c = Check(name, ok, detail)
        self.checks.append(c)
        return c

    # ---- the story ------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        try:
            self._run()
            self.result["ok"] = all(c.ok is not False for c in self.checks)
        except KeyboardInterrupt:
            self.result["error"] = "interrupted (Ctrl-C)"
            raise
        except Exception as exc:  # noqa: BLE001 - reported, then the cleanup runs
            self.result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            self.close()
            self.result.update(self._data())
        return self.result

    def close(self) -> None:
        """Stop every process, release every mount and loop device; a second Ctrl-C cannot cut it short."""
        import signal
        import threading

        main = threading.current_thread() is threading.main_thread()
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            for inst in self.instances:
                inst.close()
            self.env.close()
            self.result["cleanup"] = list(self.env.cleanup_log)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _run(self) -> None:
        s = self.settings
        env = self.env.start()
        self.result["workdir"] = env.workdir
        self.result["simulated"] = env.simulated(self.s3_checkpoints)
        why_not = s3_checkpoints_unavailable() if self.settings.s3_checkpoints is None else ""
        if why_not:
            self.result["simulated"].append(f"S3 checkpoints: OFF in this demo ({why_not})")
        self.result["block_devices"] = bool(env.block_devices)
        self.result["s3_checkpoints"] = self.s3_checkpoints
        self.options.progress("what is simulated:")
        for line in self.result["simulated"]:
            self.options.progress(f"  - {line}")
        self.options.progress("")
        self.options.progress(TEXT_HEADER)
        hashes = env.seed_dataset()
        first_id = env.create_group()
        self.say("cloud", f"s3://{BUCKET}/{DATASET_PREFIX}: {len(hashes)} files, {env.dataset_size() / 1e6:.1f} MB; "
                          f"Auto Scaling group {GROUP} with terminating hook {HOOK}")

        # -- the first instance ------------------------------------------------------------------
        one = self._instance("instance-1", first_id)
        self._boot(one)
        one.start_workload()
        self.say(one.name, f"trainer started at step {one.resumed_step()}, checkpoint every "
                           f"{s.checkpoint_every} steps to {one.paths.checkpoint_dir}")
        one.wait_step(max(1, s.train_steps_before_notice // 2))
        one.imds.control("rebalance", {})
        self.say("cloud", "IMDS: rebalance recommendation (the instance is at elevated risk)")
        if s.rebalance != "none":
            early = one.wait_drain("early", timeout=30)
            for step in drain_steps(early, one.agent.notify.snapshot(), until=time.time()):
                if step["state"] != "skipped":
                    self.say(one.name, "early checkpoint, workload keeps running: " + describe_step(step, early=True),
                             at=step["start"], seconds=step["seconds"], state=step["state"])
        one.wait_step(s.train_steps_before_notice)
        notice_at = time.time()
        deadline = notice_at + s.notice_window
        one.imds.control("spot", {"action": "terminate", "time": deadline})
        self.say("cloud", f"IMDS: spot interruption notice, terminate in {s.notice_window:g} s "
                          f"(simulated window; AWS gives 120 s)", at=notice_at)
        rec = one.wait_drain("run", timeout=s.notice_window + 20)
        drained_at = time.time()
        detected = float((rec.get("event") or {}).get("detected_at") or notice_at)
        deadline = float((rec.get("event") or {}).get("deadline") or deadline)  # IMDS gives whole seconds
        self.say(one.name, f"agent saw the notice {detected - notice_at:.2f} s after IMDS showed it", at=detected)
        steps = drain_steps(rec, one.agent.notify.snapshot())
        for step in steps:
            self.say("drain", describe_step(step), at=step["start"], seconds=step["seconds"], state=step["state"])
        report = rec.get("report") or {}
        final_step = one.final_step()
        saved = tree_hashes(one.paths.checkpoint_dir)
        self.result["drain"] = {
            "kind": rec.get("kind"), "ok": report.get("ok"), "window": s.notice_window, "notice_at": notice_at,
            "detected_at": detected, "started_at": rec.get("started"), "deadline": deadline,
            "finished_at": max([st["start"] + st["seconds"] for st in steps] or [drained_at]),
            "margin_seconds": report.get("margin_seconds"), "steps": steps,
            "snapshots": report.get("snapshots", {}), "checkpoint_ids": report.get("checkpoint_ids", {}),
            "lifecycle_completed": report.get("lifecycle_completed"), "final_step": final_step,
            "frozen_seconds": rec.get("frozen_seconds", {}),
        }
        replacement = one.power_off()
        gone = "processes stopped, volume unmounted and detached" if env.block_devices else "processes stopped"
        self.say(one.name, f"instance terminated ({self.result['drain']['margin_seconds'] or 0:.1f} s before "
                           f"the deadline): {gone}")

        # -- the second instance -----------------------------------------------------------------
        two = self._instance("instance-2", replacement or "")
        self.say(two.name, f"{two.instance_id} launched by {GROUP} as the replacement")
        self._boot(two)
        restored = tree_hashes(two.paths.checkpoint_dir)
        vol = two.volume_record()
        status = two.status()
        restored_id = (status.get("last_checkpoint") or {}).get("checkpoint_id") or ""
        if restored_id:
            self.say(two.name, f"restored S3 checkpoint {restored_id} before READY (files already on the volume "
                               "are kept when their checksums match)")
        two.start_workload()
        resumed = two.resumed_step()
        self.say(two.name, f"trainer resumed at step {resumed}" + (f" (the drain saved step {final_step})"
                                                                   if final_step is not None else ""))
        two.wait_step((resumed or 0) + s.checkpoint_every, timeout=30)
        self.say(two.name, f"training goes on: step {two.current_step()} checkpointed")
        two.stop_processes(kill_agent=True)  # the demo ends here; no drain for instance-2
        self.result["resume"] = {
            "instance_id": two.instance_id, "resumed_step": resumed, "volume_snapshot": vol.get("snapshot_id", ""),
            "volume_id": vol.get("volume_id", ""), "last_checkpoint": status.get("last_checkpoint"),
            "s3_checkpoint": restored_id,
        }
        self.result["checkpoint_files"] = {"saved": saved, "restored": restored}
        self.result["dataset_dirs"] = {one.name: one.paths.data_dir, two.name: two.paths.data_dir}
        self._checks(one, two, hashes, saved, restored, final_step, resumed)

    def _instance(self, name: str, instance_id: str) -> SimInstance:
        inst = SimInstance(self.env, name, instance_id, self.settings, s3_checkpoints=self.s3_checkpoints)
        self.instances.append(inst)
        return inst

    def _boot(self, inst: SimInstance) -> None:
        started = time.time()
        self.say(inst.name, f"boot: `spot-agent run` on {inst.instance_id} (spot, IMDS {inst.imds.url})", at=started)
        ready = inst.boot(timeout=90)
        for at, text, secs in boot_marks(inst.agent.notify.snapshot(), ready):
            self.say(inst.name, f"agent: {text}", at=at, seconds=secs)
        self.say(inst.name, f"READY ({ready - started:.1f} s after start)", at=ready)
        self.result.setdefault("boot", {})[inst.name] = {"instance_id": inst.instance_id,
                                                         "ready_seconds": round(ready - started, 3)}

    def _checks(self, one: SimInstance, two: SimInstance, hashes: Dict[str, str], saved: Dict[str, str],
                restored: Dict[str, str], final_step: Optional[int], resumed: Optional[int]) -> None:
        from agent.sim.localaws import lifecycle_calls

        env = self.env
        for inst in (one, two):
            got = tree_hashes(inst.paths.data_dir)
            bad = sorted(k for k in hashes if got.get(k) != hashes[k])
            self.check(f"dataset sha256 on {inst.name}", not bad and len(got) == len(hashes),
                       f"{len(hashes)} files match" if not bad else f"mismatch: {', '.join(bad)}")
        drain = self.result.get("drain") or {}
        self.check("drain completed", bool(drain.get("ok")), f"{drain.get('kind')}: "
                   + ", ".join(f"{s['name']}={s['state']}" for s in drain.get("steps", [])))
        margin = drain.get("margin_seconds")
        self.check("drain finished before the deadline", margin is not None and margin > 0,
                   f"{margin:.1f} s to spare" if margin is not None else "no margin reported")
        self.check("final checkpoint written", final_step is not None and final_step > 0,
                   f"step {final_step}")
        can_resume = bool(env.block_devices) or self.s3_checkpoints
        missing = sorted(k for k in saved if restored.get(k) != saved[k])
        if can_resume:
            self.check("checkpoint sha256 after restore", bool(saved) and not missing,
                       f"{len(saved)} checkpoint files identical on {two.name}" if saved and not missing
                       else f"not restored or different: {', '.join(missing[:5]) or 'nothing saved'}")
            self.check("resumed step > 0", resumed is not None and resumed > 0 and resumed == final_step,
                       f"resumed at {resumed}, drain saved {final_step}")
        else:
            self.check("checkpoint sha256 after restore", None, "nothing restores it in this run (see below)")
            self.check("resumed step > 0", None, "no block devices and no S3 checkpoint store in this build: "
                                                 "nothing can carry the checkpoint to the next instance")
        if env.block_devices:
            per_drain = len(env.snapshots("spot-interruption"))
            self.check("exactly one snapshot per drain", per_drain == 1,
                       f"{per_drain} snapshot(s) for the spot drain, {len(env.snapshots('rebalance-recommendation'))} "
                       "for the rebalance checkpoint")
            vol_snap = (self.result.get("resume") or {}).get("volume_snapshot")
            spot_snap = (drain.get("snapshots") or {}).get("ckpt")
            self.check("volume restored from the newest snapshot", bool(spot_snap) and vol_snap == spot_snap,
                       f"{two.name}'s volume from {vol_snap or 'nothing'}; the drain took {spot_snap}")
        else:
            self.check("exactly one snapshot per drain", None, "no block devices: no snapshots")
        if env.strict:
            refused = env.refused_calls("SnapshotCreationPerVolumeRateExceeded")
            self.check("snapshot spacing planned (strict EC2)", not refused,
                       "no CreateSnapshot refused for EC2's one-per-volume-per-15-s rate" if not refused
                       else f"{len(refused)} CreateSnapshot call(s) refused with SnapshotCreationPerVolumeRateExceeded")
        completes = [c for c in lifecycle_calls("CompleteLifecycleAction") if c.get("instance_id") == one.instance_id]
        self.check("lifecycle action completed once", len(completes) == 1 and completes[0].get("result") == "CONTINUE",
                   f"{len(completes)} CompleteLifecycleAction call(s) for {one.instance_id}")
        if self.s3_checkpoints:
            ids = drain.get("checkpoint_ids") or {}
            self.check("S3 checkpoint committed", bool(ids), ", ".join(f"{k}: {v}" for k, v in ids.items()) or "none")
            got = (self.result.get("resume") or {}).get("s3_checkpoint")
            self.check("newest S3 checkpoint restored", bool(got) and got in ids.values(),
                       f"{two.name} restored {got or 'nothing'}")
            self.result["s3_checkpoint_keys"] = len(env.s3_keys(CHECKPOINT_PREFIX))

    def _data(self) -> Dict[str, Any]:
        drain = self.result.get("drain") or {}
        resume = self.result.get("resume") or {}
        summary = {
            "dataset": {"files": len(self.env.dataset_hashes), "bytes": self.env.dataset_size(),
                        "sha256_match": self._check_ok("dataset sha256")},
            "checkpoint": {"step": drain.get("final_step"), "snapshots": drain.get("snapshots", {}),
                           "frozen_seconds": drain.get("frozen_seconds", {}),
                           "s3_checkpoint_ids": drain.get("checkpoint_ids", {})},
            "seconds_to_spare": drain.get("margin_seconds"),
            "notice_window": self.settings.notice_window,
            "resumed_step": resume.get("resumed_step"),
            "resume_possible": bool(self.env.block_devices) or self.s3_checkpoints,
            "restored_from_snapshot": resume.get("volume_snapshot", ""),
            "restored_s3_checkpoint": resume.get("s3_checkpoint", ""),
            "lifecycle_completed": drain.get("lifecycle_completed"),
        }
        return {"summary": summary, "timeline": self.timeline.to_list(), "checks": [c.to_dict() for c in self.checks],
                "seconds": round(time.time() - self.t0, 2), "started_at": self.t0,
                "instances": [{"name": i.name, "instance_id": i.instance_id, "config": i.paths.config,
                               "agent_log": i.paths.agent_log} for i in self.instances]}

    def _check_ok(self, prefix: str) -> Optional[bool]:
        found = [c.ok for c in self.checks if c.name.startswith(prefix)]
        return all(found) if found else None


def run_story(options: StoryOptions) -> Dict[str, Any]:
    return Story(options).run()
