"""The status document rendered for a human at a terminal. Pure: a dict and a clock in, text out.

The daemon's status dict is the contract; this reads it defensively (a field may be missing or null
when the daemon is older, newer or mid-start) so `spot-agent status` never fails on the way it looks.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, List, Optional

STATE_WORDS = {
    "starting": "STARTING (bringing up volumes and datasets)",
    "ready": "READY",
    "draining": "DRAINING (saving work before termination)",
    "drained": "DRAINED (work saved; waiting for termination)",
    "failed": "FAILED",
}


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def duration(seconds: float) -> str:
    """Short human duration: 45s, 3m 05s, 2h 10m, 3d 4h."""
    s = int(round(abs(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def when(ts: Any, now: float) -> str:
    """``2026-12-01T10:00:00Z (3m 05s ago)`` or ``(in 1m 52s)``; ``never`` for missing or zero times."""
    t = _num(ts)
    if not t:
        return "never"
    delta = now - t
    rel = f"{duration(delta)} ago" if delta >= 0 else f"in {duration(delta)}"
    return f"{iso(t)} ({rel})"


def size(n: Any) -> str:
    v = _num(n)
    if v is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"  # pragma: no cover - loop always returns


def _text(value: Any, default: str = "-") -> str:
    if value is None or value == "":
        return default
    return str(value)


def _dict(value: Any) -> Dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> List[Dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _dataset_line(ds: Dict[str, Any]) -> str:
    done, total = _num(ds.get("bytes_done")) or 0.0, _num(ds.get("bytes_total")) or 0.0
    state = _text(ds.get("state"), "pending")
    if total > 0:
        pct = f"{min(done / total, 1.0) * 100:.0f}%"
    else:
        pct = "100%" if state == "done" else "-"
    files = f"{int(_num(ds.get('files_done')) or 0)}/{int(_num(ds.get('files_total')) or 0)} files"
    errors = int(_num(ds.get("errors")) or 0)
    err = f", {errors} error{'s' if errors != 1 else ''}" if errors else ""
    return (f"  {_text(ds.get('source'))} -> {_text(ds.get('dest'))}: {state} {pct} "
            f"({size(done)} of {size(total)}, {files}{err})")


def render(status: Dict[str, Any], now: float, source: str = "socket") -> str:
    lines: List[str] = []
    state = _text(status.get("state"), "unknown")
    head = f"spot-agent {_text(status.get('version'), '?')}  pid {_text(status.get('pid'), '?')}  {STATE_WORDS.get(state, state.upper())}"
    started = _num(status.get("started_at"))
    if started:
        head += f"  up {duration(now - started)}"
    lines.append(head)
    if status.get("status_line"):
        lines.append(f"  {status['status_line']}")
    if status.get("error"):
        lines.append(f"  error: {status['error']}")
    if source != "socket":
        lines.append(f"  (from the state file, updated {when(status.get('updated_at'), now)}: the socket did not answer)")

    inst = _dict(status.get("instance"))
    if inst:
        lines.append(f"instance    {_text(inst.get('instance_id'))}  {_text(inst.get('instance_type'))}  "
                     f"{_text(inst.get('availability_zone'))} ({_text(inst.get('region'))})  {_text(inst.get('life_cycle'))}")

    imds = _dict(status.get("imds"))
    if imds:
        if imds.get("disabled"):
            word = "DISABLED (403): notices cannot be seen"
        elif imds.get("up"):
            word = "up"
        else:
            word = "UNREACHABLE"
        lines.append(f"imds        {word}, last answer {when(imds.get('last_success'), now)}")

    notices = _list(status.get("notices"))
    if not notices:
        lines.append("notices     none")
    else:
        lines.append("notices")
        for n in notices:
            action = f" {n['action']}" if n.get("action") else ""
            due = when(n.get("deadline"), now) if _num(n.get("deadline")) else "no deadline given"
            lines.append(f"  {_text(n.get('kind'))}{action}: due {due}, seen {when(n.get('detected_at'), now)}")
    deadline = _num(status.get("deadline"))
    if deadline:
        left = deadline - now
        lines.append(f"deadline    {iso(deadline)} ({'in ' + duration(left) if left >= 0 else 'passed ' + duration(left) + ' ago'})")

    drain = _dict(status.get("drain"))
    dstate = _text(drain.get("state"), "none")
    steps = _list(drain.get("steps"))
    if dstate == "none" and not steps:
        lines.append("drain       none")
    else:
        kind = f" ({drain['kind']})" if drain.get("kind") else ""
        lines.append(f"drain       {dstate}{kind}")
        for st in steps:
            secs = _num(st.get("seconds"))
            took = f" {secs:.1f}s" if secs is not None else ""
            reason = f" ({st['reason']})" if st.get("reason") else ""
            lines.append(f"  {_text(st.get('name')):<22} {_text(st.get('state'))}{took}{reason}")

    mounts = _list(status.get("mounts"))
    if not mounts:
        lines.append("mounts      none")
    else:
        lines.append("mounts")
        for m in mounts:
            lines.append(f"  {_text(m.get('name')):<16} {_text(m.get('volume_id')):<22} {_text(m.get('device')):<14} "
                         f"-> {_text(m.get('mountpoint'))} ({_text(m.get('fs'))})")

    datasets = _list(status.get("datasets"))
    if not datasets:
        lines.append("datasets    none")
    else:
        lines.append("datasets")
        lines.extend(_dataset_line(ds) for ds in datasets)

    ck = status.get("last_checkpoint")
    if isinstance(ck, dict) and ck:
        ident = f" {ck['checkpoint_id']}" if ck.get("checkpoint_id") else ""
        lines.append(f"checkpoint  {_text(ck.get('dir'))} -> {_text(ck.get('s3'))}{ident}, committed {when(ck.get('committed_at'), now)}")
    else:
        lines.append("checkpoint  none committed yet")

    for fb in _list(status.get("restore_fallbacks")):
        rejected = _list(fb.get("rejected_manifests"))
        if not rejected:
            continue
        newest = rejected[0]
        lines.append(f"restore     {_text(fb.get('dir'))}: restored {_text(fb.get('checkpoint_id'), 'nothing')}; "
                     f"{len(rejected)} newer manifest(s) did not verify (newest {_text(newest.get('id'))}: "
                     f"{_text(newest.get('reason'))})")

    snap = status.get("last_snapshot")
    if isinstance(snap, dict) and snap:
        lines.append(f"snapshot    {_text(snap.get('snapshot_id'))} of {_text(snap.get('volume'))}, created {when(snap.get('created_at'), now)}")
    else:
        lines.append("snapshot    none taken yet")
    return "\n".join(lines) + "\n"


def render_not_running(reason: str, last: Optional[Dict[str, Any]], now: float) -> str:
    lines = [f"spot-agent is not running: {reason}"]
    if last:
        lines.append(f"last known state: {_text(last.get('state'), 'unknown')} "
                     f"(pid {_text(last.get('pid'), '?')}, updated {when(last.get('updated_at'), now)})")
        if last.get("status_line"):
            lines.append(f"  {last['status_line']}")
    return "\n".join(lines) + "\n"
