"""The `spot-agent` command. Each subcommand lives in ``agent/commands/<name>.py`` with ``register``.

Exit codes (documented in the README):
  0 success; 1 the operation failed; 2 bad usage or bad configuration; 3 the daemon is not running
  (status); 4 IMDS refused us (403: IMDS disabled).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from agent import __version__

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_IMDS_DISABLED = 4

COMMANDS = ["run", "check_config", "simulate", "sync", "volumes", "gc", "drain", "thaw", "status", "demo"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
        # One line naming what was wrong, exit 2: argparse's default prints the whole usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spot-agent", description="Makes EC2 spot capacity safe for long training and batch jobs.")
    parser.add_argument("--version", action="version", version=f"spot-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"agent.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
