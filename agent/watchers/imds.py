"""The IMDS watcher: polls the notice paths on a schedule and emits each notice once.

``spot/instance-action`` is polled every ``poll_interval`` (1 s by default: a notice gives ~120 s, and
detection latency is the one thing we cannot win back later); the other paths every
``slow_poll_interval``. At defaults that is 1 + 3/5 = 1.6 requests/s over one keep-alive connection,
plus a token PUT every few hours. Errors back off with jitter up to ``backoff_max``; a 403 (IMDS
disabled) is reported and re-checked every 30 s, never answered by falling back to IMDSv1.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, List, Optional, Set

from agent import metrics
from agent.backoff import Backoff
from agent.clock import SYSTEM_CLOCK, Clock
from agent.config import IMDSSection
from agent.events import Event
from agent.imds import parse
from agent.imds.client import IMDSClient, IMDSDisabled, IMDSError
from agent.notices import SPOT_NOTICE_LEAD, NoticeTracker
from agent.watchers.base import Emit

log = logging.getLogger(__name__)

SPOT = "/latest/meta-data/spot/instance-action"
REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
SCHEDULED = "/latest/meta-data/events/maintenance/scheduled"
LIFECYCLE = "/latest/meta-data/autoscaling/target-lifecycle-state"
DISABLED_RECHECK = 30.0


class IMDSWatcher:
    name = "imds"

    def __init__(self, client: IMDSClient, section: IMDSSection, clock: Clock = SYSTEM_CLOCK,
                 latched: Optional[List[str]] = None,
                 on_latch: Optional[Callable[[List[str]], None]] = None,
                 on_health: Optional[Callable[[Dict[str, object]], None]] = None) -> None:
        self.client = client
        self.section = section
        self.clock = clock
        self.tracker = NoticeTracker(latched or [])
        self.on_latch = on_latch
        self.on_health = on_health
        self.backoff = Backoff(base=min(0.25, section.poll_interval), cap=section.backoff_max)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._emit: Optional[Emit] = None
        self.disabled = False
        self.last_success = 0.0
        self.bad_answers = 0
        self._last_bad: Dict[str, str] = {}
        self._nul_logged: Set[str] = set()
        self.polls = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, emit: Emit) -> None:
        self._emit = emit
        self._thread = threading.Thread(target=self._loop, name="imds-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- one poll of one path (also used directly by tests) ------------------------------------
    def poll(self, path: str) -> List[Event]:
        now = self.clock.time()
        answer = self.client.get(path)
        text = answer.text if answer.found else None
        still_bad = False
        try:
            if path == SPOT:
                notice = parse.parse_instance_action(text) if text is not None else None
                if notice is not None and notice.bad_time:
                    still_bad = True
                    self._bad_answer(path, parse.BadAnswer("bad-time", notice.bad_time),
                                     f"draining anyway with the standard {SPOT_NOTICE_LEAD:g} s deadline from when "
                                     f"it was first seen")
                events = self.tracker.spot(notice, now)
            elif path == REBALANCE:
                events = self.tracker.rebalance(parse.parse_rebalance(text) if text is not None else None, now)
            elif path == SCHEDULED:
                scheduled = parse.parse_scheduled(text) if text is not None else []
                self._nul_fields(path, scheduled)
                events = self.tracker.scheduled(scheduled, now)
            elif path == LIFECYCLE:
                events = self.tracker.lifecycle(parse.parse_target_lifecycle_state(text) if text is not None else None, now)
            else:
                raise ValueError(path)
        except parse.BadAnswer as bad:
            self._bad_answer(path, bad)
            return []
        if not still_bad:
            self._last_bad.pop(path, None)
        return events

    def _bad_answer(self, path: str, bad: parse.BadAnswer, handled: str = "") -> None:
        label = path.split("/latest/meta-data/", 1)[-1]
        metrics.IMDS_BAD_ANSWERS.labels(path=label, reason=bad.reason).inc()
        self.bad_answers += 1
        # Log the first of a run of the same problem, not one line a second.
        if self._last_bad.get(path) != bad.reason:
            log.warning("IMDS %s: %s (%s)", label, f"bad answer, {handled}" if handled else "ignoring a bad answer", bad,
                        extra={"journal": {"IMDS_PATH": label, "REASON": bad.reason}})
            self._last_bad[path] = bad.reason

    def _nul_fields(self, path: str, events: List[parse.ScheduledEvent]) -> None:
        """Count and log, once per event, the strings that held a NUL: they reach hooks escaped."""
        label = path.split("/latest/meta-data/", 1)[-1]
        for ev in events:
            if ev.escaped and ev.event_id not in self._nul_logged:
                self._nul_logged.add(ev.event_id)
                metrics.IMDS_NUL_FIELDS.labels(path=label).inc(len(ev.escaped))
                log.warning("IMDS %s: %s of event %s held a NUL byte; passed on as \\x00", label,
                            ", ".join(ev.escaped), ev.event_id, extra={"journal": {"IMDS_PATH": label, "REASON": "nul"}})

    # -- the schedule -------------------------------------------------------------------------
    def _loop(self) -> None:
        slow = self.section.slow_poll_interval
        start = self.clock.monotonic()
        # Stagger the slow paths so requests do not bunch up.
        due = {SPOT: start, REBALANCE: start, SCHEDULED: start + slow / 3, LIFECYCLE: start + 2 * slow / 3}
        order = [SPOT, REBALANCE, SCHEDULED, LIFECYCLE]
        while not self._stop.is_set():
            now = self.clock.monotonic()
            for path in order:
                if due[path] > now or self._stop.is_set():
                    continue
                delay = self._poll_once(path)
                if delay is not None:
                    # Throttled or failing: push every path back, IMDS limits are per instance.
                    resume = self.clock.monotonic() + delay
                    for p in due:
                        due[p] = max(due[p], resume)
                    break
                # Read the interval each time: `systemctl reload` may have changed it.
                step = self.section.poll_interval if path == SPOT else self.section.slow_poll_interval
                due[path] = max(due[path] + step, self.clock.monotonic())
            wait = min(due.values()) - self.clock.monotonic()
            if wait > 0 and self.clock.sleep(wait, self._stop):
                break

    def _poll_once(self, path: str) -> Optional[float]:
        """Poll; return a delay to back off for, or None on success."""
        self.polls += 1
        try:
            events = self.poll(path)
        except IMDSDisabled as exc:
            if not self.disabled:
                log.error("%s", exc, extra={"journal": {"IMDS_DISABLED": "1"}})
            self.disabled = True
            metrics.IMDS_DISABLED.set(1)
            self._health()
            return DISABLED_RECHECK
        except IMDSError as exc:
            delay = self.backoff.next_delay()
            level = logging.WARNING if self.backoff.failures in (1, 5) or self.backoff.failures % 30 == 0 else logging.DEBUG
            log.log(level, "IMDS request failed (%s); retrying in %.2fs", exc, delay,
                    extra={"journal": {"REASON": exc.reason}})
            self._health()
            return delay
        except Exception:  # noqa: BLE001 - the watcher must never die
            log.exception("IMDS watcher: unexpected error polling %s", path)
            return self.backoff.next_delay()
        if self.disabled:
            log.warning("IMDS answers again")
        self.disabled = False
        metrics.IMDS_DISABLED.set(0)
        if self.backoff.failing:
            log.info("IMDS recovered after %d failed requests", self.backoff.failures)
        self.backoff.reset()
        self.last_success = self.clock.time()
        metrics.IMDS_LAST_SUCCESS.set(self.last_success)
        if events:
            if self.on_latch is not None:
                self.on_latch(sorted(self.tracker.latched))
            for event in events:
                assert self._emit is not None
                self._emit(event)
        self._health()
        return None

    def _health(self) -> None:
        if self.on_health is not None:
            self.on_health({"up": not self.backoff.failing and not self.disabled, "disabled": self.disabled,
                            "last_success": self.last_success})
