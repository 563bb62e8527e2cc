"""The demo's printed report: what is simulated, the timeline, the summary, the checks (pure)."""

from __future__ import annotations

from typing import Any, Dict, List

from agent.demo.timeline import TEXT_HEADER, Mark, Timeline, fmt_seconds, render_text


def timeline_from(result: Dict[str, Any]) -> Timeline:
    t0 = float(result.get("started_at") or 0.0)
    tl = Timeline(t0)
    for m in result.get("timeline", []):
        tl.marks.append(Mark(m["at"], m["lane"], m["what"], m.get("seconds"), m.get("state", "")))
    return tl


def header(settings_window: float) -> List[str]:
    return [
        "spot-agent demo: a spot training job loses its instance and resumes on the next one, on this machine.",
        f"Simulated notice window: {settings_window:g} s (AWS gives 120 s), drain reserves scaled to fit.",
    ]


def render_report(result: Dict[str, Any], live: bool = False) -> str:
    """The whole report; ``live``: without what the demo already printed as it ran (what is
    simulated, the timeline)."""
    s = result.get("summary") or {}
    lines: List[str] = []
    if not live:
        lines.append("what is simulated:")
        lines += [f"  - {line}" for line in result.get("simulated", [])]
        lines.append("")
        lines.append(TEXT_HEADER)
        lines.append(render_text(timeline_from(result)))
        lines.append("")
    lines.append("summary:")
    ds = s.get("dataset") or {}
    match = {True: "sha256 verified on both instances", False: "SHA256 MISMATCH", None: "not checked"}[ds.get("sha256_match")]
    lines.append(f"  data pre-warmed     {ds.get('files', 0)} files, {ds.get('bytes', 0) / 1e6:.1f} MB from S3 before READY; {match}")
    ck = s.get("checkpoint") or {}
    parts = []
    if ck.get("step") is not None:
        parts.append(f"step {ck['step']}")
    for name, sid in (ck.get("snapshots") or {}).items():
        frozen = (ck.get("frozen_seconds") or {}).get(name)
        parts.append(f"snapshot {sid} of volume {name}" + (f" (frozen {fmt_seconds(frozen)})" if frozen is not None else ""))
    for name, cid in (ck.get("s3_checkpoint_ids") or {}).items():
        parts.append(f"S3 checkpoint {cid}")
    lines.append(f"  checkpoint saved    {', '.join(parts) or 'none'}")
    spare = s.get("seconds_to_spare")
    window = s.get("notice_window")
    lines.append("  deadline margin     " + (f"{spare:.1f} s left of the {window:g} s notice when the drain finished"
                                            if spare is not None else "unknown (the drain did not finish)"))
    resumed = s.get("resumed_step")
    src = s.get("restored_from_snapshot")
    if resumed is None:
        how = "did not resume"
    elif not s.get("resume_possible", True):
        how = (f"step {resumed}: nothing carried the checkpoint over (no block devices and no S3 checkpoint "
               "store in this build)")
    else:
        via = [f"volume restored from {src}"] if src else []
        if s.get("restored_s3_checkpoint"):
            via.append(f"S3 checkpoint {s['restored_s3_checkpoint']} restored")
        how = f"step {resumed} on the replacement instance" + (f" ({', '.join(via)})" if via else "")
    lines.append("  resumed at          " + how)
    lines.append(f"  lifecycle action    {'completed (CONTINUE) once' if s.get('lifecycle_completed') else 'NOT completed'}")
    lines.append(f"  took                {result.get('seconds', 0):.1f} s")
    lines.append("")
    lines.append("checks:")
    for c in result.get("checks", []):
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[c["ok"]]
        lines.append(f"  {mark} {c['name']}: {c['detail']}")
    if result.get("error"):
        lines.append("")
        lines.append(f"demo FAILED: {result['error']}")
    return "\n".join(lines)
