"""`spot-agent check-config`: validate the config and say every problem with its key path."""

from __future__ import annotations

import json
import sys

from agent.commands import add_config_arg


def register(sub):
    p = sub.add_parser("check-config", help="validate the config file; exit 2 with each problem's key path")
    add_config_arg(p)
    p.add_argument("--json", action="store_true", help="print the effective config (defaults filled in) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from agent import config as cfgmod
    from agent.cli import EXIT_USAGE

    try:
        cfg = cfgmod.load(args.config)
    except cfgmod.ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(cfgmod.to_dict(cfg), indent=2))
    else:
        print(f"{args.config}: ok ({len(cfg.hooks)} hooks, {len(cfg.volumes)} volumes, "
              f"{len(cfg.datasets)} datasets, {len(cfg.checkpoints)} checkpoints)")
    return 0
