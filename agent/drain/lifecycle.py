"""The Auto Scaling side of the drain: find our group and terminating hook, heartbeat, complete once.

Discovery (two describe calls) happens when the drainer is built, not after the notice. Heartbeats
keep the lifecycle action alive while a long drain runs; CONTINUE is sent once, at the end, because it
tells Auto Scaling it may terminate the instance now.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional, Tuple

log = logging.getLogger(__name__)

TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"


@dataclass(frozen=True)
class LifecycleTarget:
    group: str
    hook: str


def discover(autoscaling: Any, instance_id: str, group: str = "", hook: str = "",
             transition: str = TERMINATING) -> Optional[LifecycleTarget]:
    """Our group and its terminating hook (or the ``transition`` one; configured names win); None when there is none."""
    if group and hook:
        return LifecycleTarget(group, hook)
    if not group:
        resp = autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])
        found = [i for i in resp.get("AutoScalingInstances", []) if i.get("InstanceId") == instance_id]
        if not found:
            return None
        group = found[0]["AutoScalingGroupName"]
    if not hook:
        resp = autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=group)
        hooks = sorted((h for h in resp.get("LifecycleHooks", []) if h.get("LifecycleTransition") == transition),
                       key=lambda h: h["LifecycleHookName"])
        if not hooks:
            return None
        if len(hooks) > 1:
            log.warning("group %s has %d %s hooks; completing %s (set the hook name to choose)",
                        group, len(hooks), transition.rsplit("_", 1)[-1].lower(), hooks[0]["LifecycleHookName"])
        hook = hooks[0]["LifecycleHookName"]
    return LifecycleTarget(group, hook)


def _no_action(exc: Exception) -> bool:
    return "No active Lifecycle Action" in str(exc)


def complete(autoscaling: Any, target: LifecycleTarget, instance_id: str, result: str = "CONTINUE") -> Tuple[bool, str]:
    """CompleteLifecycleAction CONTINUE (or ABANDON). (completed, reason). "No active action" is not an
    error: the action was completed by an earlier attempt, or Auto Scaling is not waiting for us."""
    try:
        autoscaling.complete_lifecycle_action(AutoScalingGroupName=target.group, LifecycleHookName=target.hook,
                                              InstanceId=instance_id, LifecycleActionResult=result)
        return True, ""
    except Exception as exc:  # noqa: BLE001 - botocore ClientError and connection errors alike
        if _no_action(exc):
            return False, "no lifecycle action is pending for this instance"
        raise


class Heartbeats:
    """RecordLifecycleActionHeartbeat now and every ``interval`` seconds until stopped.

    Each heartbeat restarts the hook's timeout, so a drain longer than HeartbeatTimeout keeps its
    lifecycle action. A throttled heartbeat is retried (jittered) within half an interval; stopping
    ends the retries at once, so no heartbeat goes out after the drain.
    """

    def __init__(self, autoscaling: Any, target: LifecycleTarget, instance_id: str, interval: float,
                 clock: Any = None) -> None:
        from agent.clock import SYSTEM_CLOCK

        self._as = autoscaling
        self._target = target
        self._instance = instance_id
        self._interval = interval
        self._clock = clock or SYSTEM_CLOCK
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lifecycle-heartbeat", daemon=True)
        self.sent = 0
        self.failed = 0

    def start(self) -> "Heartbeats":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def pause(self) -> None:
        """No heartbeat starts from now on (CompleteLifecycleAction is about to go; a heartbeat after it
        only meets "No active Lifecycle Action"). Does not wait for one in flight."""
        self._stop.set()

    def _beat(self) -> None:
        from agent.aws import error_code, retry_after
        from agent.backoff import Backoff

        backoff = Backoff(base=0.2, cap=2.0)
        end = self._clock.monotonic() + max(0.5, self._interval / 2)
        while not self._stop.is_set():
            try:
                self._as.record_lifecycle_action_heartbeat(AutoScalingGroupName=self._target.group,
                                                           LifecycleHookName=self._target.hook,
                                                           InstanceId=self._instance)
                self.sent += 1
                return
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat only shortens the hook's timeout
                wait = retry_after(exc)
                delay = max(wait or 0.0, backoff.next_delay())
                if wait is None or self._clock.monotonic() + delay >= end:
                    self.failed += 1
                    level = logging.WARNING if _no_action(exc) else logging.DEBUG
                    log.log(level, "lifecycle heartbeat failed: %s", error_code(exc) or exc)
                    return
                self._stop.wait(delay)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._beat()
            if self._stop.wait(self._interval):
                return
