"""`spot-agent demo`: the whole story of a spot training job, locally, in about a minute.

Exit codes: 0 the story ran and every check held; 1 it failed (the report says where); 2 bad usage;
130 interrupted (everything started is still cleaned up).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

from agent.commands import finite_float


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a spot instance's life locally: notice, drain, replacement, resume",
                       description="Runs the real agent against an embedded IMDS simulator, moto (S3, EC2, Auto "
                                   "Scaling) and loop-device EBS volumes (as root; directories otherwise), through "
                                   "a spot interruption and the replacement instance resuming the training job.")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    p.add_argument("--timeline", metavar="FILE.svg", default="",
                   help="draw the drain timeline into this SVG file (.png too, if rsvg-convert is installed)")
    p.add_argument("--workdir", metavar="DIR", default="", help="work here instead of a new temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, state, volume images)")
    p.add_argument("--notice-window", type=finite_float, default=40.0, metavar="SECONDS",
                   help="simulated time between the spot notice and the termination (default 40; AWS gives 120)")
    p.add_argument("--aws", choices=["strict", "instant"], default="strict",
                   help="the local AWS: strict (default; states take time, eventual consistency, throttling, "
                        "EC2's limits, lifecycle rules) or instant (plain moto: everything at once)")
    p.add_argument("--no-block-devices", action="store_true",
                   help="use directory-backed volumes even as root (no loop devices, no snapshots)")
    p.set_defaults(func=run)


def _timeline_target(path: str) -> str:
    """'' when ``path`` can be written; else the one-line reason."""
    if not path:
        return ""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".svg", ".png"):
        return f"--timeline {path}: must end in .svg or .png"
    if ext == ".png" and not shutil.which("rsvg-convert"):
        return f"--timeline {path}: a .png needs rsvg-convert (librsvg2-bin); use a .svg file instead"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"--timeline {path}: directory {parent} does not exist"
    return ""


def _write_timeline(path: str, result: dict) -> str:
    from agent.demo.timeline import render_svg

    drain = result.get("drain")
    if not drain:
        return "no drain happened: no timeline drawn"
    svg = render_svg(drain, title="spot-agent drain on a spot interruption")
    if path.lower().endswith(".png"):
        svg_path = path[:-4] + ".svg"
        with open(svg_path, "w") as fh:
            fh.write(svg)
        subprocess.run(["rsvg-convert", "-o", path, svg_path], check=True, timeout=60)
    else:
        with open(path, "w") as fh:
            fh.write(svg)
    return ""


def run(args: Any) -> int:
    from agent.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
    from agent.demo.agent_config import DemoSettings
    from agent.demo.output import header, render_report
    from agent.demo.story import StoryOptions, run_story

    problem = _timeline_target(args.timeline)
    if not problem and args.notice_window < 25:
        problem = f"--notice-window {args.notice_window:g}: needs at least 25 s (15 s of drain reserves and margin, and time for the trainer to checkpoint)"
    if problem:
        print(f"spot-agent demo: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import moto  # noqa: F401
    except ImportError:
        print("spot-agent demo: needs moto (pip install 'spot-agent[demo]', or run `make demo`)", file=sys.stderr)
        return EXIT_FAILED

    live = sys.stderr if args.json else sys.stdout

    def progress(line: str) -> None:
        print(line, file=live, flush=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the same clean-up path as Ctrl-C

    old = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGHUP)}
    settings = DemoSettings(notice_window=args.notice_window)
    for line in header(settings.notice_window):
        progress(line)
    progress("")
    try:
        result = run_story(StoryOptions(workdir=args.workdir, keep=args.keep, settings=settings,
                                        block_devices=False if args.no_block_devices else None, progress=progress,
                                        aws_mode=args.aws))
    except KeyboardInterrupt:
        print("spot-agent demo: interrupted; stopped every process and released every mount and loop device",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if args.timeline:
        try:
            note = _write_timeline(args.timeline, result)
        except (OSError, subprocess.SubprocessError) as exc:
            note = f"cannot write {args.timeline}: {exc}"
            result["ok"] = False
        result["timeline_file"] = "" if note else os.path.abspath(args.timeline)
        if note:
            print(f"spot-agent demo: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print("")
        print(render_report(result, live=True))
        if result.get("timeline_file"):
            print(f"\ndrain timeline drawn in {result['timeline_file']}")
        if args.keep:
            print(f"kept the work directory: {result.get('workdir')}")
    return EXIT_OK if result.get("ok") else EXIT_FAILED
