"""Pure parsers for the IMDS notice paths: body text in, typed notice (or a reasoned refusal) out.

Nothing here does I/O, so every odd answer seen in the wild (HTML from a proxy, empty bodies, a time
that is not a time, unknown actions) is a unit test, and the watcher only decides what to do with a
:class:`BadAnswer`: count it, log it, keep polling. Two answers are both a notice and a problem, and
say so in a field rather than by raising: a spot notice with a valid action and a bad ``time``
(``bad_time``: the agent drains anyway, fail safe) and a scheduled event whose strings hold a NUL
(``escaped``: a NUL cannot go into a hook's environment, so it is written as ``\\x00``).
Every parser raises nothing but :class:`BadAnswer`, whatever the body (a property test holds it).
"""

from __future__ import annotations

import calendar
import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

SPOT_ACTIONS = ("terminate", "stop", "hibernate")
SCHEDULED_CODES = ("instance-reboot", "system-reboot", "system-maintenance", "instance-retirement", "instance-stop")
SCHEDULED_DONE_STATES = ("completed", "canceled", "cancelled")
LIFECYCLE_STATES = ("InService", "Terminated", "Detached", "Standby", "Pending", "Warmed:Hibernated",
                    "Warmed:Running", "Warmed:Stopped", "Warmed:Terminated", "Warmed:Pending")


class BadAnswer(ValueError):
    """An answer we could not understand. ``reason`` is a short fixed word for the metrics label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class SpotNotice:
    action: str
    time: Optional[float]  # epoch seconds; None when the answer's time was not a time (see bad_time)
    raw: Dict[str, Any] = field(default_factory=dict, compare=False)
    bad_time: str = ""  # why ``time`` could not be read; the notice still counts (fail safe)


@dataclass(frozen=True)
class RebalanceNotice:
    notice_time: Optional[float]
    raw: Dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ScheduledEvent:
    event_id: str
    code: str
    state: str
    not_before: Optional[float]
    not_after: Optional[float]
    description: str = ""
    raw: Dict[str, Any] = field(default_factory=dict, compare=False)
    escaped: Tuple[str, ...] = ()  # fields that held a NUL, now written as \\x00

    @property
    def active(self) -> bool:
        return self.state.lower() not in SCHEDULED_DONE_STATES


def _snippet(text: str) -> str:
    text = text.strip().replace("\n", " ")
    return text[:60] + ("..." if len(text) > 60 else "")


def _looks_like_html(text: str) -> bool:
    head = text.lstrip()[:100].lower()
    return head.startswith("<!doctype") or head.startswith("<html") or head.startswith("<?xml") or head.startswith("<")


def _json(text: str) -> Any:
    if not text.strip():
        raise BadAnswer("empty", "empty body")
    if _looks_like_html(text):
        raise BadAnswer("html", f"HTML or XML instead of JSON: {_snippet(text)!r}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadAnswer("malformed-json", f"{exc.msg} at char {exc.pos}: {_snippet(text)!r}") from None
    except (ValueError, RecursionError) as exc:
        # An integer of more than 4300 digits (ValueError without .msg), or nesting deeper than the stack.
        raise BadAnswer("malformed-json", f"{type(exc).__name__}: {_snippet(text)!r}") from None


NUL_ESCAPE = "\\x00"


def escape_nul(value: str) -> str:
    """A NUL cannot be passed in argv or the environment (exec refuses it): write it as ``\\x00``."""
    return value.replace("\x00", NUL_ESCAPE)


_ISO = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|[+-]\d{2}:?\d{2})?$")


def parse_iso_time(value: Any) -> float:
    """``2017-09-18T08:22:00Z`` (also with fractions or an offset) -> epoch seconds."""
    if not isinstance(value, str):
        raise BadAnswer("bad-time", f"time is not a string: {value!r}")
    m = _ISO.match(value.strip())
    if not m:
        raise BadAnswer("bad-time", f"not an ISO 8601 time: {value!r}")
    year, month, day, hh, mm, ss = (int(g) for g in m.groups()[:6])
    try:
        base = calendar.timegm(_dt.datetime(year, month, day, hh, mm, ss).timetuple())
    except ValueError:
        raise BadAnswer("bad-time", f"not a valid date: {value!r}") from None
    frac = float(m.group(7)) if m.group(7) else 0.0
    tz = m.group(8)
    offset = 0
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        if int(digits[:2]) > 23 or int(digits[2:]) > 59:
            raise BadAnswer("bad-time", f"not a valid UTC offset: {value!r}")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return _in_range(base + frac - offset, value)


_LATEST = 253402300799.0  # 9999-12-31T23:59:59Z: later would overflow every datetime made from it


def _in_range(epoch: float, value: Any) -> float:
    if not 0 <= epoch <= _LATEST:
        raise BadAnswer("bad-time", f"outside 1970..9999: {value!r}")
    return epoch


_MONTHS = {m: i for i, m in enumerate(["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1)}
_IMDS_DATE = re.compile(r"^(\d{1,2}) ([A-Z][a-z]{2}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT$")


def parse_imds_date(value: Any) -> float:
    """``21 Jan 2019 09:00:43 GMT`` (scheduled events' format) -> epoch seconds."""
    if not isinstance(value, str):
        raise BadAnswer("bad-time", f"date is not a string: {value!r}")
    m = _IMDS_DATE.match(value.strip())
    if not m or m.group(2) not in _MONTHS:
        # Be liberal: an ISO time here is unambiguous too.
        try:
            return parse_iso_time(value)
        except BadAnswer:
            raise BadAnswer("bad-time", f"not a date like '21 Jan 2019 09:00:43 GMT': {value!r}") from None
    day, mon, year, hh, mm, ss = int(m.group(1)), _MONTHS[m.group(2)], int(m.group(3)), int(m.group(4)), int(m.group(5)), int(m.group(6))
    try:
        epoch = float(calendar.timegm(_dt.datetime(year, mon, day, hh, mm, ss).timetuple()))
    except ValueError:
        raise BadAnswer("bad-time", f"not a valid date: {value!r}") from None
    return _in_range(epoch, value)


def parse_instance_action(text: str) -> SpotNotice:
    """``spot/instance-action`` body -> :class:`SpotNotice`."""
    data = _json(text)
    if not isinstance(data, dict):
        raise BadAnswer("malformed-json", f"expected an object, got {type(data).__name__}")
    action = data.get("action")
    if not isinstance(action, str) or action.lower() not in SPOT_ACTIONS:
        raise BadAnswer("unknown-action", f"action {action!r} is not terminate, stop or hibernate")
    try:
        when: Optional[float] = parse_iso_time(data.get("time"))
    except BadAnswer as bad:
        # The action is clear and the instance is going: ignoring it would lose the checkpoint.
        return SpotNotice(action.lower(), None, data, bad_time=bad.detail)
    return SpotNotice(action.lower(), when, data)


def parse_termination_time(text: str) -> Optional[float]:
    """Legacy ``spot/termination-time``: a bare time, or garbage that means nothing (None)."""
    try:
        return parse_iso_time(text.strip())
    except BadAnswer:
        return None


def parse_rebalance(text: str) -> RebalanceNotice:
    data = _json(text)
    if not isinstance(data, dict):
        raise BadAnswer("malformed-json", f"expected an object, got {type(data).__name__}")
    raw_time = data.get("noticeTime")
    notice_time = parse_iso_time(raw_time) if raw_time is not None else None
    return RebalanceNotice(notice_time, data)


def parse_scheduled(text: str) -> List[ScheduledEvent]:
    """``events/maintenance/scheduled``: a JSON array (``[]`` when nothing is scheduled)."""
    data = _json(text)
    if isinstance(data, dict):  # some simulators return a single object
        data = [data]
    if not isinstance(data, list):
        raise BadAnswer("malformed-json", f"expected an array, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise BadAnswer("malformed-json", f"item {i} is not an object")
        code = item.get("Code")
        if not isinstance(code, str) or not code:
            raise BadAnswer("malformed-json", f"item {i} has no Code")
        event_id = item.get("EventId")
        if not isinstance(event_id, str) or not event_id:
            event_id = f"{code}@{item.get('NotBefore', '')}"
        not_before = parse_imds_date(item["NotBefore"]) if item.get("NotBefore") else None
        not_after = parse_imds_date(item["NotAfter"]) if item.get("NotAfter") else None
        state = item.get("State") if isinstance(item.get("State"), str) else "active"
        fields = {"Code": code, "EventId": event_id, "State": state, "Description": str(item.get("Description", ""))}
        escaped = tuple(name for name, value in fields.items() if "\x00" in value)
        clean = {name: escape_nul(value) for name, value in fields.items()}
        out.append(ScheduledEvent(clean["EventId"], clean["Code"], clean["State"], not_before, not_after,
                                  clean["Description"], item, escaped))
    return out


def parse_target_lifecycle_state(text: str) -> str:
    value = text.strip()
    if not value:
        raise BadAnswer("empty", "empty body")
    if _looks_like_html(value):
        raise BadAnswer("html", f"HTML instead of a state: {_snippet(value)!r}")
    if value not in LIFECYCLE_STATES:
        raise BadAnswer("unknown-state", f"unknown target lifecycle state {_snippet(value)!r}")
    return value


def parse_identity_document(text: str) -> Dict[str, Any]:
    data = _json(text)
    if not isinstance(data, dict):
        raise BadAnswer("malformed-json", "identity document is not an object")
    return data
