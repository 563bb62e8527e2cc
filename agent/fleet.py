"""The Auto Scaling group's side of an instance's life: the launch hook and what rebalances lead to.

- **Launch hook.** A group with an ``autoscaling:EC2_INSTANCE_LAUNCHING`` hook keeps a new instance in
  ``Pending:Wait`` until told. The agent heartbeats that action while its startup runs (volumes,
  restore, a long pre-warm), completes it with CONTINUE when it is READY (volumes up, checkpoint
  restored, datasets warm), so the group counts the instance in service only when it can train, and
  with ABANDON when startup fails. Once per boot; "no active action" (an agent restarted after READY,
  or no launch pending) is not an error.
- **Rebalance outcomes.** A fleet owner needs to know whether rebalance recommendations are followed
  by interruptions, and how soon: the time from the first rebalance recommendation to the
  interruption (``spot_agent_rebalance_to_interruption_seconds``), or "none followed" within
  ``[fleet] rebalance_window`` (``spot_agent_rebalance_outcomes_total{outcome}``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from agent import metrics
from agent.drain import lifecycle as lc
from agent.drain.freeze import boot_id
from agent.events import ASG_TERMINATION, SPOT_INTERRUPTION

log = logging.getLogger(__name__)

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
SECTION = "fleet"
INTERRUPTIONS = (SPOT_INTERRUPTION, ASG_TERMINATION)


CALL_BUDGET = 20.0  # seconds each discovery or completion may retry through throttling (agent.aws.Budgeted)


class LaunchHook:
    def __init__(self, fleet: Any, group: str, autoscaling: Any, instance_id: str, state: Any,
                 budgeted: Optional[Callable[[float], Any]] = None) -> None:
        self.fleet = fleet
        self.group = group
        self.autoscaling = autoscaling
        # the Auto Scaling client with its calls retried for a few seconds (Clients.budgeted); heartbeats retry on their own
        self._budgeted = budgeted or (lambda seconds: autoscaling)
        self.instance_id = instance_id
        self.state = state
        self.target: Optional[lc.LifecycleTarget] = None
        self._beats: Optional[lc.Heartbeats] = None
        self._done = False
        self._stopped = False
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "LaunchHook":
        """Find the launching hook and heartbeat its action while startup runs; in the background, so
        a slow or unreachable Auto Scaling endpoint never delays READY."""
        if not self.fleet.launch_lifecycle or self.autoscaling is None or not self.instance_id:
            return self
        rec = self.state.get(SECTION, {}) or {}
        if rec.get("launch_boot") == boot_id() and rec.get("launch_result"):
            self._done = True  # this boot's launch action was answered by an earlier run of the agent
            return self
        self._thread = threading.Thread(target=self._discover, name="launch-hook", daemon=True)
        self._thread.start()
        return self

    def _discover(self) -> None:
        try:
            target = lc.discover(self._budgeted(CALL_BUDGET), self.instance_id, self.group, self.fleet.launch_hook,
                                 transition=LAUNCHING)
        except Exception as exc:  # noqa: BLE001 - no launch hook answer is not a reason to stop starting
            log.warning("launch lifecycle hook discovery failed: %s", exc)
            return
        with self._lock:
            self.target = target
            if target is None or self._stopped:
                return
            log.info("launch lifecycle hook %s/%s: heartbeats every %gs until READY", target.group, target.hook,
                     self.fleet.launch_heartbeat_interval)
            self._beats = lc.Heartbeats(self.autoscaling, target, self.instance_id,
                                        self.fleet.launch_heartbeat_interval).start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            beats, self._beats = self._beats, None
        if beats is not None:
            beats.stop()

    def finish(self, result: str, why: str = "", wait: float = CALL_BUDGET + 5) -> bool:
        """CONTINUE (READY) or ABANDON (startup failed), once; True when Auto Scaling took it. Waits up
        to ``wait`` seconds for the discovery still running (it retries within its own budget)."""
        if self._thread is not None:
            self._thread.join(wait)
        self.stop()
        if self._done or self.target is None:
            return False
        self._done = True
        try:
            completed, reason = lc.complete(self._budgeted(CALL_BUDGET), self.target, self.instance_id, result=result)
        except Exception as exc:  # noqa: BLE001 - the group's hook timeout decides then
            log.error("launch lifecycle action %s failed: %s", result, exc)
            return False
        self.state.update(SECTION, launch_boot=boot_id(), launch_result=result)
        if completed:
            metrics.LAUNCH_ACTIONS.labels(result=result.lower()).inc()
            log.info("launch lifecycle action completed: %s%s", result, f" ({why})" if why else "")
        else:
            log.info("launch lifecycle action %s not sent: %s", result, reason)
        return completed


class RebalanceTracker:
    """Time from the first rebalance recommendation to the interruption, or "none followed"."""

    def __init__(self, state: Any, clock: Any, window: float) -> None:
        self.state = state
        self.clock = clock
        self.window = window
        self._timer: Optional[threading.Timer] = None
        self._lock = threading.Lock()
        at = (self.state.get(SECTION, {}) or {}).get("rebalance_at")
        if at:
            self._arm(self.window - (self.clock.time() - float(at)))

    def rebalance(self) -> None:
        with self._lock:
            if (self.state.get(SECTION, {}) or {}).get("rebalance_at"):
                return  # the first recommendation counts; later ones are the same episode
            self.state.update(SECTION, rebalance_at=self.clock.time())
            self._arm(self.window)

    def interrupted(self, kind: str) -> Optional[float]:
        """A terminal event: the seconds since the rebalance when it was an interruption, else None."""
        with self._lock:
            at = (self.state.get(SECTION, {}) or {}).get("rebalance_at")
            if not at or kind not in INTERRUPTIONS:
                return None
            self._cancel()
            lead = max(0.0, self.clock.time() - float(at))
            self.state.update(SECTION, rebalance_at=None, last_rebalance_lead=lead)
        metrics.REBALANCE_TO_INTERRUPTION.observe(lead)
        metrics.REBALANCE_OUTCOMES.labels(outcome="interrupted").inc()
        log.info("interruption %.0f s after the rebalance recommendation", lead)
        return lead

    def expire(self) -> bool:
        with self._lock:
            if not (self.state.get(SECTION, {}) or {}).get("rebalance_at"):
                return False
            self.state.update(SECTION, rebalance_at=None)
        metrics.REBALANCE_OUTCOMES.labels(outcome="none_followed").inc()
        log.info("no interruption followed the rebalance recommendation within %g s", self.window)
        return True

    def _arm(self, after: float) -> None:
        self._cancel()
        self._timer = threading.Timer(max(0.0, after), self.expire)
        self._timer.daemon = True
        self._timer.start()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._cancel()
