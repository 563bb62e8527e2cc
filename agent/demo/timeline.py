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


LANE_WIDTH = 10


def format_mark(mark: Mark, t0: float, lane_w: int = LANE_WIDTH) -> str:
    """offset, lane, how long the step took (blank for an instant), what happened."""
    state = f"[{mark.state}] " if mark.state else ""
    return f"  +{mark.at - t0:5.1f}s  {mark.lane:<{lane_w}}  {fmt_seconds(mark.seconds):>7}  {state}{mark.what}".rstrip()


def render_text(timeline: Timeline) -> str:
    lane_w = max([len(m.lane) for m in timeline.marks] + [LANE_WIDTH])
    return "\n".join(format_mark(m, timeline.t0, lane_w) for m in timeline.ordered())


TEXT_HEADER = f"  {'offset':>7}  {'where':<{LANE_WIDTH}}  {'took':>7}  what happened"


# ---- SVG ----------------------------------------------------------------------------------------

_COLORS = {"ok": "#2e7d32", "cut": "#f9a825", "skipped": "#9e9e9e", "failed": "#c62828", "": "#1565c0"}
_LEFT, _PLOT_W, _RIGHT, _ROW = 150, 720, 150, 30


def render_svg(drain: Dict[str, Any], title: str = "spot-agent drain") -> str:
    """The drain in two panels: the whole notice window (notice -> deadline, with the time to spare),
    then the drain itself zoomed in, one bar per step.

    ``drain`` is the demo's drain data: ``notice_at``, ``detected_at``, ``deadline``, ``finished_at``
    (epochs), ``window`` and ``steps`` (``name``, ``state``, ``start``, ``seconds``, ``reason``).
    """
    steps = list(drain.get("steps") or [])
    notice = float(drain.get("notice_at") or (steps[0]["start"] if steps else 0.0))
    deadline = float(drain.get("deadline") or notice + 1.0)
    finished = float(drain.get("finished_at") or deadline)
    detected = float(drain.get("detected_at") or notice)
    width = _LEFT + _PLOT_W + _RIGHT
    out: List[str] = []
    y = 30
    out.append(f'<text x="{_LEFT}" y="{y}" font-size="17" font-weight="bold">{html.escape(title)}</text>')
    y += 20
    out.append(f'<text x="{_LEFT}" y="{y}" fill="#555">{html.escape(_subtitle(drain, finished, deadline))}</text>')
    y += 40
    # panel 1: the notice window
    out.append(f'<text x="{_LEFT}" y="{y}" font-weight="bold">the notice window</text>')
    y += 12
    span1 = max(deadline - notice, finished - notice, 1.0)
    x1 = _scale(notice, span1)
    out.append(_bar(x1(notice), y, max(2.0, x1(finished) - x1(notice)), _COLORS["ok"] if drain.get("ok") else _COLORS["failed"],
                    "drain", f"drain: {fmt_seconds(finished - notice)} from the notice"))
    out.append(f'<text x="{_LEFT - 10}" y="{y + 17}" text-anchor="end">drain</text>')
    out.append(f'<text x="{x1(finished) + 6:.1f}" y="{y + 17}" fill="#333">{fmt_seconds(finished - notice)}</text>')
    if finished < deadline:
        out.append(f'<rect x="{x1(finished):.1f}" y="{y}" width="{x1(deadline) - x1(finished):.1f}" height="{_ROW - 4}" '
                   f'fill="#2e7d32" fill-opacity="0.08"/>')
        out.append(f'<text x="{(x1(finished) + x1(deadline)) / 2:.1f}" y="{y + 17}" text-anchor="middle" fill="#2e7d32">'
                   f'{deadline - finished:.1f} s to spare</text>')
    out.append(_vline(x1(deadline), y - 6, y + _ROW, "#c62828"))
    out.append(f'<text x="{x1(deadline) + 6:.1f}" y="{y + 17}" fill="#c62828">deadline</text>')
    y += _ROW + 4
    out += _axis(y, span1, x1, notice)
    y += 60
    # panel 2: the drain, zoomed
    span2 = max((finished - notice) * 1.08, 0.05)
    x2 = _scale(notice, span2)
    out.append(f'<text x="{_LEFT}" y="{y}" font-weight="bold">the drain, zoomed in ({fmt_seconds(finished - notice)})</text>')
    y += 28
    top = y
    for step in steps:
        start = float(step.get("start") or notice)
        secs = float(step.get("seconds") or 0.0)
        color = _COLORS.get(step.get("state", ""), _COLORS[""])
        tip = f'{step["name"]}: {step.get("state", "")} {fmt_seconds(secs)} {step.get("reason", "")}'.strip()
        out.append(f'<text x="{_LEFT - 10}" y="{y + 17}" text-anchor="end">{html.escape(step["name"])}</text>')
        out.append(_bar(x2(start), y, max(2.0, x2(start + secs) - x2(start)), color, step["name"], tip))
        out.append(f'<text x="{x2(start + secs) + 6:.1f}" y="{y + 17}" fill="#333">'
                   f'{html.escape(step.get("state", ""))} {html.escape(fmt_seconds(secs))}</text>')
        y += _ROW
    out.append(_vline(x2(detected), top - 6, y, "#1565c0"))
    out.append(f'<text x="{x2(detected) + 4:.1f}" y="{top - 8}" fill="#1565c0" font-size="11">notice seen '
               f'+{fmt_seconds(detected - notice)}</text>')
    y += 4
    out += _axis(y, span2, x2, notice)
    y += 50
    legend_x = _LEFT
    for state in ("ok", "cut", "skipped", "failed"):
        out.append(f'<rect x="{legend_x}" y="{y - 11}" width="12" height="12" fill="{_COLORS[state]}"/>')
        out.append(f'<text x="{legend_x + 17}" y="{y}" fill="#333">{state}</text>')
        legend_x += 90
    height = y + 20
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
            f'<rect width="{width}" height="{height}" fill="white"/>']
    return "\n".join(head + out + ["</svg>"]) + "\n"


def _scale(origin: float, span: float):
    return lambda t: _LEFT + _PLOT_W * max(0.0, t - origin) / span


def _bar(x: float, y: float, w: float, color: str, name: str, tip: str) -> str:
    return (f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{_ROW - 10}" fill="{color}">'
            f'<title>{html.escape(tip)}</title></rect>')


def _vline(x: float, y1: float, y2: float, color: str) -> str:
    return f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y2}" stroke="{color}" stroke-width="2" stroke-dasharray="5,3"/>'


def _axis(y: float, span: float, x: Any, origin: float) -> List[str]:
    out = [f'<line x1="{_LEFT}" y1="{y}" x2="{_LEFT + _PLOT_W}" y2="{y}" stroke="#333"/>']
    tick = _nice_tick(span)
    t = 0.0
    while t <= span + 1e-9:
        xx = x(origin + t)
        out.append(f'<line x1="{xx:.1f}" y1="{y}" x2="{xx:.1f}" y2="{y + 5}" stroke="#333"/>')
        label = f"{t * 1000:.0f} ms" if tick < 1 else f"{t:g} s"
        out.append(f'<text x="{xx:.1f}" y="{y + 19}" text-anchor="middle" fill="#555">{label}</text>')
        t += tick
    out.append(f'<text x="{_LEFT + _PLOT_W + 10}" y="{y + 19}" fill="#555">after the notice</text>')
    return out


def _subtitle(drain: Dict[str, Any], finished: float, deadline: float) -> str:
    kind = drain.get("kind", "")
    window = drain.get("window")
    parts = [kind] if kind else []
    if window:
        parts.append(f"simulated notice window {window:g} s (AWS: 120 s)")
    spare = deadline - finished
    parts.append(f"drained {spare:.1f} s before the deadline" if spare >= 0 else f"drained {-spare:.1f} s AFTER the deadline")
    return "; ".join(parts)


def _nice_tick(span: float) -> float:
    for tick in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300):
        if span / tick <= 10:
            return float(tick)
    return 600.0
