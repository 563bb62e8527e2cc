"""`spot-agent volumes list|up|down`: the boot step for volumes, by hand, and what is mounted.

``list`` reads the agent's state and the mount table only (no IMDS, no AWS), so it works when the
network does not; ``up`` and ``down`` build the daemon's context (identity from IMDS, AWS clients).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List

from agent.commands import add_config_arg


def register(sub) -> None:
    p = sub.add_parser("volumes", help="list, bring up or take down the [[volumes]] (attach, format if blank, mount)",
                       description="Volumes at boot, by hand. Exit 1 when a volume failed, 2 on bad configuration.")
    vsub = p.add_subparsers(dest="volumes_command", metavar="ACTION")
    ls = vsub.add_parser("list", help="volume id, device, mount point, filesystem, size and usage of each volume")
    add_config_arg(ls)
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(func=run_list)
    for name, helptext in (("up", "attach, format if blank, mount (what the daemon does at boot)"),
                           ("down", "unmount and detach")):
        q = vsub.add_parser(name, help=helptext)
        add_config_arg(q)
        q.add_argument("names", nargs="*", metavar="NAME", help="only these [[volumes]] (default: all)")
        q.add_argument("--json", action="store_true", help="print the results as JSON")
        q.set_defaults(func=run_up if name == "up" else run_down)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])


def _load(path: str):
    from agent import config as cfgmod

    try:
        return cfgmod.load(path), None
    except cfgmod.ConfigError as exc:
        return None, exc.render()


def rows(config: Any, records: Dict[str, Dict[str, Any]], mountinfo: str = "/proc/self/mountinfo") -> List[Dict[str, Any]]:
    """One row per configured volume: what state says, checked against the live mount table."""
    import psutil

    from agent.volumes.filesystem import major_minor, mount_at, read_mounts

    mounts = read_mounts(mountinfo)
    out = []
    for vol in config.volumes:
        rec = records.get(vol.name, {})
        row: Dict[str, Any] = {"name": vol.name, "volume_id": rec.get("volume_id", ""), "device": rec.get("device", ""),
                               "mountpoint": vol.mount, "fs": vol.fs, "required": vol.required,
                               "size_bytes": None, "used_bytes": None, "mounted": False}
        here = mount_at(mounts, vol.mount)
        if here is not None:
            dev = rec.get("device", "")
            try:
                ours = bool(dev) and major_minor(dev) == here.major_minor
            except OSError:
                ours = False
            row["mounted"] = ours
            row["mounted_source"] = here.source
            if ours:
                usage = psutil.disk_usage(vol.mount)
                row["size_bytes"], row["used_bytes"] = usage.total, usage.used
        out.append(row)
    return out


def _human(n: Any) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def run_list(args: argparse.Namespace) -> int:
    from agent.state import StateStore
    from agent.volumes.manager import SECTION

    config, error = _load(args.config)
    if config is None:
        print(error, file=sys.stderr)
        return 2
    state = StateStore(os.path.join(config.agent.state_dir, "state.json"))
    table = rows(config, state.get(SECTION, {}) or {})
    if args.json:
        print(json.dumps(table, indent=2, sort_keys=True))
        return 0
    header = ("NAME", "VOLUME", "DEVICE", "MOUNT", "FS", "SIZE", "USED", "STATUS")
    lines = [header]
    for r in table:
        status = "mounted" if r["mounted"] else (f"other: {r['mounted_source']}" if r.get("mounted_source") else "not mounted")
        lines.append((r["name"], r["volume_id"] or "-", r["device"] or "-", r["mountpoint"], r["fs"],
                      _human(r["size_bytes"]), _human(r["used_bytes"]), status))
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(header))]
    for l in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip())
    return 0


def build_manager(config: Any):
    from agent.daemon_context import build_context
    from agent.volumes.manager import VolumeManager

    ctx = build_context(config, identity_attempts=3)
    return VolumeManager(config.volumes, config.host, ctx.clients, ctx.identity, ctx.state, ctx.runner, ctx.clock)


def _run(args: argparse.Namespace, action: str) -> int:
    config, error = _load(args.config)
    if config is None:
        print(error, file=sys.stderr)
        return 2
    known = {v.name for v in config.volumes}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"spot-agent volumes {action}: no [[volumes]] named {', '.join(unknown)} "
              f"(configured: {', '.join(sorted(known)) or 'none'})", file=sys.stderr)
        return 2
    try:
        manager = build_manager(config)
    except Exception as exc:  # noqa: BLE001 - IMDS or AWS unreachable: one line, exit 1
        print(f"spot-agent volumes {action}: {exc}", file=sys.stderr)
        return 1
    progress = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    results = manager.up(args.names or None, progress=progress) if action == "up" else manager.down(args.names or None)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2, sort_keys=True))
    else:
        for r in results:
            if r.ok:
                done = ", ".join(r.actions) or "nothing to do"
                print(f"{r.name}: ok ({r.volume_id or 'instance store'} {r.device} at {r.mountpoint}: {done}; {r.seconds:.1f}s)")
            else:
                print(f"{r.name}: FAILED{'' if r.required else ' (optional)'}: {r.error}")
            for w in r.warnings:
                print(f"{r.name}: warning: {w}")
    return 0 if all(r.ok for r in results) else 1


def run_up(args: argparse.Namespace) -> int:
    return _run(args, "up")


def run_down(args: argparse.Namespace) -> int:
    return _run(args, "down")
