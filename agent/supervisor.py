"""The supervisor: each event in, a plan out, run off the main loop.

- A terminal event (spot notice, ASG Terminated, the shutdown drain, a manual drain, a scheduled
  stop or retirement that is due) starts the drain, once per termination. A later terminal event
  brings its information to that one drain: its own hooks run (once per kind: the ASG's
  ``Terminated`` a few seconds after the spot notice runs the ASG hooks), and an earlier deadline
  re-plans the running drain (:meth:`Drainer.tighten`).
- A rebalance recommendation runs its hooks and the early plan (by default a checkpoint upload or
  snapshot without stopping the workload).
- A scheduled event that is not yet due runs its hooks and is kept; ``tick`` starts the drain when it
  comes within ``drain.scheduled_window``. Canceled or completed events are dropped.

Without a drainer (a config with hooks only) the drain is the hooks, budgeted to the deadline.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Optional

from agent import metrics
from agent.events import (MESSAGE_IDS, REBALANCE, SCHEDULED_MAINTENANCE, SHUTDOWN, TERMINAL_KINDS, Event)
from agent.hooks import run_hooks
from agent.notices import scheduled_is_due

log = logging.getLogger(__name__)

# A drained termination whose deadline passed this long ago did not end the instance (a hibernated
# instance resumed): a new terminal notice then is a new termination and drains again.
OUTLIVED_GRACE = 120.0


def event_fields(event: Event) -> Dict[str, str]:
    return {
        "MESSAGE_ID": MESSAGE_IDS.get(event.kind, ""),
        "EVENT_KIND": event.kind,
        "EVENT_ACTION": event.action,
        "DEADLINE": "" if event.deadline is None else str(int(event.deadline)),
        "DEADLINE_ISO": event.deadline_iso,
        "EVENT_KEY": event.key,
    }


class Supervisor:
    def __init__(self, config: Any, clock: Any, drainer: Any = None,
                 on_change: Optional[Callable[[], None]] = None) -> None:
        self.config = config
        self.clock = clock
        self.drainer = drainer
        self.on_change = on_change or (lambda: None)
        self.on_drained: Optional[Callable[[Event, Any], None]] = None
        # Kinds whose hooks ran (or were started) for this termination; persisted by the daemon so a
        # restarted agent runs each kind's hooks once per boot.
        self.hook_kinds: List[str] = []
        self.on_hooks: Optional[Callable[[List[str]], None]] = None
        self.notices: Dict[str, Event] = {}
        self.pending_scheduled: Dict[str, Event] = {}
        self.terminal_event: Optional[Event] = None
        self.drain_report: Any = None
        self.drain_error: str = ""
        self._drain_thread: Optional[threading.Thread] = None
        self._workers: List[threading.Thread] = []
        self._lock = threading.RLock()
        self.drain_started = threading.Event()
        self.drain_done = threading.Event()

    # -- views --------------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.drain_started.is_set() and not self.drain_done.is_set()

    @property
    def deadline(self) -> Optional[float]:
        with self._lock:
            times = [e.deadline for e in self.notices.values() if e.deadline is not None and not e.cancelled
                     and (e.kind in TERMINAL_KINDS or e.kind == SCHEDULED_MAINTENANCE)]
        return min(times) if times else None

    def active_notices(self) -> List[Event]:
        with self._lock:
            return [e for e in self.notices.values() if not e.cancelled]

    # -- dispatch -----------------------------------------------------------------------------
    def dispatch(self, event: Event) -> str:
        """Handle one event; returns a word for what was done (logged, and used by tests)."""
        with self._lock:
            first = event.key not in self.notices
            self.notices[event.key] = event
        if event.cancelled:
            return self._cancel(event)
        if first:
            metrics.NOTICES.labels(kind=event.kind).inc()
        metrics.NOTICE_ACTIVE.labels(kind=event.kind).set(1)
        deadline = self.deadline
        metrics.DEADLINE.set(deadline or 0)
        left = event.seconds_left(self.clock.time())
        log.warning("%s notice (%s)%s", event.kind, event.action or "-",
                    f", deadline {event.deadline_iso} ({left:.0f}s left)" if left is not None else "",
                    extra={"journal": event_fields(event)})
        self.on_change()
        if event.kind in TERMINAL_KINDS:
            return self._start_drain(event)
        if event.kind == SCHEDULED_MAINTENANCE:
            if scheduled_is_due(event, self.clock.time(), self.config.drain.scheduled_window):
                return self._start_drain(event)
            with self._lock:
                self.pending_scheduled[event.key] = event
            self._background(f"hooks-{event.kind}", lambda: run_hooks(self.config.hooks, event))
            return "hooks"
        if event.kind == REBALANCE:
            self._background("rebalance", lambda: self._rebalance(event))
            return "early"
        self._background(f"hooks-{event.kind}", lambda: run_hooks(self.config.hooks, event))
        return "hooks"

    def tick(self) -> None:
        """Start the drain for a scheduled event that came due."""
        now = self.clock.time()
        with self._lock:
            due = [e for e in self.pending_scheduled.values() if scheduled_is_due(e, now, self.config.drain.scheduled_window)]
            for e in due:
                del self.pending_scheduled[e.key]
        for e in due:
            self._start_drain(e)

    def _cancel(self, event: Event) -> str:
        with self._lock:
            self.pending_scheduled.pop(event.key, None)
            still = any(e.kind == event.kind and not e.cancelled for e in self.notices.values())
        if not still:
            metrics.NOTICE_ACTIVE.labels(kind=event.kind).set(0)
        metrics.DEADLINE.set(self.deadline or 0)
        log.info("%s %s was %s", event.kind, event.action, event.raw.get("State", "withdrawn"),
                 extra={"journal": event_fields(event)})
        self.on_change()
        return "cancelled"

    def _rebalance(self, event: Event) -> None:
        on_rebalance = getattr(self.drainer, "rebalance_seen", None)  # metrics, Slurm/Ray (agent/fleet, agent/schedulers)
        if on_rebalance is not None and not self.drain_started.is_set():
            on_rebalance(event)
        # rebalance = "drain" runs the whole plan, whose notify step runs the hooks itself.
        if self.drainer is None or self.config.drain.rebalance != "drain":
            run_hooks(self.config.hooks, event)
        if self.drainer is not None and self.config.drain.rebalance != "none" and not self.drain_started.is_set():
            try:
                self.drainer.early(event)
            except Exception:  # noqa: BLE001
                log.exception("early plan for the rebalance recommendation failed")
        self.on_change()

    def mark_drained(self, kind: str, hook_kinds: Optional[List[str]] = None, deadline: Optional[float] = None,
                     key: str = "earlier-run") -> None:
        """This boot's termination was already drained by an earlier run of the agent: never again.
        ``hook_kinds``: the kinds whose hooks already ran for it (each kind's hooks run once)."""
        with self._lock:
            self.terminal_event = Event(kind, "", deadline, key, self.clock.time(), {})
            self.drain_started.set()
            self.drain_done.set()
            self.drain_report = _HooksReport(kind, True, [])
            self.hook_kinds = sorted(set(hook_kinds or []) | {kind})
        metrics.set_state("drained")

    def _claim_hooks(self, kind: str) -> bool:
        """True the first time ``kind``'s hooks are due for this termination."""
        with self._lock:
            if kind in self.hook_kinds:
                return False
            self.hook_kinds.append(kind)
            kinds = list(self.hook_kinds)
        if self.on_hooks is not None:
            self.on_hooks(kinds)
        return True

    def _join_drain(self, event: Event) -> str:
        """A terminal event after the drain started: its hooks (once per kind) and its deadline."""
        running = not self.drain_done.is_set()
        log.info("drain already %s for %s; %s noted", "running" if running else "done",
                 self.terminal_event.kind if self.terminal_event else "?", event.kind)
        if running and event.deadline is not None and self.drainer is not None and hasattr(self.drainer, "tighten"):
            if self.drainer.tighten(event):
                log.warning("%s moves the deadline to %s: the running drain is re-planned", event.kind,
                            event.deadline_iso, extra={"journal": event_fields(event)})
        if self._claim_hooks(event.kind):
            left = event.seconds_left(self.clock.time())
            if left is None and self.deadline is not None:
                left = self.deadline - self.clock.time()
            budget = None if left is None else max(1.0, left - self.config.drain.margin)
            self._background(f"hooks-{event.kind}", lambda: run_hooks(self.config.hooks, event, budget))
            return "hooks"
        return "already-draining"

    def _outlived(self, event: Event) -> bool:
        """The drained termination did not happen: its deadline is long past and we are still here."""
        prev = self.terminal_event
        return (self.drain_done.is_set() and prev is not None and prev.deadline is not None
                and event.key != prev.key and self.clock.time() > prev.deadline + OUTLIVED_GRACE)

    def _start_drain(self, event: Event) -> str:
        with self._lock:
            if self._outlived(event):
                log.warning("the instance outlived the %s drained at %s: %s is a new termination",
                            self.terminal_event.kind if self.terminal_event else "?",
                            self.terminal_event.deadline_iso if self.terminal_event else "?", event.kind)
                self.drain_started.clear()
                self.drain_done.clear()
                self.hook_kinds, self.drain_report, self.drain_error = [], None, ""
            if self.drain_started.is_set():
                joined = True
            else:
                joined = False
                self.terminal_event = event
                self.drain_started.set()
        if joined:
            return self._join_drain(event)
        self._claim_hooks(event.kind)  # the drain's notify step runs this kind's hooks
        metrics.set_state("draining")
        self.on_change()
        self._drain_thread = threading.Thread(target=self._drain, args=(event,), name="drain", daemon=True)
        self._drain_thread.start()
        return "drain"

    def _drain(self, event: Event) -> None:
        try:
            if self.drainer is not None:
                self.drain_report = self.drainer.run(event)
            else:
                self.drain_report = self._hooks_only_drain(event)
            ok = bool(getattr(self.drain_report, "ok", True))
            metrics.set_state("drained" if ok else "failed")
        except Exception as exc:  # noqa: BLE001 - a failed drain must still be reported
            self.drain_error = f"{type(exc).__name__}: {exc}"
            log.exception("drain failed", extra={"journal": event_fields(event)})
            metrics.set_state("failed")
        finally:
            self.drain_done.set()
            if self.on_drained is not None:
                self.on_drained(event, self.drain_report)
            self.on_change()

    def _hooks_only_drain(self, event: Event) -> Any:
        budget = None
        left = event.seconds_left(self.clock.time())
        if left is not None:
            budget = max(1.0, left - self.config.drain.margin)
        results = run_hooks(self.config.hooks, event, budget)
        ok = all(r.ok for r in results)
        metrics.DRAINS.labels(result="success" if ok else "failed").inc()
        if ok:
            metrics.DRAIN_LAST_SUCCESS.set(self.clock.time())
        return _HooksReport(event.kind, ok, results)

    def _background(self, name: str, fn: Callable[[], Any]) -> None:
        def wrapped() -> None:
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("%s failed", name)

        t = threading.Thread(target=wrapped, name=name, daemon=True)
        t.start()
        self._workers = [w for w in self._workers if w.is_alive()] + [t]

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the drain (if one started) and background work; True when all finished."""
        ok = True
        if self._drain_thread is not None:
            self._drain_thread.join(timeout)
            ok = not self._drain_thread.is_alive()
        for t in list(self._workers):
            t.join(0 if not ok else timeout)
        return ok


class _HooksReport:
    def __init__(self, kind: str, ok: bool, hooks: list) -> None:
        self.kind = kind
        self.ok = ok
        self.hooks = hooks
        self.steps: list = []

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "ok": self.ok, "hooks": [h.__dict__ for h in self.hooks]}


def shutdown_event(now: float, budget: float) -> Event:
    return Event(SHUTDOWN, "shutdown", now + budget, "shutdown", now, {"signal": "SIGTERM"})
