"""The drain's data: the plan and its report, plain so the planner stays pure and the report persists.

A plan is fixed when the notice arrives (for ``--dry-run`` and the journal), but the executor asks the
plan for each step's budget again when the step starts (:meth:`Plan.budget_at`): time an early step did
not use flows on to the next one, while the reserves of the persistence steps still ahead are never
handed out.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional

NOTIFY = "notify"
WAIT = "wait"
SNAPSHOT = "snapshot"
UPLOAD = "upload"
RETENTION = "retention"
LIFECYCLE = "lifecycle"
SCHEDULER = "scheduler"  # Slurm/Ray: drain the node, signal the job on all its nodes (agent/schedulers)
REQUEUE = "requeue"  # Slurm: requeue the signalled jobs once the checkpoint is persisted

STEP_NAMES = (SCHEDULER, NOTIFY, WAIT, SNAPSHOT, UPLOAD, REQUEUE, RETENTION, LIFECYCLE)
PERSIST_STEPS = (SNAPSHOT, UPLOAD, LIFECYCLE)

# A persistence step past its deadline still gets this long: AWS's deadline is approximate, and a
# snapshot request that reaches EC2 a second late is better than none.
MIN_PERSIST_BUDGET = 1.0
# Retention is housekeeping: it only runs when this much time is free beyond the later reserves.
RETENTION_BUDGET = 5.0
RETENTION_MIN = 1.0
# Signalling the workload and starting its hooks takes milliseconds: notify is never skipped for lack
# of time, it gets at least this long (or what it asked for, if less); the steps after it are cut.
NOTIFY_MIN = 1.0


@dataclass
class Step:
    name: str
    wanted: float  # what the config asks for (early steps) or the reserve (persistence steps)
    budget: float  # seconds planned when the notice arrived
    persist: bool = False
    reserve: float = 0.0
    state: str = "planned"  # planned | cut | skipped
    reason: str = ""
    detail: str = ""
    for_time: bool = False  # skipped or cut only for lack of time: reconsidered when the step comes up

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def structural_skip(self) -> bool:
        """Skipped because there is nothing to do (not for lack of time)."""
        return self.state == "skipped" and not self.for_time


@dataclass
class Plan:
    kind: str
    action: str
    key: str
    now: float  # epoch seconds the plan was built at
    deadline: float  # epoch seconds the instance is expected to go
    deadline_source: str  # "notice" | "shutdown budget" | "rebalance budget" | "--deadline-in"
    margin: float
    steps: List[Step] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def step(self, name: str) -> Optional[Step]:
        for s in self.steps:
            if s.name == name:
                return s
        return None

    def names(self) -> List[str]:
        return [s.name for s in self.steps]

    def budget_at(self, name: str, now: float, done: Iterable[str] = ()) -> float:
        """Seconds the step ``name`` may take if it starts at ``now``.

        Every step gets the time left before ``deadline - margin`` minus the reserves of the
        persistence steps after it that have not run yet. Early steps are capped by what they asked
        for; a persistence step whose share ran out may still use the margin, and the later steps' reserves,
        up to its own reserve (the earlier persistence step has priority), and never gets less than
        :data:`MIN_PERSIST_BUDGET`.
        """
        done = set(done)
        step = self.step(name)
        if step is None or step.structural_skip:
            return 0.0
        index = self.steps.index(step)
        later = sum(s.reserve for s in self.steps[index + 1:] if s.persist and not s.structural_skip and s.name not in done)
        soft = self.deadline - self.margin - now - later
        if not step.persist:
            cap = RETENTION_BUDGET if step.name == RETENTION else step.wanted
            if step.name == NOTIFY:
                return max(min(cap, NOTIFY_MIN), min(cap, soft))
            return max(0.0, min(cap, soft))
        hard = min(step.reserve, self.deadline - now)  # a shortage is taken from the later steps
        return max(MIN_PERSIST_BUDGET, soft, hard)

    def render(self) -> str:
        total = self.deadline - self.now
        lines = [f"drain plan for {self.kind}" + (f" ({self.action})" if self.action else "")]
        lines.append(f"  deadline {_iso(self.deadline)} ({self.deadline_source}): {total:.1f} s from now, "
                     f"margin {self.margin:.1f} s, {max(0.0, total - self.margin):.1f} s usable")
        reserve = sum(s.reserve for s in self.steps if s.persist and s.state != "skipped")
        if reserve:
            parts = ", ".join(f"{s.name} {s.reserve:.1f}" for s in self.steps if s.persist and s.state != "skipped")
            lines.append(f"  reserved for persistence: {reserve:.1f} s ({parts})")
        for n, s in enumerate(self.steps, 1):
            budget = "-" if s.state == "skipped" else ("spare" if s.name == RETENTION and s.budget <= 0
                                                       else f"{s.budget:6.1f} s")
            line = f"  {n}. {s.name:<10} {budget:>8}  {s.state:<8} {s.detail}"
            lines.append(line.rstrip())
            if s.reason and s.reason != s.detail:
                lines.append(f"     {'':<10} {'':>8}  -> {s.reason}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "kind": self.kind, "action": self.action, "key": self.key, "now": self.now,
            "deadline": self.deadline, "deadline_source": self.deadline_source, "margin": self.margin,
            "steps": [s.to_dict() for s in self.steps], "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Plan":
        steps = [Step(**s) for s in data.get("steps", [])]
        return cls(data["kind"], data.get("action", ""), data.get("key", ""), data["now"], data["deadline"],
                   data.get("deadline_source", ""), data.get("margin", 0.0), steps, list(data.get("notes", [])))


@dataclass
class StepReport:
    name: str
    state: str  # ok | skipped | cut | failed
    seconds: float = 0.0
    reason: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class DrainReport:
    kind: str
    ok: bool
    steps: List[StepReport] = field(default_factory=list)
    snapshots: Dict[str, str] = field(default_factory=dict)  # volume name -> snapshot id
    checkpoint_ids: Dict[str, str] = field(default_factory=dict)  # checkpoint store name -> checkpoint id
    lifecycle_completed: bool = False
    margin_seconds: float = 0.0  # seconds before the deadline when the drain finished
    resumed: bool = False

    def step(self, name: str) -> Optional[StepReport]:
        for s in self.steps:
            if s.name == name:
                return s
        return None

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DrainReport":
        return cls(
            kind=data["kind"], ok=bool(data["ok"]), steps=[StepReport(**s) for s in data.get("steps", [])],
            snapshots=dict(data.get("snapshots", {})), checkpoint_ids=dict(data.get("checkpoint_ids", {})),
            lifecycle_completed=bool(data.get("lifecycle_completed", False)),
            margin_seconds=float(data.get("margin_seconds", 0.0)), resumed=bool(data.get("resumed", False)),
        )

    def summary(self) -> str:
        steps = " ".join(f"{s.name}={s.state}" for s in self.steps)
        return (f"drain {self.kind}: {'ok' if self.ok else 'INCOMPLETE'}; {steps}; "
                f"{len(self.snapshots)} snapshot(s), {len(self.checkpoint_ids)} checkpoint(s), "
                f"lifecycle {'completed' if self.lifecycle_completed else 'not completed'}, "
                f"{self.margin_seconds:.1f} s to spare")


def _iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
