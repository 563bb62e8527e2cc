"""Typed events: what watchers emit and the supervisor plans from.

An event says *what* is coming (kind, action) and *when* (deadline); the raw notice is kept for the
journal and the hooks. Identity (``key``) is what latching compares: a spot notice whose ``time`` moves
between polls is still the same notice.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

SPOT_INTERRUPTION = "spot-interruption"
REBALANCE = "rebalance-recommendation"
SCHEDULED_MAINTENANCE = "scheduled-maintenance"
ASG_TERMINATION = "asg-termination"
SHUTDOWN = "shutdown"
MANUAL = "manual"

EVENT_KINDS = (SPOT_INTERRUPTION, REBALANCE, SCHEDULED_MAINTENANCE, ASG_TERMINATION, SHUTDOWN, MANUAL)

# Kinds that end the instance, so they run the drain (a scheduled event only when due soon enough).
TERMINAL_KINDS = (SPOT_INTERRUPTION, ASG_TERMINATION, SHUTDOWN, MANUAL)

# journald MESSAGE_ID per kind: stable UUIDs so `journalctl MESSAGE_ID=...` finds every such event.
MESSAGE_IDS = {
    SPOT_INTERRUPTION: "5c0f6e1e8b7d4c6f9a4f1d2a7e3b0c01",
    REBALANCE: "5c0f6e1e8b7d4c6f9a4f1d2a7e3b0c02",
    SCHEDULED_MAINTENANCE: "5c0f6e1e8b7d4c6f9a4f1d2a7e3b0c03",
    ASG_TERMINATION: "5c0f6e1e8b7d4c6f9a4f1d2a7e3b0c04",
    SHUTDOWN: "5c0f6e1e8b7d4c6f9a4f1d2a7e3b0c05",
    MANUAL: "5c0f6e1e8b7d4c6f9a4f1d2a7e3b0c06",
}


@dataclass(frozen=True)
class Event:
    kind: str
    action: str  # terminate | stop | hibernate | reboot | ... ; "" when the kind says it all
    deadline: Optional[float]  # epoch seconds; None when the source gives no time
    key: str  # identity for latching; stable across polls of the same notice
    detected_at: float  # epoch seconds, by the agent's clock
    raw: Dict[str, Any] = field(default_factory=dict, compare=False)
    cancelled: bool = False  # a scheduled event that was canceled/completed, or a notice withdrawn

    @property
    def deadline_iso(self) -> str:
        if self.deadline is None:
            return ""
        return _dt.datetime.fromtimestamp(self.deadline, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def seconds_left(self, now: float) -> Optional[float]:
        return None if self.deadline is None else self.deadline - now

    def to_dict(self) -> Dict[str, Any]:
        return {
            "kind": self.kind,
            "action": self.action,
            "deadline": self.deadline,
            "deadline_iso": self.deadline_iso,
            "key": self.key,
            "detected_at": self.detected_at,
            "cancelled": self.cancelled,
            "raw": self.raw,
        }
