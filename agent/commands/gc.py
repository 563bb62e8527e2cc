"""`spot-agent gc [--json] [--delete]`: volumes and snapshots spot-agent left behind.

A dry run unless ``--delete``. Only resources tagged ``spot-agent:managed = true`` are considered, and
the newest completed snapshot of each volume name is never deleted (rules in agent.volumes.gc).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any

from agent.commands import add_config_arg, finite_float


def register(sub) -> None:
    p = sub.add_parser("gc", help="report (and with --delete remove) orphaned volumes and old snapshots we own",
                       description="Dry run unless --delete. Never touches a resource without the spot-agent:managed "
                                   "tag, nor the newest completed snapshot of a volume name.")
    add_config_arg(p)
    p.add_argument("--json", action="store_true", help="print the plan (and deletions) as JSON")
    p.add_argument("--delete", action="store_true", help="delete what the plan marks for deletion")
    p.add_argument("--keep", type=int, default=None, metavar="N",
                   help="completed snapshots kept per volume name (default [drain] keep_snapshots)")
    p.add_argument("--max-age-days", type=finite_float, default=0.0, metavar="DAYS",
                   help="snapshots older than this go (the newest completed one still stays); 0: no age limit")
    p.set_defaults(func=run)


def clients_for(config: Any) -> Any:
    """AWS clients; the region from [aws] region, or from IMDS via the daemon's context."""
    from agent.aws import make_clients

    region = config.aws.region or os.environ.get("AWS_REGION", "")
    if region:
        return make_clients(config.aws, region)
    from agent.daemon_context import build_context

    return build_context(config, identity_attempts=3).clients


def run(args: argparse.Namespace) -> int:
    from agent import config as cfgmod
    from agent.volumes import gc

    try:
        config = cfgmod.load(args.config)
    except cfgmod.ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    if not 0 <= args.max_age_days <= 999999:  # timedelta's limit is 999999999 days; a million is plenty
        print("spot-agent gc: --max-age-days must be 0..999999", file=sys.stderr)
        return 2
    if args.keep is not None and args.keep < 1:
        print("spot-agent gc: --keep must be at least 1", file=sys.stderr)
        return 2
    try:
        clients = clients_for(config)
        if clients is None:
            raise RuntimeError("no AWS region: set [aws] region")
        found = gc.collect(clients.ec2)
    except Exception as exc:  # noqa: BLE001 - AWS unreachable or refused: one line, exit 1
        print(f"spot-agent gc: {exc}", file=sys.stderr)
        return 1
    retention = gc.Retention(keep_last=args.keep or config.drain.keep_snapshots, max_age_days=args.max_age_days)
    items = gc.plan(found["volumes"], found["snapshots"], found["live"], retention, dt.datetime.now(dt.timezone.utc),
                    protected_volume_ids={v.volume_id for v in config.volumes if v.volume_id},
                    protected_tag_sets=[v.tags for v in config.volumes if v.tags])
    deleted = gc.delete(clients.ec2, items) if args.delete else []
    failed = [d for d in deleted if not d["deleted"]]
    if args.json:
        print(json.dumps({"dry_run": not args.delete, "retention": {"keep_last": retention.keep_last,
                                                                     "max_age_days": retention.max_age_days},
                          "items": [i.to_dict() for i in items], "deleted": deleted}, indent=2, sort_keys=True))
    else:
        doomed = [i for i in items if i.action == "delete"]
        for i in doomed:
            verb = "deleted" if args.delete and any(d["id"] == i.id and d["deleted"] for d in deleted) else (
                "FAILED" if args.delete else "would delete")
            print(f"{verb} {i.kind} {i.id} ({i.volume_name or '-'}, {i.size_gib} GiB): {i.reason}")
        for d in failed:
            print(f"error deleting {d['id']}: {d['error']}", file=sys.stderr)
        kept = len(items) - len(doomed)
        tail = "" if args.delete else " (dry run: pass --delete to delete)"
        print(f"{len(doomed)} to delete, {kept} kept{tail}")
    return 1 if failed else 0
