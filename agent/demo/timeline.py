"""What happened when: marks recorded during the demo, rendered as text and as an SVG (stdlib only).

Pure: a :class:`Timeline` is plain data (epoch times, lanes, durations); the renderers turn it and
the demo's summary into text or an SVG document. Offsets are seconds since the demo started.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class Mark:
    at: float  # epoch seconds
    lane: str  # "cloud", "instance-1", "drain", "instance-2", ...
    what: str
    seconds: Optional[float] = None  # how long it took, for a step
    state: str = ""  # a drain step's outcome: ok, cut, skipped, failed

    def to_dict(self, t0: float) -> Dict[str, Any]:
        d = asdict(self)
        d["t"] = round(self.at - t0, 3)
        d["at"] = round(self.at, 3)
        if self.seconds is not None:
            d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class Timeline:
    t0: float
    marks: List[Mark] = field(default_factory=list)

    def add(self, at: float, lane: str, what: str, seconds: Optional[float] = None, state: str = "") -> Mark:
        mark = Mark(at, lane, what, seconds, state)
        self.marks.append(mark)
        return mark

    def ordered(self) -> List[Mark]:
        return sorted(self.marks, key=lambda m: m.at)

    def to_list(self) -> List[Dict[str, Any]]:
        return [m.to_dict(self.t0) for m in self.ordered()]


def fmt_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    if seconds < 0.1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def render_text(timeline: Timeline, width: int = 100) -> str:
    lanes = sorted({m.lane for m in timeline.marks}, key=len)
    lane_w = max([len(lane) for lane in lanes] + [5])
    lines = []
    for m in timeline.ordered():
        offset = f"+{m.at - timeline.t0:5.1f}s"
        took = fmt_seconds(m.seconds)
        state = f"[{m.state}] " if m.state else ""
        text = f"{state}{m.what}"
        room = width - len(offset) - lane_w - 4 - (len(took) + 2 if took else 0)
        if len(text) > room > 10:
            text = text[: room - 1] + "…"
        line = f"  {offset}  {m.lane:<{lane_w}}  {text}"
        if took:
            line = f"{line:<{width - len(took)}}{took}"
        lines.append(line.rstrip())
    return "\n".join(lines)


# ---- SVG ----------------------------------------------------------------------------------------

_COLORS = {"ok": "#2e7d32", "cut": "#f9a825", "skipped": "#9e9e9e", "failed": "#c62828", "": "#1565c0"}


def render_svg(drain: Dict[str, Any], title: str = "spot-agent drain") -> str:
    """The drain as a Gantt chart: one bar per step on a time axis from the notice to the deadline.

    ``drain`` is the demo's drain data: ``notice_at``, ``deadline``, ``finished_at`` (epochs) and
    ``steps`` (``name``, ``state``, ``start``, ``seconds``, ``reason``).
    """
    steps = list(drain.get("steps") or [])
    notice = float(drain.get("notice_at") or (steps[0]["start"] if steps else 0.0))
    deadline = float(drain.get("deadline") or notice + 1.0)
    finished = float(drain.get("finished_at") or deadline)
    span = max(deadline - notice, finished - notice, 1.0)
    left, right, top, row = 150, 40, 70, 34
    plot_w = 760
    height = top + row * max(1, len(steps)) + 90
    width = left + plot_w + right

    def x(t: float) -> float:
        return left + plot_w * max(0.0, t - notice) / span

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="28" font-size="17" font-weight="bold">{html.escape(title)}</text>',
           f'<text x="{left}" y="48" fill="#555">{html.escape(_subtitle(drain, finished, deadline))}</text>']
    # time axis with a tick every "nice" interval
    axis_y = top + row * max(1, len(steps)) + 10
    tick = _nice_tick(span)
    t = 0.0
    while t <= span + 1e-9:
        xx = x(notice + t)
        out.append(f'<line x1="{xx:.1f}" y1="{top - 8}" x2="{xx:.1f}" y2="{axis_y}" stroke="#eee"/>')
        out.append(f'<text x="{xx:.1f}" y="{axis_y + 16}" text-anchor="middle" fill="#555">{t:g} s</text>')
        t += tick
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#333"/>')
    for i, step in enumerate(steps):
        y = top + i * row
        start = float(step.get("start") or notice)
        secs = float(step.get("seconds") or 0.0)
        color = _COLORS.get(step.get("state", ""), _COLORS[""])
        bar_w = max(2.0, x(start + secs) - x(start))
        label = f'{step["name"]}'
        out.append(f'<text x="{left - 10}" y="{y + 17}" text-anchor="end">{html.escape(label)}</text>')
        tip = f'{step["name"]}: {step.get("state", "")} {fmt_seconds(secs)} {step.get("reason", "")}'.strip()
        out.append(f'<rect x="{x(start):.1f}" y="{y + 4}" width="{bar_w:.1f}" height="{row - 12}" fill="{color}">'
                   f'<title>{html.escape(tip)}</title></rect>')
        out.append(f'<text x="{x(start) + bar_w + 6:.1f}" y="{y + 17}" fill="#333">'
                   f'{html.escape(step.get("state", ""))} {html.escape(fmt_seconds(secs))}</text>')
    for at, name, color in ((notice, "notice", "#1565c0"), (finished, "drained", "#2e7d32"), (deadline, "deadline", "#c62828")):
        xx = x(at)
        out.append(f'<line x1="{xx:.1f}" y1="{top - 12}" x2="{xx:.1f}" y2="{axis_y}" stroke="{color}" '
                   f'stroke-width="2" stroke-dasharray="5,3"/>')
        out.append(f'<text x="{xx:.1f}" y="{axis_y + 36}" text-anchor="middle" fill="{color}">{name}</text>')
    if finished < deadline:
        out.append(f'<rect x="{x(finished):.1f}" y="{top - 12}" width="{x(deadline) - x(finished):.1f}" '
                   f'height="{axis_y - top + 12}" fill="#2e7d32" fill-opacity="0.07"/>')
        out.append(f'<text x="{(x(finished) + x(deadline)) / 2:.1f}" y="{top + 4}" text-anchor="middle" '
                   f'fill="#2e7d32">{deadline - finished:.1f} s to spare</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _subtitle(drain: Dict[str, Any], finished: float, deadline: float) -> str:
    kind = drain.get("kind", "")
    window = drain.get("window")
    parts = [kind] if kind else []
    if window:
        parts.append(f"simulated notice window {window:g} s (AWS: 120 s)")
    parts.append(f"drained {deadline - finished:.1f} s before the deadline")
    return "; ".join(parts)


def _nice_tick(span: float) -> float:
    for tick in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300):
        if span / tick <= 12:
            return float(tick)
    return 600.0
