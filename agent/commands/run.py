"""`spot-agent run`: the daemon (systemd Type=notify)."""

from __future__ import annotations

from agent.commands import add_config_arg


def register(sub):
    p = sub.add_parser("run", help="run the daemon (systemd Type=notify)")
    add_config_arg(p)
    p.set_defaults(func=lambda args: _run(args))


def _run(args) -> int:
    from agent.daemon import run

    return run(args.config)
