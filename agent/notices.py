"""Latching: turn successive IMDS observations into events, each notice exactly once.

Pure and clock-free (the caller passes ``now``), so "a notice whose time moves fires once", "a
canceled maintenance event cancels", and "a 404 after a notice does not un-fire it" are unit tests.
Latched keys are plain strings, persisted by the watcher so a restarted agent does not fire again
what it already handled.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set

from agent.events import ASG_TERMINATION, REBALANCE, SCHEDULED_MAINTENANCE, SPOT_INTERRUPTION, Event
from agent.imds.parse import RebalanceNotice, ScheduledEvent, SpotNotice

# Scheduled codes that end or stop the instance (reboots do not).
TERMINAL_SCHEDULED_CODES = ("instance-stop", "instance-retirement")

# AWS gives a spot notice two minutes ahead; a notice whose time cannot be read gets this much from
# when it was first seen (fail safe: ignoring a notice with a clear action would lose the checkpoint).
SPOT_NOTICE_LEAD = 120.0

# A spot notice that was gone (404) this long and then comes back is a new notice: a hibernated
# instance resumes in the same boot (same boot id, same process), and its next interruption must be
# seen. Its key then carries the notice's own time.
SPOT_REARM_ABSENT = 60.0


class NoticeTracker:
    def __init__(self, latched: Iterable[str] = ()) -> None:
        self.latched: Set[str] = set(latched)
        self.active: Dict[str, Event] = {}
        self._first_seen: Dict[str, float] = {}
        self._spot_absent_since: Optional[float] = None
        self._spot_generation = ""  # "@<notice time>" once a notice came back after being gone

    def _fire(self, event: Event) -> List[Event]:
        self.active[event.key] = event
        if event.key in self.latched:
            return []
        self.latched.add(event.key)
        return [event]

    def spot(self, notice: Optional[SpotNotice], now: float) -> List[Event]:
        """``notice`` None means 404. A notice is identified by its action, not its moving ``time``."""
        if notice is None:
            if self._spot_absent_since is None:
                self._spot_absent_since = now
            return []
        if (self._spot_absent_since is not None and now - self._spot_absent_since >= SPOT_REARM_ABSENT
                and any(k.startswith("spot:") for k in self.latched)):
            self._spot_generation = f"@{int(notice.time if notice.time is not None else now)}"
        self._spot_absent_since = None
        key = f"spot:{notice.action}{self._spot_generation}"
        first_seen = self._first_seen.setdefault(key, now)
        # A bad time: the standard lead from the first sighting, so the deadline does not move per poll.
        deadline = notice.time if notice.time is not None else first_seen + SPOT_NOTICE_LEAD
        # Hibernate may come with no lead time; a time in the past means "now".
        if deadline < now and notice.action == "hibernate":
            deadline = now
        return self._fire(Event(SPOT_INTERRUPTION, notice.action, deadline, key, now, dict(notice.raw)))

    def rebalance(self, notice: Optional[RebalanceNotice], now: float) -> List[Event]:
        if notice is None:
            return []
        return self._fire(Event(REBALANCE, "rebalance", None, "rebalance", now, dict(notice.raw)))

    def scheduled(self, events: List[ScheduledEvent], now: float) -> List[Event]:
        out: List[Event] = []
        for ev in events:
            key = f"scheduled:{ev.event_id}"
            if ev.active:
                out += self._fire(Event(SCHEDULED_MAINTENANCE, ev.code, ev.not_before, key, now, dict(ev.raw)))
            elif key in self.latched and key in self.active and not self.active[key].cancelled:
                cancel = Event(SCHEDULED_MAINTENANCE, ev.code, ev.not_before, key, now, dict(ev.raw), cancelled=True)
                self.active[key] = cancel
                out.append(cancel)
        # An event that vanished from the list is no longer scheduled either.
        present = {f"scheduled:{ev.event_id}" for ev in events}
        for key, ev in list(self.active.items()):
            if key.startswith("scheduled:") and key not in present and not ev.cancelled:
                cancel = Event(ev.kind, ev.action, ev.deadline, key, now, ev.raw, cancelled=True)
                self.active[key] = cancel
                out.append(cancel)
        return out

    def lifecycle(self, state: Optional[str], now: float) -> List[Event]:
        if state != "Terminated":
            return []
        return self._fire(Event(ASG_TERMINATION, "terminate", None, "asg:Terminated", now, {"state": state}))

    def active_events(self) -> List[Event]:
        return [e for e in self.active.values() if not e.cancelled]


def scheduled_is_due(event: Event, now: float, window: float) -> bool:
    """A scheduled stop/retirement drains when it starts within ``window`` seconds."""
    if event.kind != SCHEDULED_MAINTENANCE or event.cancelled:
        return False
    if event.action not in TERMINAL_SCHEDULED_CODES:
        return False
    return event.deadline is None or event.deadline - now <= window
