"""`spot-agent status [--json]`: what the daemon on this instance is doing.

Asks the daemon over its Unix socket, falls back to the state file it keeps, and exits 3 when no
daemon is running (so scripts and ExecCondition= lines can tell "not running" from "failed").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from agent.cli import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE
from agent.commands import finite_float
from agent.config import DEFAULT_CONFIG_PATH, AgentSection, Config, load
from agent.schema import ConfigError
from agent.status_socket import DaemonNotRunning, fetch_status
from agent.status_view import render, render_not_running


def register(sub) -> None:
    p = sub.add_parser("status", help="show what the daemon is doing (state, notices, mounts, datasets, checkpoints)",
                       description="Show the running daemon's status. Exit 3 when the daemon is not running.")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.add_argument("--config", "-c", default=None, metavar="PATH", help=f"config file for the socket and state paths (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--socket", default=None, metavar="PATH", help="status socket path (overrides [agent] socket)")
    p.add_argument("--state-file", default=None, metavar="PATH", help="state file path (overrides <state_dir>/status.json)")
    p.add_argument("--timeout", type=finite_float, default=2.0, metavar="SECONDS", help="seconds to wait for the daemon's answer (default 2)")
    p.set_defaults(func=run)


def _agent_section(path: str, explicit: bool) -> AgentSection:
    if not explicit and not os.path.exists(path):
        return AgentSection()  # no config installed: the daemon runs with the defaults too
    # Status only reads two paths from the file and runs nothing, so the root-ownership rule that
    # protects hooks does not apply here.
    config: Config = load(path, strict_permissions=False)
    return config.agent


def run(args: argparse.Namespace) -> int:
    try:
        agent = _agent_section(args.config or DEFAULT_CONFIG_PATH, args.config is not None)
    except ConfigError as exc:
        print(f"spot-agent status: {exc.one_line()}", file=sys.stderr)
        return EXIT_USAGE
    socket_path = args.socket or agent.socket
    state_file = args.state_file or os.path.join(agent.state_dir, "status.json")
    now = time.time()
    try:
        status, source = fetch_status(socket_path, state_file, timeout=args.timeout)
    except DaemonNotRunning as exc:
        if args.json:
            print(json.dumps({"running": False, "reason": str(exc), "last": exc.last}, indent=2, sort_keys=True))
        else:
            sys.stdout.write(render_not_running(str(exc), exc.last, now))
        return EXIT_NOT_RUNNING
    except PermissionError as exc:
        print(f"spot-agent status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(status, now, source))
    return EXIT_OK
